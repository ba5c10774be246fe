"""Colocation (policy/colocation.py): the order of every hand-over in each phase, recorded through fake offload,
engine, memory recorder, cached-block release, barrier and fail_together, against the order written out by hand,
with colocation on and off."""

from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest

from megatron_entcov.policy import colocation as colocation_mod
from megatron_entcov.policy.colocation import Colocation

HOST_BYTES = 3 << 20


class _Offload:
    def __init__(self, log, enabled):
        self.log, self.enabled, self.host_bytes = log, enabled, HOST_BYTES

    def offload(self, *, weights):
        self.log.append(("offload", weights))

    def reload(self, parts=None):
        self.log.append(("reload", parts))


class _Engine:
    def __init__(self, log):
        self.log = log

    def release_memory(self, tags=None):
        self.log.append(("release_memory", tags))

    def resume_memory(self, tags=None):
        self.log.append(("resume_memory", tags))


class _Memory:
    def __init__(self, log):
        self.log = log

    def begin(self, phase):
        self.log.append(("mem.begin", phase))

    def end(self, phase, *, offloaded_bytes=None):
        self.log.append(("mem.end", phase, offloaded_bytes))


@pytest.fixture
def log(monkeypatch):
    calls = []

    @contextmanager
    def fail_together(what):
        calls.append(("fail_together", what))
        yield
        calls.append(("fail_together done", what))

    monkeypatch.setattr(colocation_mod, "fail_together", fail_together)
    monkeypatch.setattr(colocation_mod, "_return_cached_blocks", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(colocation_mod.collectives, "barrier", lambda group=None: calls.append(("barrier",)))
    return calls


def _colocation(log, enabled):
    return Colocation(_Offload(log, enabled), memory=_Memory(log)), _Engine(log)


MAKE_ROOM_ALL = [("offload", True), ("empty_cache",), ("barrier",)]
MAKE_ROOM_STATE = [("offload", False), ("empty_cache",), ("barrier",)]


@pytest.mark.parametrize("enabled", [True, False], ids=["colocated", "off"])
def test_rollout_offloads_everything_and_takes_the_figures_before_the_reload(log, enabled):
    colo, engine = _colocation(log, enabled)
    with colo.rollout():
        with colo.generating(engine):
            log.append(("generate",))
        log.append(("broadcast",))
    if enabled:
        want = [("mem.begin", "rollout"), *MAKE_ROOM_ALL, ("generate",), ("release_memory", None), ("broadcast",),
                ("mem.end", "rollout", HOST_BYTES), ("reload", None)]
    else:
        want = [("mem.begin", "rollout"), ("generate",), ("broadcast",), ("mem.end", "rollout", None),
                ("reload", None)]
    assert log == want


def test_servers_keep_their_memory_when_generation_fails(log):
    colo, engine = _colocation(log, True)
    with pytest.raises(RuntimeError, match="server down"):
        with colo.generating(engine):
            raise RuntimeError("server down")
    assert log == []


@pytest.mark.parametrize("enabled", [True, False], ids=["colocated", "off"])
def test_train_and_sync_phases_only_take_memory_figures(log, enabled):
    colo, _ = _colocation(log, enabled)
    with colo.train():
        log.append(("update",))
    with colo.sync():
        log.append(("push",))
    assert log == [("mem.begin", "train"), ("update",), ("mem.end", "train", None),
                   ("mem.begin", "sync"), ("push",), ("mem.end", "sync", None)]
    assert colo.sync_every_step is enabled


@pytest.mark.parametrize("has_engine", [True, False], ids=["generating-rank", "other-rank"])
def test_push_frees_the_trainer_state_then_resumes_weights_before_and_the_rest_after(log, has_engine):
    colo, engine = _colocation(log, True)
    engine = engine if has_engine else None
    with colo.push(engine) as prepare:
        if engine is not None:        # WeightSync.push calls prepare on the generating rank only
            prepare()
        log.append(("update_weights",))
    resume = [("resume_memory", None)] if has_engine else []
    assert log == [*MAKE_ROOM_STATE, *([("resume_memory", ["weights"])] if has_engine else []), ("update_weights",),
                   *MAKE_ROOM_STATE, ("fail_together", "resuming the servers' memory"), *resume,
                   ("fail_together done", "resuming the servers' memory")]


def test_push_without_colocation_has_no_hook_and_no_hand_over(log):
    colo, engine = _colocation(log, False)
    with colo.push(engine) as prepare:
        log.append(("update_weights",))
    assert prepare is None and log == [("update_weights",)]


@pytest.mark.parametrize("fails", [False, True], ids=["saved", "save-failed"])
def test_checkpoint_gives_the_kv_cache_for_the_optimizer_state_and_takes_it_back(log, fails):
    colo, engine = _colocation(log, True)
    with pytest.raises(OSError) if fails else nullcontext():
        with colo.checkpoint(engine):
            log.append(("save",))
            if fails:
                raise OSError("disk full")
    release, resume = "releasing the servers' KV cache for a checkpoint", \
        "resuming the servers' KV cache after a checkpoint"
    assert log == [("fail_together", release), ("release_memory", ["kv_cache", "cuda_graph"]),
                   ("fail_together done", release), ("reload", ("optimizer", "weights")), ("save",),
                   *MAKE_ROOM_STATE, ("fail_together", resume), ("resume_memory", None),
                   ("fail_together done", resume)]


def test_checkpoint_without_colocation_only_reloads(log):
    colo, engine = _colocation(log, False)
    with colo.checkpoint(engine):
        log.append(("save",))
    assert log == [("reload", ("optimizer", "weights")), ("save",)]


def test_a_colocated_step_in_the_trainer_order(log):
    """rollouts -> updates -> sync, as Trainer.train_step nests the phases."""
    colo, engine = _colocation(log, True)
    with colo.rollout():
        with colo.generating(engine):
            log.append(("generate",))
    with colo.train():
        log.append(("update",))
    with colo.sync(), colo.push(engine) as prepare:
        prepare()
        log.append(("update_weights",))
    resuming = "resuming the servers' memory"
    assert log == [("mem.begin", "rollout"), ("offload", True), ("empty_cache",), ("barrier",), ("generate",),
                   ("release_memory", None), ("mem.end", "rollout", HOST_BYTES), ("reload", None),
                   ("mem.begin", "train"), ("update",), ("mem.end", "train", None),
                   ("mem.begin", "sync"), ("offload", False), ("empty_cache",), ("barrier",),
                   ("resume_memory", ["weights"]), ("update_weights",), ("offload", False), ("empty_cache",),
                   ("barrier",), ("fail_together", resuming), ("resume_memory", None),
                   ("fail_together done", resuming), ("mem.end", "sync", None)]


@pytest.mark.parametrize("release", [True, False])
def test_from_config_follows_release_memory(release):
    cfg = SimpleNamespace(rollout=SimpleNamespace(sglang=SimpleNamespace(release_memory=release)))
    colo = Colocation.from_config(cfg, [], None)
    assert colo.enabled is release and colo.offload.enabled is release and colo.memory is None
