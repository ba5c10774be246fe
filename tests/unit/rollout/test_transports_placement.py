"""Where the SGLang weight transports send things (rollout/sglang/transports.py), on CPU:

- 'tensor' on GPUs: each server tp rank gets its own payload, built from a copy of the bucket on that rank's GPU
  (``base_gpu_id + tp_rank * gpu_id_step`` from ``/server_info``). The GPU copy and the CUDA-IPC serializer are
  replaced by recording fakes (``place``, ``serialize`` parameters); the rest is the real transport against
  fake servers. The device-index -> UUID rewrite of the real serializer is checked on torch's own argument
  layout.
- 'distributed': the master address the servers are told, from the local loopback (real look-ups) and with
  fake look-ups for servers on another host.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle

import pytest
import torch
from dist_utils import TRANSPORT_MODEL_FIELDS

from megatron_entcov.config import ModelConfig, SGLangConfig
from megatron_entcov.rollout.sglang.pool import Server, ServerPool
from megatron_entcov.rollout.sglang.transports import (
    TensorTransport,
    TransportContext,
    choose_master_address,
    expected_shapes,
    route_address,
    serialize_cuda_ipc,
    server_gpu_ids,
)

TINY = dict(TRANSPORT_MODEL_FIELDS, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------------- tensor


class _OnGpu:
    """A fake GPU copy: the tensor and the GPU it was placed on."""

    def __init__(self, gpu: int, tensor: torch.Tensor):
        self.gpu, self.tensor = gpu, tensor


def _fakes():
    placed, serialized = [], []

    def place(payload, gpu):
        # A flattened bucket (load_format 'flattened_bucket'): one flat tensor to place, the metadata as it is.
        placed.append((gpu, [m.name for m in payload["metadata"]]))
        return {**payload, "flattened_tensor": _OnGpu(gpu, payload["flattened_tensor"].clone())}

    def serialize(payload):
        serialized.append(payload)
        flat = payload["flattened_tensor"]
        # What sglang's FlattenedTensorBucket.reconstruct_tensors gives the server rank.
        return json.dumps([[m.name, flat.gpu, flat.tensor[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)
                            .float().flatten().tolist()] for m in payload["metadata"]])

    return place, serialize, placed, serialized


def _context(urls):
    cfg = ModelConfig(**TINY, params_dtype="bfloat16")
    servers = [Server(url=u, index=i) for i, u in enumerate(urls)]
    pool = ServerPool(servers, launch=None, max_restarts=0, startup_timeout_s=5, is_current=lambda s: True)
    return servers, TransportContext(model_cfg=cfg, pool=pool, shapes=expected_shapes(cfg))


def test_each_server_rank_gets_a_payload_of_tensors_on_its_own_gpu(fake_server):
    # Server A: tp 2 from GPU 0 (GPU 0 is also the trainer's); server B: tp 2 from GPU 2, every other GPU.
    a = fake_server(routes={"/server_info": {"tp_size": 2, "base_gpu_id": 0, "gpu_id_step": 1}})
    b = fake_server(routes={"/server_info": {"tp_size": 2, "base_gpu_id": 2, "gpu_id_step": 2}})
    servers, ctx = _context([a.url, b.url])
    place, serialize, placed, serialized = _fakes()
    transport = TensorTransport(ctx, place=place, serialize=serialize)
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(shape, generator=g) for n, shape in ctx.shapes.items()}
    items = list(weights.items())
    buckets = [items[i:i + 3] for i in range(0, len(items), 3)]

    stats = transport.sync(buckets, version=1, seen=set(), servers=servers)

    assert stats["complete"] and stats["buckets"] == len(buckets)
    for server, gpus in ((a, [0, 1]), (b, [2, 4])):
        bodies = server.bodies("/update_weights_from_tensor")
        assert len(bodies) == len(buckets)
        for body, bucket in zip(bodies, buckets):
            payloads = body["serialized_named_tensors"]
            assert len(payloads) == len(gpus)                     # one per tp rank
            for rank, (payload, gpu) in enumerate(zip(payloads, gpus)):
                got = json.loads(payload)
                assert [n for n, _, _ in got] == [n for n, _ in bucket], (server.url, rank)
                assert {g for _, g, _ in got} == {gpu}, f"{server.url} tp rank {rank}: tensors on GPUs " \
                                                        f"{ {g for _, g, _ in got} }, expected GPU {gpu}"
                for (name, _, values), (_, t) in zip(got, bucket):
                    # In the model dtype (bfloat16), as the server loads it.
                    assert values == t.to(torch.bfloat16).float().flatten().tolist(), name
    # One copy per GPU and bucket, whichever servers and ranks use it; one serialization per rank.
    per_bucket = len(placed) // len(buckets)
    assert sorted(gpu for gpu, _ in placed[:per_bucket]) == [0, 1, 2, 4]
    assert len(placed) == 4 * len(buckets) and len(serialized) == 4 * len(buckets)


def test_server_gpu_ids_follow_sglangs_placement():
    assert server_gpu_ids({"tp_size": 4, "base_gpu_id": 4}, "u") == [4, 5, 6, 7]
    assert server_gpu_ids({"tp_size": 2, "base_gpu_id": 1, "gpu_id_step": 3}, "u") == [1, 4]
    assert server_gpu_ids({}, "u") == [0]
    with pytest.raises(ValueError, match=r"pp_size=2 over nnodes=1.*rollout.sglang.sync_method"):
        server_gpu_ids({"tp_size": 2, "pp_size": 2}, "http://s:1")


def test_a_pipelined_server_is_refused_before_anything_is_sent(fake_server):
    up = fake_server(routes={"/server_info": {"tp_size": 2, "pp_size": 2}})
    servers, ctx = _context([up.url])
    place, serialize, placed, _ = _fakes()
    with pytest.raises(ValueError, match=r"--pp-size 1"):
        TensorTransport(ctx, place=place, serialize=serialize).sync([], version=1, seen=set(), servers=servers)
    assert up.bodies("/update_weights_from_tensor") == [] and placed == []


def test_cuda_handles_name_the_device_by_uuid():
    """The rewrite sglang's monkey_patch_torch_reductions applies, on the argument tuple torch builds for a
    CUDA tensor (rebuild_cuda_tensor's 7th argument is the device index)."""
    import inspect

    from torch.multiprocessing import reductions

    from megatron_entcov.rollout.sglang.tensor_transport import _with_device_uuid

    assert list(inspect.signature(reductions.rebuild_cuda_tensor).parameters)[6] == "storage_device"
    args = tuple(range(6)) + (3, "handle", 99)
    assert _with_device_uuid(reductions.rebuild_cuda_tensor, args, lambda i: f"GPU-uuid-{i}") == \
        tuple(range(6)) + ("GPU-uuid-3", "handle", 99)
    host = (reductions.rebuild_tensor, ("cls", "storage", "metadata"))
    assert _with_device_uuid(*host, lambda i: "unused") == host[1]
    with pytest.raises(RuntimeError, match=r"where the CUDA device index was expected"):
        _with_device_uuid(reductions.rebuild_cuda_tensor, tuple(range(6)) + ("GPU-x",), str)


def test_the_cuda_serializer_leaves_host_tensors_as_shared_memory():
    import torch.multiprocessing as tmp

    tmp.set_sharing_strategy("file_system")
    bucket = [("w", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(2, dtype=torch.bfloat16))]
    got = pickle.loads(base64.b64decode(serialize_cuda_ipc(bucket)))
    assert [n for n, _ in got] == ["w", "b"]
    assert all(torch.equal(t, want) and t.dtype == want.dtype for (_, t), (_, want) in zip(got, bucket))
    assert pickle.loads(base64.b64decode(TensorTransport.serialize(bucket)))[0][0] == "w"


# ---------------------------------------------------------------------------------------------------- address


def test_servers_on_the_loopback_get_the_loopback():
    assert choose_master_address(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    assert route_address("127.0.0.1") == "127.0.0.1"
    # A loopback address set for local servers is kept: it reaches them.
    assert choose_master_address(["http://127.0.0.1:30000"], "127.0.1.1") == "127.0.1.1"
    assert choose_master_address(["http://127.0.0.1:30000"], "10.9.8.7") == "10.9.8.7"


def _remote(route=None, hostname=None):
    """Fake look-ups: 'node2' is another host; ``route`` / ``hostname`` are what the look-ups find."""
    return dict(is_this_host=lambda h: h != "node2", route=lambda h: route, hostname_address=lambda: hostname)


def test_a_server_on_another_host_gets_the_address_of_the_route_to_it(caplog):
    urls = ["http://127.0.0.1:30000", "http://node2:30000"]
    assert choose_master_address(urls, **_remote(route="10.1.2.3", hostname="127.0.1.1")) == "10.1.2.3"
    assert choose_master_address(urls, None, **_remote(route=None, hostname="10.4.4.4")) == "10.4.4.4"
    assert choose_master_address(urls, "10.9.8.7", **_remote(route="10.1.2.3")) == "10.9.8.7"   # as set
    # A loopback address (Debian's 127.0.1.1 for the host name) cannot be reached from node2: replaced.
    with caplog.at_level(logging.WARNING, logger="megatron_entcov.rollout.sglang.transports"):
        assert choose_master_address(urls, "127.0.1.1", **_remote(route="10.1.2.3")) == "10.1.2.3"
    assert "127.0.1.1 is a loopback address, unreachable from server node2" in caplog.text
    assert "rollout.sglang.sync_master_addr" in caplog.text


@pytest.mark.parametrize("route", [None, "127.0.0.1"])
def test_no_reachable_address_for_a_remote_server_names_the_config_field(route):
    with pytest.raises(ValueError, match=r"server node2 is on another host.*this host's name resolves to "
                                         r"127\.0\.1\.1\): set rollout\.sglang\.sync_master_addr"):
        choose_master_address(["http://node2:30000"], **_remote(route=route, hostname="127.0.1.1"))
    with pytest.raises(ValueError, match=r"has no host"):
        choose_master_address(["node2:30000"])


def test_an_unresolvable_server_host_is_not_taken_for_this_host():
    from megatron_entcov.rollout.sglang.transports import _is_this_host

    assert _is_this_host("127.0.0.1") and _is_this_host("localhost")
    assert not _is_this_host("no-such-host.invalid")


def test_the_config_field_is_checked():
    assert SGLangConfig(sync_method="distributed", sync_master_addr="10.0.0.5").sync_master_addr == "10.0.0.5"
    SGLangConfig(sync_method="distributed", sync_master_addr="fe80::1")              # IPv6 is fine
    for bad in ("10.0.0.5:29500", "http://node1", "node 1"):
        with pytest.raises(ValueError, match=r"rollout.sglang.sync_master_addr=.* is invalid: must be an IP address"):
            SGLangConfig(sync_method="distributed", sync_master_addr=bad)
    with pytest.raises(ValueError, match=r"applies to rollout.sglang.sync_method=distributed \(got 'disk'\)"):
        SGLangConfig(sync_master_addr="10.0.0.5")
