"""The SGLang weight transports (rollout/sglang/transports.py) against the fake server of conftest.py: what each
one sends, checked by value. 'disk' reads back the safetensors it wrote; 'tensor' unpickles the payloads the way
sglang's MultiprocessingSerializer does; 'distributed' forms a real gloo group with a fake member that joins it
in a server thread the way sglang's init_custom_process_group does, and receives every broadcast. The real
servers are exercised in tests/sglang (make test-sglang)."""

from __future__ import annotations

import base64
import pickle
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from dist_utils import TRANSPORT_MODEL_FIELDS

from megatron_entcov.config import ModelConfig
from megatron_entcov.distributed.net import free_port
from megatron_entcov.rollout.sglang.pool import DEAD, LIVE, Server, ServerPool
from megatron_entcov.rollout.sglang.transports import (
    DistributedTransport,
    TransportContext,
    build_transport,
    expected_shapes,
)

TINY = TRANSPORT_MODEL_FIELDS


@pytest.fixture(scope="module")
def tied_bf16():
    """A tied model in bfloat16: every transport converts float32 inputs and drops lm_head.weight."""
    cfg = ModelConfig(**TINY, tie_word_embeddings=True, params_dtype="bfloat16")
    return cfg, expected_shapes(cfg)


def _weights(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _buckets(weights: dict, size: int = 4) -> list[list]:
    items = list(weights.items())
    return [items[i:i + size] for i in range(0, len(items), size)]


def _sent(weights: dict, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """What a server must receive: every tensor in the model dtype, without the tied lm_head."""
    return {n: t.to(dtype) for n, t in weights.items() if n != "lm_head.weight"}


def _assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def _setup(model, urls, **ctx_args):
    cfg, shapes = model
    servers = [Server(url=u, index=i) for i, u in enumerate(urls)]
    pool = ServerPool(servers, launch=None, max_restarts=0, startup_timeout_s=5, is_current=lambda s: True)
    return servers, TransportContext(model_cfg=cfg, pool=pool, shapes=shapes, **ctx_args)


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"          # nothing listens there


# ---------------------------------------------------------------------------------------------------- disk


def _disk_server(fake_server, loaded: list):
    """A server whose /update_weights_from_disk reads the directory while the sync waits for it."""
    from safetensors.torch import load_file

    def load(body):
        d = Path(body["model_path"])
        tensors = {}
        for f in sorted(d.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        loaded.append((d, tensors, sorted(p.name for p in d.iterdir())))
        return {"success": True}

    return fake_server(routes={"/update_weights_from_disk": load})


def test_disk_writes_what_was_sent_and_keeps_only_a_complete_sync(tied_bf16, fake_server, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.json").write_text("{}")
    (model_dir / "model.safetensors").write_text("old weights: not copied")
    loaded_a, loaded_b, kept = [], [], []
    fakes = [_disk_server(fake_server, loaded_a), _disk_server(fake_server, loaded_b)]
    servers, ctx = _setup(tied_bf16, [f.url for f in fakes], sync_dir=str(tmp_path / "sync"),
                          model_dir=str(model_dir), keep_weights=lambda d, v: kept.append((Path(d), v)))
    (tmp_path / "sync").mkdir()
    transport = build_transport("disk", ctx)
    weights, seen = _weights(ctx.shapes), set()

    stats = transport.sync(_buckets(weights), version=5, seen=seen, servers=servers)
    (d, tensors, files), = loaded_a
    assert [x[0] for x in loaded_b] == [d] and d.parent == tmp_path / "sync"
    _assert_equal(tensors, _sent(weights))
    _assert_equal(loaded_b[0][1], _sent(weights))
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(files)
    assert "model.safetensors" not in files                   # the old weights stay behind
    posted = {"model_path": str(d), "flush_cache": False}
    assert [f.bodies("/update_weights_from_disk") for f in fakes] == [[posted], [posted]]
    assert stats["complete"] and stats["tensors"] == len(weights) - 1
    assert stats["bytes"] == sum(t.numel() * 2 for t in _sent(weights).values())
    assert kept == [(d, 5)] and d.is_dir()                    # restarted servers launch from it
    assert seen == set(weights) - {"lm_head.weight"}

    # A partial sync (one bucket) reaches the servers but is not kept: its directory is gone afterwards.
    part = _buckets(_weights(ctx.shapes, seed=1))[:1]
    stats = transport.sync(part, version=6, seen=seen, servers=servers)
    assert not stats["complete"] and stats["tensors"] == len(part[0])
    assert len(loaded_a) == 2 and not loaded_a[1][0].exists() and kept == [(d, 5)]
    _assert_equal(loaded_a[1][1], _sent(dict(part[0])))


def test_disk_drops_a_dead_server_and_fails_on_a_refusing_one(tied_bf16, fake_server, tmp_path):
    loaded = []
    up = _disk_server(fake_server, loaded)
    servers, ctx = _setup(tied_bf16, [up.url, _dead_url()], sync_dir=str(tmp_path))
    transport = build_transport("disk", ctx)
    weights = _weights(ctx.shapes)
    stats = transport.sync(_buckets(weights), version=1, seen=set(), servers=servers)
    assert stats["complete"] and len(loaded) == 1
    assert servers[0].state == LIVE and servers[1].state == DEAD        # marked by the pool
    assert list(tmp_path.iterdir()) == []          # no keep_weights callback: the directory is not kept

    refusing = fake_server(routes={"/update_weights_from_disk": {"success": False, "message": "disk full"}})
    servers, ctx = _setup(tied_bf16, [refusing.url], sync_dir=str(tmp_path), keep_weights=lambda d, v: None)
    with pytest.raises(RuntimeError, match=rf"/update_weights_from_disk failed on {refusing.url}: disk full"):
        build_transport("disk", ctx).sync(_buckets(weights), version=1, seen=set(), servers=servers)
    assert servers[0].state == LIVE and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- errors


def _producer(buckets: list, consumed: list):
    """A generator of buckets that records how far it was run (a gather producer must run to its end)."""
    for b in buckets:
        consumed.append(len(consumed))
        yield b
    consumed.append("end")


@pytest.mark.parametrize("method", ["disk", "tensor"])
@pytest.mark.parametrize("bad, match", [
    (("model.nope.weight", torch.zeros(3)), r"unknown tensor 'model.nope.weight'; expected Hugging Face names"),
    (("model.norm.weight", torch.zeros(17)), r"tensor 'model.norm.weight' has shape \(17,\); expected \(16,\)"),
])
def test_a_bad_tensor_raises_naming_it_after_draining_the_producer(method, bad, match, tied_bf16, fake_server,
                                                                    tmp_path):
    up = fake_server(routes={"/server_info": {"tp_size": 1}})
    servers, ctx = _setup(tied_bf16, [up.url], sync_dir=str(tmp_path))
    buckets = _buckets(_weights(ctx.shapes))
    buckets.insert(1, [bad])
    consumed = []
    with pytest.raises(ValueError, match=match + r".*\(and \d+ more tensors after it were not sent\)"):
        build_transport(method, ctx).sync(_producer(buckets, consumed), version=1, seen=set(), servers=servers)
    assert consumed[-1] == "end" and len(consumed) == len(buckets) + 1
    assert up.bodies("/update_weights_from_disk") == [] and list(tmp_path.iterdir()) == []
    # 'tensor' streams: the bucket before the bad one was sent; the engine then ends the update unversioned.
    assert len(up.bodies("/update_weights_from_tensor")) == (1 if method == "tensor" else 0)


def test_the_first_sync_must_send_every_tensor(tied_bf16, fake_server, tmp_path):
    up = fake_server()
    servers, ctx = _setup(tied_bf16, [up.url], sync_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"parameters have never been set since the engine was built"):
        build_transport("disk", ctx).sync(_buckets(_weights(ctx.shapes))[:1], version=1, seen=set(),
                                          servers=servers)


# ---------------------------------------------------------------------------------------------------- tensor


# The globals sglang 0.5.23's SafeUnpickler (utils/common.py) admits, of those a flattened CPU payload can use.
SGLANG_ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "int", "str", "bytes")} | {
    ("types", "SimpleNamespace"), ("torch", "Size"), ("torch", "Tensor"), ("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"), ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"), ("torch.multiprocessing.reductions",
                                                           "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"), ("torch.multiprocessing.reductions",
                                                                   "rebuild_storage_empty"),
    *{("torch", d) for d in ("float32", "bfloat16", "float16", "uint8")}}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SGLANG_ALLOWED:
            raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")
        return super().find_class(module, name)


def _unpickle(payload: str):
    """What sglang's MultiprocessingSerializer.deserialize does with the transport's base64 string."""
    import io

    return _SafeUnpickler(io.BytesIO(base64.b64decode(payload))).load()


def _rebuild_flat(obj: dict) -> list[tuple[str, torch.Tensor]]:
    """sglang's FlattenedTensorBucket.reconstruct_tensors on the unpickled payload (load_format
    'flattened_bucket'): each tensor a view of the flat uint8 tensor."""
    flat = obj["flattened_tensor"]
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in obj["metadata"]]


def test_tensor_posts_one_payload_per_server_tp_rank_that_unpickles_to_the_tensors(tied_bf16, fake_server):
    received = {}

    def receive(body):
        # Read while the sender waits: the shared-memory tensors live as long as the request.
        assert body["load_format"] == "flattened_bucket"
        for name, t in _rebuild_flat(_unpickle(body["serialized_named_tensors"][0])):
            received[name] = t.clone()
        return {"success": True}

    tp2 = fake_server(routes={"/server_info": {"tp_size": 2}, "/update_weights_from_tensor": receive})
    tp1 = fake_server(routes={"/server_info": {"tp_size": 1}})
    servers, ctx = _setup(tied_bf16, [tp2.url, tp1.url, _dead_url()])
    weights = _weights(ctx.shapes)
    buckets = _buckets(weights)
    stats = build_transport("tensor", ctx).sync(buckets, version=3, seen=set(), servers=servers)
    _assert_equal(received, _sent(weights))
    bodies = tp2.bodies("/update_weights_from_tensor")
    assert len(bodies) == len(buckets) == stats["buckets"]
    # One payload per tp rank (on CPU both are the same shared-memory handles).
    assert all(len(b["serialized_named_tensors"]) == 2 and b["serialized_named_tensors"][0] ==
               b["serialized_named_tensors"][1] and b["load_format"] == "flattened_bucket" and b["flush_cache"] is False
               for b in bodies)
    assert [len(b["serialized_named_tensors"]) for b in tp1.bodies("/update_weights_from_tensor")] == [1] * len(buckets)
    # The payload of one server's bucket is the other's too.
    assert [b["serialized_named_tensors"][0] for b in bodies] == [
        b["serialized_named_tensors"][0] for b in tp1.bodies("/update_weights_from_tensor")]
    assert servers[2].state == DEAD and stats["complete"]     # no /server_info from it: marked and left out


# ---------------------------------------------------------------------------------------------------- distributed


class _GroupMember:
    """The server side of the 'distributed' transport, in a server thread of this process: joins the group as
    sglang's init_custom_process_group does (the same store prefixes as torch's _new_process_group_helper), and
    receives each broadcast tensor in the order of the metadata."""

    def __init__(self, info: dict | None = None):
        self.pg = None
        self.buckets = 0
        self.received: dict[str, torch.Tensor] = {}
        self.info = {"tp_size": 1, **(info or {})}

    def routes(self) -> dict:
        return {"/server_info": self.info, "/init_weights_update_group": self.join,
                "/update_weights_from_distributed": self.receive, "/destroy_weights_update_group": self.leave}

    def join(self, body):
        from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

        timeout = timedelta(seconds=60)
        store = TCPStore(body["master_address"], body["master_port"], body["world_size"], is_master=False,
                         timeout=timeout)
        name = body["group_name"]
        store = PrefixStore("cpu/", PrefixStore(f"{name}/", PrefixStore(name, store)))
        self.pg = ProcessGroupGloo(store, body["rank_offset"], body["world_size"], timeout)
        return {"success": True}

    def receive(self, body):
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        assert body["load_format"] == "flattened_bucket"
        # sglang's FlattenedTensorBucket.empty: the offsets from the names, dtypes and shapes alone, back to back.
        sizes = [torch.Size(shape).numel() * getattr(torch, dtype).itemsize
                 for dtype, shape in zip(body["dtypes"], body["shapes"], strict=True)]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        self.pg.broadcast([flat], opts).wait()
        start = 0
        for name, dtype, shape, size in zip(body["names"], body["dtypes"], body["shapes"], sizes, strict=True):
            self.received[name] = flat[start:start + size].view(getattr(torch, dtype)).reshape(shape)
            start += size
        self.buckets += 1
        return {"success": True}

    def leave(self, body):
        self.pg = None
        return {"success": True}


def test_distributed_broadcasts_every_tensor_to_a_group_member(tied_bf16, fake_server):
    member = _GroupMember()
    up = fake_server(routes=member.routes())
    servers, ctx = _setup(tied_bf16, [up.url, _dead_url()])   # master address chosen: every server is local
    transport = DistributedTransport(ctx, backend="gloo")
    assert transport.device == "cpu"
    try:
        weights = _weights(ctx.shapes)
        stats = transport.sync(_buckets(weights), version=1, seen=set(), servers=servers)
        _assert_equal(member.received, _sent(weights))
        assert stats["complete"] and stats["buckets"] == len(_buckets(weights))
        (init,) = up.bodies("/init_weights_update_group")
        assert {k: init[k] for k in ("master_address", "rank_offset", "world_size", "backend")} == {
            "master_address": "127.0.0.1", "rank_offset": 1, "world_size": 2, "backend": "gloo"}
        assert servers[1].state == DEAD            # did not answer /server_info: left out of the group
        metadata = up.bodies("/update_weights_from_distributed")
        assert [n for m in metadata for n in m["names"]] == list(_sent(weights))
        assert {d for m in metadata for d in m["dtypes"]} == {"bfloat16"}
        assert all(m["group_name"] == init["group_name"] and m["flush_cache"] is False for m in metadata)
        # The next sync reuses the group.
        again = _weights(ctx.shapes, seed=2)
        transport.sync(_buckets(again), version=2, seen=set(), servers=[servers[0]])
        _assert_equal(member.received, _sent(again))
        assert len(up.bodies("/init_weights_update_group")) == 1
    finally:
        transport.close()
    assert up.bodies("/destroy_weights_update_group") == [{"group_name": init["group_name"]}]
    assert transport.pg is None


def test_distributed_sync_under_torchrun_hosts_its_own_store(tied_bf16, fake_server, monkeypatch):
    """torchrun sets TORCHELASTIC_USE_AGENT_STORE=True; torch's tcp:// rendezvous then makes even rank 0 a client
    of a store nobody hosts on the sync's port (the sync hung on SLURM jobs). The transport hosts its own."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    member = _GroupMember()
    up = fake_server(routes=member.routes())
    servers, ctx = _setup(tied_bf16, [up.url], master_address="127.0.0.1")
    transport = DistributedTransport(ctx, backend="gloo", timeout_s=20)   # fails in 20 s instead of hanging
    try:
        weights = _weights(ctx.shapes)
        assert transport.sync(_buckets(weights), version=1, seen=set(), servers=servers)["complete"]
        _assert_equal(member.received, _sent(weights))
    finally:
        transport.close()


def test_cpu_servers_get_a_gloo_group_even_when_this_process_sees_a_gpu(tied_bf16, fake_server, monkeypatch):
    """SGLang servers launched with --device cpu (their /server_info says device 'cpu') can only join a gloo
    group: NCCL has no CPU transport. The backend follows the servers, not this process's GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    member = _GroupMember({"device": "cpu"})
    up = fake_server(routes=member.routes())
    servers, ctx = _setup(tied_bf16, [up.url], master_address="127.0.0.1")
    transport = DistributedTransport(ctx, timeout_s=20)        # the backend is left to the servers
    try:
        weights = _weights(ctx.shapes)
        assert transport.sync(_buckets(weights), version=1, seen=set(), servers=servers)["complete"]
        _assert_equal(member.received, _sent(weights))
        assert up.bodies("/init_weights_update_group")[0]["backend"] == "gloo" == transport.backend
        assert transport.device == "cpu"
    finally:
        transport.close()


@pytest.mark.parametrize("cuda, devices, forced, want", [
    (True, {"a": "cpu", "b": "cpu"}, None, "gloo"),
    (True, {"a": "cuda", "b": "cuda"}, None, "nccl"),
    (False, {"a": "cpu"}, None, "gloo"),
    (True, {"a": None}, None, "nccl"),            # a server that does not say: this process's device
    (False, {"a": None}, None, "gloo"),
    (True, {"a": "cuda", "b": "cpu"}, "gloo", "gloo"),
    (True, {"a": "cuda"}, "gloo", "gloo"),
])
def test_the_sync_backend_follows_the_servers_device(monkeypatch, cuda, devices, forced, want):
    from megatron_entcov.rollout.sglang.transports import choose_sync_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert choose_sync_backend(devices, forced) == want


@pytest.mark.parametrize("cuda, devices, forced, match", [
    (True, {"http://a:1": "cpu"}, "nccl", r"backend='nccl' was asked for, but server\(s\) \['http://a:1'\] run on "
                                          r"the CPU \(--device cpu\) and NCCL has no CPU transport"),
    (False, {"http://a:1": "cuda"}, None, r"the servers run on GPUs \(NCCL\), but this process sees no GPU .* "
                                          r"run the trainer on a GPU, or set rollout.sglang.sync_method=disk"),
    (False, {"http://a:1": "cpu"}, "nccl", r"backend='nccl' was asked for, but server"),
    (True, {"http://a:1": "cpu", "http://b:2": "cuda"}, None,
     r"servers \['http://a:1'\] run on the CPU and servers \['http://b:2'\] on GPUs; one group needs one backend"),
    (True, {"http://a:1": "cpu"}, "mpi", r"backend='mpi' is invalid: choose one of 'gloo', 'nccl'"),
    (True, {}, None, "no servers"),
])
def test_an_impossible_sync_backend_is_refused_naming_the_servers(monkeypatch, cuda, devices, forced, match):
    from megatron_entcov.rollout.sglang.transports import choose_sync_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(ValueError, match=match):
        choose_sync_backend(devices, forced)


def test_the_config_offers_exactly_the_transports_there_are(tied_bf16):
    import typing

    from megatron_entcov.config import SGLangConfig
    from megatron_entcov.rollout.sglang.transports import SYNC_METHODS

    assert typing.get_args(typing.get_type_hints(SGLangConfig)["sync_method"]) == SYNC_METHODS
    _, ctx = _setup(tied_bf16, [])
    with pytest.raises(ValueError, match=r"rollout.sglang.sync_method='nfs' is invalid: choose one of 'disk'"):
        build_transport("nfs", ctx)
