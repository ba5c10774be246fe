"""The weight sync's sending side (rollout/sglang/staging.py, transport_base.py): the pipeline sends in order with
a bounded number in flight and stops at the first failure; the staging ring never hands out a buffer a server
may still read; a server that dies mid-sync drops out while the others get every byte; 'only_changed' leaves out
exactly the tensors whose bytes did not change, and a server that applies what it received holds the trainer's
weights bit for bit. The 'tensor' transport against fake servers that rebuild its payloads as SGLang does."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from dist_utils import TRANSPORT_MODEL_FIELDS
from test_sglang_transports import _buckets, _dead_url, _rebuild_flat, _sent, _setup, _unpickle, _weights

from megatron_entcov.config import ModelConfig
from megatron_entcov.rollout.sglang.pool import DEAD, LIVE, STALE
from megatron_entcov.rollout.sglang.staging import FlatBucket, SendPipeline, StagingRing
from megatron_entcov.rollout.sglang.transport_base import ChangeFilter
from megatron_entcov.rollout.sglang.transports import build_transport, expected_shapes


@pytest.fixture(scope="module")
def tied_bf16():
    """A tied model in bfloat16 (as test_sglang_transports.py's): float32 inputs are cast, lm_head.weight dropped."""
    cfg = ModelConfig(**TRANSPORT_MODEL_FIELDS, tie_word_embeddings=True, params_dtype="bfloat16")
    return cfg, expected_shapes(cfg)

# ------------------------------------------------------------------------------------------------ pipeline


def test_the_pipeline_sends_in_order_with_at_most_depth_in_flight():
    gate, started, done = threading.Event(), [], []

    def send(item):
        started.append(item)
        gate.wait(10)
        done.append(item)

    pipe = SendPipeline(send, depth=1)
    pipe.submit(0)                                  # in flight
    t = threading.Thread(target=pipe.submit, args=(1,))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and started == [0]          # the second waits for the first: one in flight
    gate.set()
    t.join(10)
    pipe.finish()
    assert done == [0, 1]


def test_the_pipeline_raises_the_first_failure_and_sends_nothing_after_it():
    sent = []

    def send(item):
        if item == 1:
            raise OSError("server gone")
        sent.append(item)

    pipe = SendPipeline(send, depth=2)
    pipe.submit(0)
    pipe.submit(1)
    with pytest.raises(OSError, match="server gone"):
        for item in range(2, 6):
            pipe.submit(item)
        pipe.finish()
    pipe.close()
    assert sent == [0]


def test_the_staging_ring_reuses_a_buffer_only_after_the_bucket_before_it_was_sent():
    ring = StagingRing(2, lambda n: torch.empty(n, dtype=torch.uint8))
    a = ring.current(10)
    assert ring.current(8) is a                     # not advanced: an empty bucket leaves it current
    ring.advance()
    b = ring.current(10)
    ring.advance()
    assert b is not a and ring.current(10) is a     # two buffers in turn
    ring.advance()
    assert ring.current(100) is not b and ring.current(100).numel() == 100    # grown for a larger bucket
    assert ring.held_bytes == 10 + 100


def test_a_flat_bucket_holds_each_tensor_cast_once_at_packed_offsets():
    g = torch.Generator().manual_seed(0)
    tensors = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g)[::2]), ("c", torch.randn(2))]
    fb = FlatBucket(torch.empty(64, dtype=torch.uint8), torch.bfloat16)
    for name, t in tensors:
        fb.add(name, t)
    assert [m.start_idx for m in fb.metadata()] == [0, 30, 38] and fb.nbytes == 42
    for (name, got), (_, t) in zip(fb.tensors(), tensors, strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), name
    fb.drop_last()
    assert fb.names == ["a", "b"] and fb.nbytes == 38
    with pytest.raises(ValueError, match=r"'d' \(60 bytes\) does not fit the staging buffer"):
        fb.add("d", torch.zeros(30))


# ------------------------------------------------------------------------------------------------ tensor sync


class _TensorServer:
    """A fake 'tensor' server holding a model: applies what each /update_weights_from_tensor rebuilds (as SGLang's
    flattened-bucket loader does) to its copy; optionally dies at its ``die_at``-th bucket."""

    def __init__(self, fake_server, die_at: int | None = None, refuse_at: int | None = None):
        self.model: dict[str, torch.Tensor] = {}
        self.calls, self.die_at, self.refuse_at = 0, die_at, refuse_at
        self.fake = fake_server(routes={"/update_weights_from_tensor": self.load})

    def load(self, body):
        self.calls += 1
        if self.calls == self.die_at:
            threading.Thread(target=self.fake.stop).start()
            raise ConnectionError("the server process died")
        if self.calls == self.refuse_at:
            return {"success": False, "message": "out of memory"}
        assert body["load_format"] == "flattened_bucket"
        for name, t in _rebuild_flat(_unpickle(body["serialized_named_tensors"][0])):
            self.model[name] = t.clone()
        return {"success": True}


def test_a_server_that_dies_mid_sync_drops_out_and_the_others_get_every_byte(tied_bf16, fake_server):
    ok, dying = _TensorServer(fake_server), _TensorServer(fake_server, die_at=2)
    servers, ctx = _setup(tied_bf16, [ok.fake.url, dying.fake.url])
    weights = _weights(ctx.shapes)
    stats = build_transport("tensor", ctx).sync(_buckets(weights, size=2), version=1, seen=set(), servers=servers)
    assert ok.model.keys() == _sent(weights).keys()
    assert all(torch.equal(ok.model[n], t) for n, t in _sent(weights).items())
    assert servers[0].state == LIVE and servers[1].state == DEAD and dying.calls == 2
    assert stats["complete"] and stats["buckets"] == len(_buckets(weights, size=2)) > 4


def test_a_refused_bucket_fails_the_sync_sends_nothing_after_it_and_drains_the_producer(tied_bf16, fake_server):
    from test_sglang_transports import _producer

    refusing = _TensorServer(fake_server, refuse_at=2)
    servers, ctx = _setup(tied_bf16, [refusing.fake.url])
    buckets, consumed = _buckets(_weights(ctx.shapes), size=2), []
    transport = build_transport("tensor", ctx)
    with pytest.raises(RuntimeError, match="out of memory"):
        transport.sync(_producer(buckets, consumed), version=1, seen=set(), servers=servers)
    assert refusing.calls == 2                       # the bucket packed meanwhile was not sent
    for _ in _producer(buckets[len(consumed) - 1:], []):
        pass
    assert servers[0].state == LIVE


# ------------------------------------------------------------------------------------------------ only_changed


def test_only_changed_sends_exactly_the_changed_tensors_and_the_server_holds_the_trainers(tied_bf16, fake_server):
    server = _TensorServer(fake_server)
    servers, ctx = _setup(tied_bf16, [server.fake.url], only_changed=True)
    transport = build_transport("tensor", ctx)
    weights, seen = _weights(ctx.shapes), set()          # the engine's names ever sent

    def sync(w, version):
        before = dict(server.model)
        server.model.clear()
        stats = transport.sync(_buckets(w), version=version, seen=seen, servers=servers)
        received = dict(server.model)
        server.model.update({n: t for n, t in before.items() if n not in received})
        return stats, received

    stats, received = sync(weights, 1)
    assert stats["skipped_tensors"] == 0 and received.keys() == _sent(weights).keys()     # the first is full
    transport.commit()
    changed = dict(weights)
    names = [n for n in changed if n != "lm_head.weight"]
    for n in names[1::3]:
        changed[n] = changed[n] + 1e-2
    # One bit of one element: the digest sees it.
    flipped = changed[names[0]].to(torch.bfloat16)
    flipped.view(-1).view(torch.int16)[5] += 1
    changed[names[0]] = flipped.float()
    stats, received = sync(changed, 2)
    want = {n for n in names if not torch.equal(changed[n].to(torch.bfloat16), weights[n].to(torch.bfloat16))}
    assert set(received) == want and names[0] in want and stats["complete"]
    assert stats["skipped_tensors"] == len(names) - len(want)
    assert all(torch.equal(server.model[n], t) for n, t in _sent(changed).items())        # bit for bit

    # Not committed (the engine's version check did not pass): the next sync is full.
    stats, received = sync(changed, 3)
    assert stats["skipped_tensors"] == 0 and received.keys() == _sent(changed).keys()
    transport.commit()
    stats, _ = sync(changed, 4)
    assert stats["skipped_tensors"] == len(names)
    transport.commit()
    # A restarted (stale) server gets everything.
    servers[0].state = STALE
    stats, received = sync(changed, 5)
    assert stats["skipped_tensors"] == 0 and received.keys() == _sent(changed).keys()


def test_disk_never_leaves_tensors_out(tied_bf16, fake_server, tmp_path):
    up = fake_server()
    servers, ctx = _setup(tied_bf16, [up.url], sync_dir=str(tmp_path), only_changed=True)
    transport = build_transport("disk", ctx)
    weights = _weights(ctx.shapes)
    for version in (1, 2):
        stats = transport.sync(_buckets(weights), version=version, seen=set(), servers=servers)
        transport.commit()
        assert stats["skipped_tensors"] == 0 and stats["tensors"] == len(weights) - 1


def test_the_change_filter_is_off_unless_asked():
    f = ChangeFilter(False)
    f.start([])
    assert not f.unchanged("w", torch.zeros(3)) and f.pending == {}
    assert _dead_url().startswith("http://127.0.0.1:")
