"""policy/offload.py's host buffers on a GPU: one per storage, page-locked (cudaHostRegister) at its exact size,
reused over offload/reload cycles, outside torch's pinned cache (which would round each one up to a power of two
and keep it); the values come back bit for bit. Skipped without CUDA (CPU CI); the allocation count on CPU is
tests/unit/policy/test_offload.py."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _pinned_cache_bytes() -> int:
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()
    return int(stats.get("allocated_bytes.current", 0))


def test_offload_pins_each_storage_once_at_its_exact_size_and_restores_it_bit_for_bit():
    from megatron_entcov.policy.offload import TrainerOffload

    torch.manual_seed(0)
    # Sizes far from powers of two: a rounded pinned block would show as pinned_bytes > the storages' bytes.
    model = torch.nn.Sequential(torch.nn.Linear(1000, 3000), torch.nn.Linear(3000, 700)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1000, device="cuda")).square().mean().backward()
    opt.step()
    off = TrainerOffload([model], opt, enabled=True)
    kept = list(model.parameters()) + [v for s in opt.state.values() for v in s.values() if v.dim() > 0]
    exact = sum(t.numel() * t.element_size() for t in kept)
    cache_before = _pinned_cache_bytes()
    buffers = None
    for cycle in range(3):
        before = [t.detach().clone() for t in kept]
        off.offload(weights=False)
        off.offload(weights=True)
        host = [m.host for moved in off._moved.values() for m in moved if m.host is not None]
        assert all(h.is_pinned() for h in host), cycle
        ptrs = sorted(h.data_ptr() for h in host)
        assert buffers is None or ptrs == buffers, "the host buffers were allocated again"
        buffers = ptrs
        off.reload()
        assert all(torch.equal(a, b) for a, b in zip(before, kept)), cycle
        with torch.no_grad():
            for t in kept:
                t.add_(1.0)                             # new values each cycle: a stale copy would show
    assert off.pinned_bytes == exact
    assert _pinned_cache_bytes() == cache_before, "torch's pinned cache grew"
