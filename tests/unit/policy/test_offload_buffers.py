"""policy/offload.py on CPU, without Megatron: a model and a torch Adam whose weights, Adam moments and gradient
buffer go to the host and back over several cycles. Each storage gets ONE host buffer, allocated at its first
offload and reused (torch's pinned-memory cache rounds every allocation up to a power of two and never gives it
back, so fresh buffers per step would pin up to twice the offloaded bytes); the reloaded values are the originals,
bit for bit, every cycle, also after the values changed between cycles. (The whole trainer with offload:
tests/distributed/test_offload.py; pinned buffers on a GPU: tests/gpu/test_offload_pinned_gpu.py.)"""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from megatron_entcov.policy import offload as offload_mod
from megatron_entcov.policy.offload import TrainerOffload


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p)            # Megatron's gradient buffers, one storage each here
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, opt, seed)
    return model, opt


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(100 + seed)
    model(torch.randn(5, 8, generator=g)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    for p in model.parameters():
        p.main_grad.normal_(generator=g)


def _snapshot(model, opt):
    state = [v.clone() for s in opt.state.values() for v in s.values() if v.dim() > 0]
    return [p.detach().clone() for p in model.parameters()], state


def _host_allocations(monkeypatch) -> list[int]:
    """The byte sizes of the host buffers offload.py allocates (torch.empty calls from that module, > 0 bytes)."""
    sizes, real = [], torch.empty

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == offload_mod.__name__ and out.numel() > 0:
            sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "empty", counting)
    return sizes


def test_one_host_buffer_per_storage_reused_over_cycles_and_values_bit_identical(monkeypatch):
    model, opt = _model_and_optimizer()
    off = TrainerOffload([model], opt, enabled=True)
    sizes = _host_allocations(monkeypatch)
    weights = list(model.parameters())
    moments = [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
    kept = weights + moments                                    # copied to the host; gradients are only freed
    for cycle in range(4):
        before_w, before_s = _snapshot(model, opt)
        off.offload(weights=False)
        off.offload(weights=True)
        assert all(t.untyped_storage().nbytes() == 0 for t in kept)
        assert off.host_bytes == sum(t.numel() * t.element_size() for t in kept)
        off.reload()
        after_w, after_s = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before_w + before_s, after_w + after_s)), cycle
        assert all(torch.equal(p.main_grad, torch.zeros_like(p)) for p in weights)
        assert off.host_bytes == 0
        # One allocation per kept storage, all of them in the first cycle, none after it.
        assert sorted(sizes) == sorted(t.numel() * t.element_size() for t in kept), (cycle, sizes)
        _step(model, opt, seed=cycle + 1)                       # new values: a stale host copy would show
    assert off.pinned_bytes == sum(sizes)


def test_a_storage_whose_size_changed_gets_a_new_buffer_and_a_dropped_one_frees_its_buffer(monkeypatch):
    model, opt = _model_and_optimizer()
    off = TrainerOffload([model], opt, enabled=True)
    sizes = _host_allocations(monkeypatch)
    off.offload(weights=True)
    off.reload()
    first = list(sizes)
    moment = next(v for s in opt.state.values() for v in s.values() if v.dim() > 0)
    grown = moment.untyped_storage()
    grown.resize_(grown.nbytes() * 2)                           # same storage, twice the bytes
    marker = torch.arange(grown.nbytes(), dtype=torch.uint8)
    torch.empty(0, dtype=torch.uint8).set_(grown).copy_(marker)
    off.offload(weights=True)
    off.reload()
    assert sizes == first + [grown.nbytes()]                    # only the grown storage was re-allocated
    assert torch.equal(torch.empty(0, dtype=torch.uint8).set_(grown), marker)
    held = off.pinned_bytes
    # A storage no tensor holds any more (e.g. optimizer state replaced) gives its buffer back.
    for s in opt.state.values():
        for k, v in list(s.items()):
            if v.dim() > 0:
                s[k] = v.clone()
    del moment, grown, v                                         # the last old state tensor too
    off.offload(weights=False)
    off.reload()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if v.dim() > 0)
    assert off.pinned_bytes == weight_bytes + state_bytes < held + state_bytes


def test_disabled_offload_allocates_nothing(monkeypatch):
    model, opt = _model_and_optimizer()
    off = TrainerOffload([model], opt, enabled=False)
    sizes = _host_allocations(monkeypatch)
    off.offload(weights=True)
    off.reload()
    assert sizes == [] and off.pinned_bytes == 0 and off.offloaded == ()


@pytest.mark.parametrize("register_error", [0, 2])
def test_pinned_buffers_are_registered_page_locked_memory_of_the_exact_size(monkeypatch, register_error):
    """The CUDA branch on CPU: cudaHostRegister is faked; a buffer is registered once, at its exact size, and
    unregistered when it is dropped; a failed registration falls back to torch's pinned allocator."""
    calls = []

    class _Cudart:
        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
            calls.append(("register", ptr, size))
            return register_error

        def cudaHostUnregister(self, ptr):  # noqa: N802
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: _Cudart())
    fallback = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            fallback.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    buf = offload_mod._host_buffer(1000, pin=True)
    gc.collect()                                                # nothing unregisters a buffer still in use
    assert buf.numel() == 1000 and buf.dtype == torch.uint8
    if register_error:
        assert calls == [("register", calls[0][1], 1000)] and fallback == [(1000,)]
    else:
        assert calls == [("register", buf.data_ptr(), 1000)] and fallback == []
        ptr = buf.data_ptr()
        del buf
        gc.collect()
        assert calls[-1] == ("unregister", ptr)
