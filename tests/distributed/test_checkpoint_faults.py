"""Checkpoint and run-directory faults end to end on CPU gloo ranks: a second run into a run directory is refused
and leaves the first run's checkpoints alone, --resume continues the run and prunes only its own checkpoints;
a damaged newest checkpoint (truncated, deleted or corrupt shard, missing common.pt, corrupt trainer_state.json,
missing RNG file) fails with one clear line on every rank and resume falls back to the newest step that loads;
an intact checkpoint saved under other settings (optimizer, model shapes; resumed or loaded with checkpoint.load)
is one line naming the setting and the ways on, and stays in place; a disk that fills up during a save leaves the
last checkpoint and `latest` intact."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]

# A tiny policy on the synthetic arithmetic task (as tests/distributed/test_trainer.py).
TINY = TINY_MODEL + TINY_STEP + [
    "optim.num_mini_batches=1", "optim.lr=1e-2", "metrics.log_interval=1", "metrics.tensorboard=false",
    "metrics.measure_entropy_change=false",
]


class _Warnings(logging.Handler):
    """Collects this process's megatron_entcov warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("megatron_entcov").addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())


def _lock_is_free(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------- one run per run directory
def _rerun_worker(rank, world_size, out):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.run.checkpoint import list_complete_steps
    from megatron_entcov.run.run_dir import RunDir, RunDirError
    from megatron_entcov.trainer import Trainer

    def config(*extra):
        return load_config(None, TINY + [f"output_dir={out}", "name=run", "checkpoint.save_interval=1",
                                         "checkpoint.keep_last=2", *extra]).resolve(world_size)

    run_dir = Path(out) / "run"
    res = {}
    cfg = config("steps=2")
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    first = Trainer(cfg, ps)
    first.train()
    first.close()
    res["run_id"] = json.loads((run_dir / "run.json").read_text())["run_id"]
    res["after_first"] = [p.name for _, p in list_complete_steps(run_dir / "checkpoints")]

    # The command: a new run (no --resume) with other settings into the same directory.
    try:
        Trainer(config("steps=3", "loss.name=kl_cov"), ps)
        res["refused"] = None
    except RunDirError as err:
        res["refused"] = str(err)
    res["after_refusal"] = [p.name for _, p in list_complete_steps(run_dir / "checkpoints")]
    res["lock_free_after_refusal"] = _lock_is_free(run_dir / "run.lock")

    # --resume continues the same run; its save prunes only its own older checkpoint.
    resumed = Trainer(config("steps=3", "checkpoint.resume=true"), ps)
    res["resumed_at"] = resumed.step
    res["resumed_id"] = resumed.run.run_id
    resumed.train()
    resumed.close()
    ckpts = run_dir / "checkpoints"
    res["after_resume"] = [p.name for _, p in list_complete_steps(ckpts)]
    res["latest"] = (ckpts / "latest").read_text()
    res["state_run_id"] = json.loads((ckpts / "step_000003" / "trainer_state.json").read_text())["run_id"]
    res["marker_run_id"] = json.loads((ckpts / "step_000003" / "COMPLETE").read_text())["run_id"]

    # Resuming a run that already reached `steps` says so (it used to train nothing and print `reward nan`).
    try:
        Trainer(config("steps=3", "checkpoint.resume=true"), ps)
        res["finished"] = None
    except ValueError as err:
        res["finished"] = str(err)

    # A Trainer that fails after taking the directory releases it (here: a vocabulary too small).
    try:
        Trainer(config("steps=3", "checkpoint.resume=true", "model.vocab_size=16"), ps)
        res["bad_vocab"] = None
    except ValueError as err:
        res["bad_vocab"] = str(err)
    res["lock_free_after_failed_init"] = _lock_is_free(run_dir / "run.lock")
    res["lock_file_after_failed_init"] = (run_dir / "run.lock").read_text()
    res["identity_kept"] = json.loads((run_dir / "run.json").read_text())["run_id"]

    # The same error in a new run: it gives its directory back, so the corrected command is not refused.
    try:
        Trainer(load_config(None, TINY + [f"output_dir={out}", "name=typo", "model.vocab_size=16"]
                            ).resolve(world_size), ps)
    except ValueError:
        pass
    res["typo_identity"] = (Path(out) / "typo" / "run.json").exists()
    try:
        RunDir.open(Path(out) / "typo", ps, resume=False).close()
        res["typo_reopened"] = None
    except RunDirError as err:
        res["typo_reopened"] = str(err)
    return res


def test_a_run_directory_belongs_to_one_run(tmp_path):
    """Reproduces the issue: a second run into a run directory used to prune the step it had just saved and
    keep the old run's steps. Now it is refused (nothing touched), --resume continues the same run id, and
    pruning deletes only this run's older checkpoint."""
    (res,) = run_workers(_rerun_worker, 1, args=(str(tmp_path),), timeout=300)
    run_dir = tmp_path / "run"
    assert res["after_first"] == ["step_000001", "step_000002"]
    refused = res["refused"]
    assert refused is not None, "a new run into another run's directory was accepted"
    assert str(run_dir) in refused and res["run_id"] in refused and "step_000002" in refused, refused
    assert "--resume" in refused and "--set name=" in refused, refused
    assert res["after_refusal"] == res["after_first"]
    assert res["lock_free_after_refusal"]
    assert res["resumed_at"] == 2 and res["resumed_id"] == res["run_id"]
    assert res["after_resume"] == ["step_000002", "step_000003"]
    assert res["latest"] == "step_000003"
    assert res["state_run_id"] == res["marker_run_id"] == res["run_id"]
    assert res["finished"] and "already at step 3 (step_000003): nothing to train" in res["finished"], res["finished"]
    assert "--set steps=<more than 3>" in res["finished"]
    assert res["bad_vocab"] and "model.vocab_size=16" in res["bad_vocab"]
    assert res["lock_free_after_failed_init"] and res["lock_file_after_failed_init"] == ""
    assert res["identity_kept"] == res["run_id"]
    assert res["typo_identity"] is False and res["typo_reopened"] is None, res["typo_reopened"]

    # The command line prints the refusal as one line and exits with 2.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = ["train", "--set", f"output_dir={tmp_path}", "--set", "name=run", "--set", "steps=3"]
    args += [x for kv in TINY for x in ("--set", kv)]
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-entcov train: error:")]
    assert len(lines) == 1 and "already holds run" in lines[0], proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]


# -------------------------------------------------------------------------------- damaged checkpoints
def _actor(cfg, ps):
    """An Actor whose optimizer has state (one step on zero gradients), as after training."""
    from megatron_entcov.policy.actor import Actor
    from megatron_entcov.policy.optimizer import optimizer_step, zero_grads

    actor = Actor(cfg, ps, temperature=1.0)
    zero_grads(actor.chunks, actor.optimizer)
    assert optimizer_step(actor.optimizer)[0]
    return actor


def _params(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


def _damage(root: Path, case: str) -> None:
    """Damage step 2 (or more) of a copy of the pristine checkpoints, as the named fault does."""
    step2 = root / "step_000002"
    if case == "truncated_shard":
        shard = step2 / "model" / "__0_0.distcp"
        os.truncate(shard, shard.stat().st_size // 2)
    elif case == "deleted_shard":
        (step2 / "optimizer" / "__0_1.distcp").unlink()
    elif case == "corrupt_tensor":  # the item's zip header: only torch DCP's read itself can notice
        import pickle

        meta = pickle.loads((step2 / "model" / ".metadata").read_bytes())
        index, info = next((i, s) for i, s in meta.storage_data.items() if i.fqn.endswith("linear_fc1.weight"))
        with open(step2 / "model" / info.relative_path, "r+b") as f:
            f.seek(info.offset)
            f.write(b"\0" * 64)
    elif case == "deleted_common":
        (step2 / "optimizer" / "common.pt").unlink()
    elif case == "corrupt_trainer_state":
        (step2 / "trainer_state.json").write_text('{"step": 2, "run_id": ')
    elif case == "missing_rng_rank1":
        (step2 / "rng" / "rank_00001.pt").unlink()
    elif case == "every_step_broken":
        for step in ("step_000001", "step_000002"):
            (root / step / "trainer_state.json").write_text("not json")
    elif case != "intact":
        raise AssertionError(case)


def _faults_worker(rank, world_size, out, cases):
    import torch.distributed as dist

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.run.checkpoint import Checkpointer, CheckpointError, CheckpointMismatch

    warnings = _Warnings()
    cfg = load_config(None, TINY + [f"output_dir={out}", "name=faults"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    actor = _actor(cfg, ps)
    pristine = Path(out) / "pristine"
    saver = Checkpointer(pristine, ps, keep_last=5, run_id="run-a")
    saved, rng_after_save = {}, {}
    for step in (1, 2):
        with torch.no_grad():
            for c in actor.chunks:
                for p in c.parameters():
                    p.add_(0.01 * step)
        saver.save(step, actor.chunks, optimizer=actor.optimizer, trainer_state={"step": step})
        saved[step] = _params(actor.chunks)
        rng_after_save[step] = torch.get_rng_state()

    res = {}
    for case in cases:
        root = Path(out) / case
        if ps.is_rank0:
            shutil.copytree(pristine, root)
            _damage(root, case)
        dist.barrier()
        torch.manual_seed(999)                       # a state no checkpoint holds
        before_rng = torch.get_rng_state()
        with torch.no_grad():                        # so a fall-back visibly reloads the weights
            for c in actor.chunks:
                for p in c.parameters():
                    p.zero_()
        warnings.messages.clear()
        entry = {}
        try:
            loaded = Checkpointer(root, ps, run_id="run-a").load_latest(actor.chunks, optimizer=actor.optimizer)
            path, state = loaded
            entry["loaded"] = path.name
            entry["state_step"] = state["step"]
            now = _params(actor.chunks)
            entry["weights_of_step"] = [s for s in (1, 2) if all(torch.equal(now[n], saved[s][n]) for n in now)]
            entry["rng_restored"] = torch.equal(torch.get_rng_state(), rng_after_save[entry["state_step"]])
            entry["rng_untouched"] = torch.equal(torch.get_rng_state(), before_rng)
        except CheckpointError as err:
            entry["error"] = str(err)
        entry["warnings"] = list(warnings.messages)
        entry["dirs"] = sorted(p.name for p in root.iterdir())
        entry["latest"] = (root / "latest").read_text()
        res[case] = entry

    # The disk fills up while rank 1 writes its RNG file, after every model and optimizer shard is written.
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if rank == 1 and "rng" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = full_disk_save
    try:
        saver.save(3, actor.chunks, optimizer=actor.optimizer, trainer_state={"step": 3})
        res["disk_full"] = None
    except CheckpointError as err:
        res["disk_full"] = str(err)
    finally:
        torch.save = real_save
    res["disk_full_dirs"] = sorted(p.name for p in pristine.iterdir())
    res["disk_full_reload"] = saver.load_latest(actor.chunks, optimizer=actor.optimizer)[1]["step"]

    # A model that does not fit the checkpoint (another ffn size): one short error naming the setting, not a DCP
    # traceback; the intact steps stay where they are (no fall-back, nothing set aside).
    other = load_config(None, TINY + [f"output_dir={out}", "name=faults", "model.ffn_hidden_size=96"]
                        ).resolve(world_size)
    wrong = _actor(other, ps)
    try:
        Checkpointer(pristine, ps, run_id="run-a").load_latest(wrong.chunks, optimizer=wrong.optimizer)
        res["shape_mismatch"] = None
    except CheckpointMismatch as err:
        res["shape_mismatch"] = str(err)
    res["shape_mismatch_dirs"] = sorted(p.name for p in pristine.iterdir())
    return res


FAULTS = ["intact", "truncated_shard", "deleted_shard", "corrupt_tensor", "deleted_common", "corrupt_trainer_state",
          "missing_rng_rank1", "every_step_broken"]


def test_damaged_checkpoints_and_a_full_disk_on_two_ranks(tmp_path):
    """Two ranks (dp=2). Each fault in the newest step: every rank falls back to step 1 together (weights,
    trainer state and RNG of step 1), with a warning naming step 2 and the damaged file; the broken step is
    moved aside and `latest` names step 1. A missing RNG file of one rank loads step 2 and restores RNG on no
    rank. No step loading is one CheckpointError of one line on every rank; a model that does not fit is one
    CheckpointMismatch naming the setting, with every step left in place.
    A save that runs out of space on one rank (simulated ENOSPC) raises on both, names the full device,
    removes its .tmp directory and keeps the last checkpoint and `latest`."""
    results = run_workers(_faults_worker, 2, args=(str(tmp_path), FAULTS), timeout=420)
    why = {"truncated_shard": "__0_0.distcp' is truncated", "deleted_shard": "__0_1.distcp' named by",
           "corrupt_tensor": "cannot load", "deleted_common": "common.pt' is missing",
           "corrupt_trainer_state": "trainer_state.json' is corrupt"}
    for rank, res in enumerate(results):
        intact = res["intact"]
        assert intact["loaded"] == "step_000002" and intact["weights_of_step"] == [2], (rank, intact)
        assert intact["rng_restored"] and intact["warnings"] == [], (rank, intact)
        for case, text in why.items():
            entry = res[case]
            assert entry.get("loaded") == "step_000001", (rank, case, entry)
            assert entry["state_step"] == 1 and entry["weights_of_step"] == [1], (rank, case, entry)
            assert entry["rng_restored"], (rank, case, entry)
            assert entry["dirs"] == ["latest", "step_000001", "step_000002.unloadable"], (rank, case, entry)
            assert entry["latest"] == "step_000001", (rank, case, entry)
            if rank == 0:
                first = entry["warnings"][0]
                assert first.startswith("checkpoint: step_000002 does not load") and text in first, (case, first)
                assert "\n" not in first and len(first) < 1200, (case, first)
                assert any("resumed from step_000001 instead of step_000002" in w for w in entry["warnings"])
        rng = res["missing_rng_rank1"]
        assert rng["loaded"] == "step_000002" and rng["weights_of_step"] == [2], (rank, rng)
        assert rng["rng_untouched"] and not rng["rng_restored"], (rank, rng)  # all ranks or none
        if rank == 0:
            assert len(rng["warnings"]) == 1, rng["warnings"]
            warning = rng["warnings"][0]
            assert "rank_00001.pt' is missing" in warning and "not restored on any rank" in warning
            assert "layout changed" not in warning
        broken = res["every_step_broken"]["error"]
        assert "no checkpoint in" in broken and "step_000002:" in broken and "step_000001:" in broken, broken
        assert "\n" not in broken
        assert res["every_step_broken"]["dirs"] == ["latest", "step_000001", "step_000002"]  # nothing moved
        mismatch = res["shape_mismatch"]
        assert mismatch and "\n" not in mismatch and len(mismatch) < 2000, mismatch
        assert "model.ffn_hidden_size=64 in the checkpoint vs model.ffn_hidden_size=96 in this run" in mismatch
        assert "--set model.ffn_hidden_size=64" in mismatch and "remove" not in mismatch, mismatch
        assert res["shape_mismatch_dirs"] == ["latest", "step_000001", "step_000002"], res["shape_mismatch_dirs"]
        # ENOSPC on one rank: every rank raises, naming the full device; step 2 and latest stay.
        full = res["disk_full"]
        assert full and "no space left on the device holding" in full and str(tmp_path / "pristine") in full, full
        assert "rank 1" in full and "removed step_000003.tmp" in full and "latest still names step_000002" in full
        assert "\n" not in full
        assert res["disk_full_dirs"] == ["latest", "step_000001", "step_000002"], res["disk_full_dirs"]
        assert res["disk_full_reload"] == 2


# -------------------------------------------------------------------------------- disk full during a save
def _disk_full_worker(rank, world_size, out, tiny_mount, small_mount):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.run.checkpoint import Checkpointer, CheckpointError

    cfg = load_config(None, TINY + [f"output_dir={out}", "name=full"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    actor = _actor(cfg, ps)
    res = {}
    # A real file system too small for one checkpoint: the first save fails midway.
    try:
        Checkpointer(Path(tiny_mount) / "checkpoints", ps, run_id="run-a").save(
            1, actor.chunks, optimizer=actor.optimizer, trainer_state={"step": 1})
        res["tiny"] = None
    except CheckpointError as err:
        res["tiny"] = str(err)
    res["tiny_dirs"] = sorted(p.name for p in (Path(tiny_mount) / "checkpoints").iterdir())
    # Room for one checkpoint and a half: the second save is refused before it writes anything.
    ckpt = Checkpointer(Path(small_mount) / "checkpoints", ps, run_id="run-a")
    ckpt.save(1, actor.chunks, optimizer=actor.optimizer, trainer_state={"step": 1})
    used = shutil.disk_usage(small_mount).used
    subprocess.run(["mount", "-o", f"remount,size={used + used // 2 + 4096}", small_mount], check=True)
    try:
        ckpt.save(2, actor.chunks, optimizer=actor.optimizer, trainer_state={"step": 2})
        res["small"] = None
    except CheckpointError as err:
        res["small"] = str(err)
    res["small_dirs"] = sorted(p.name for p in (Path(small_mount) / "checkpoints").iterdir())
    res["small_reload"] = ckpt.load_latest(actor.chunks, optimizer=actor.optimizer)[1]["step"]
    return res


def _try_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (needs root and a sandbox that permits it)."""
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_on_a_real_file_system(tmp_path):
    """Real ENOSPC on small tmpfs mounts (the simulated case runs in the two-rank test above): a first save that
    does not fit fails with the full device named and leaves nothing behind (torch reports it from a writer
    process as 'Worker failure: ...' or 'unexpected pos ...'); a second save that cannot fit beside the first
    is refused before writing, and the first still loads."""
    tiny, small = tmp_path / "tiny", tmp_path / "small"
    mounted = [p for p, size in ((tiny, "64k"), (small, "8m")) if _try_tmpfs(p, size)]
    if len(mounted) < 2:
        for p in mounted:
            subprocess.run(["umount", str(p)], check=False)
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test covers the save path")
    try:
        (res,) = run_workers(_disk_full_worker, 1, args=(str(tmp_path), str(tiny), str(small)), timeout=300)
    finally:
        for p in mounted:
            subprocess.run(["umount", str(p)], check=False)
    assert res["tiny"] and "no space left on the device holding" in res["tiny"], res["tiny"]
    assert str(tiny) in res["tiny"] and "no earlier checkpoint exists" in res["tiny"], res["tiny"]
    assert res["tiny_dirs"] == [], res["tiny_dirs"]
    assert res["small"] and "not enough space" in res["small"] and "step_000001" in res["small"], res["small"]
    assert res["small_dirs"] == ["latest", "step_000001"] and res["small_reload"] == 1


# -------------------------------------------------------------------------------- intact, but other settings
def _train(tmp_path: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["train", *(["--resume"] if resume else [])]
    args += [x for kv in TINY + [f"output_dir={tmp_path}", "checkpoint.save_interval=1", *overrides]
             for x in ("--set", kv)]
    return subprocess.run([sys.executable, "-m", "megatron_entcov", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-entcov train: error:")]
    assert len(lines) == 1, proc.stderr[-5000:]
    return lines[0]


def test_resume_under_other_settings_names_the_setting_and_keeps_the_checkpoint(tmp_path):
    """Resuming an intact checkpoint with another optimizer said "TypeError: 'NoneType' object is not callable
    ... fix or remove them" (also for another model.hidden_size). Now the line names the setting, the
    checkpoint's value and this run's, and the ways on (resume with the checkpoint's setting, or a new run under
    another name); it never advises removing the checkpoint, which stays where it was (not set aside). A run
    with optim.optimizer=sgd resumes (Megatron's SGD has no state initialiser: its load failed the same way)."""
    steps = tmp_path / "adam" / "checkpoints"
    first = _train(tmp_path, "name=adam", "steps=1")
    assert first.returncode == 0, first.stderr[-3000:]

    line = _error_line(_train(tmp_path, "name=adam", "steps=2", "optim.optimizer=sgd", resume=True))
    assert "optim.optimizer='adam'" in line and "optim.optimizer='sgd'" in line, line
    assert "--set optim.optimizer=adam" in line and "--set name=" in line, line
    assert "remove" not in line and "NoneType" not in line, line

    line = _error_line(_train(tmp_path, "name=adam", "steps=2", "model.hidden_size=64", resume=True))
    assert "model.hidden_size=32" in line and "model.hidden_size=64" in line, line
    assert "--set model.hidden_size=32" in line and "--set name=" in line, line
    assert "decoder.final_layernorm.weight" in line and "(32,)" in line and "(64,)" in line, line
    assert "remove" not in line, line
    assert sorted(p.name for p in steps.iterdir()) == ["latest", "step_000001"]

    sgd = _train(tmp_path, "name=sgd", "steps=1", "optim.optimizer=sgd")
    assert sgd.returncode == 0, sgd.stderr[-3000:]
    line = _error_line(_train(tmp_path, "name=sgd", "steps=2", resume=True))
    assert "optim.optimizer='sgd'" in line and "--set optim.optimizer=sgd" in line, line
    resumed = _train(tmp_path, "name=sgd", "steps=2", "optim.optimizer=sgd", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "sgd" / "checkpoints" / "step_000002" / "COMPLETE").is_file()


def test_checkpoint_load_of_other_shapes_names_the_tensors_and_the_setting(tmp_path):
    """checkpoint.load of a checkpoint of other shapes said "Unexpected keys" without the keys: now the keys,
    the shapes that differ, the setting and the fix."""
    first = _train(tmp_path, "name=src", "steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    step = tmp_path / "src" / "checkpoints" / "step_000001"
    line = _error_line(_train(tmp_path, "name=untied", "steps=1", f"checkpoint.load={step}",
                              "model.tie_word_embeddings=false"))
    assert str(step / "model") in line and "output_layer.weight" in line, line
    assert "model.tie_word_embeddings=true" in line and "--set model.tie_word_embeddings=true" in line, line
    line = _error_line(_train(tmp_path, "name=deeper", "steps=1", f"checkpoint.load={step}", "model.num_layers=3"))
    assert "model.num_layers=2" in line and "model.num_layers=3" in line, line
    assert "decoder.layers.mlp.linear_fc2.weight (2, 32, 64) in the checkpoint vs (3, 32, 64) in this model" in line, line
