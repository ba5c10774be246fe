"""compat/cpu.py: each fix is scoped to the megatron module it names and leaves torch itself untouched.
(The fixes' end-to-end effect — megatron-core layouts, training and dist checkpoints on CPU — is tested in
tests/distributed/test_megatron_cpu.py.)"""

import importlib

import pytest
import torch

from megatron_entcov.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only fixes")


def test_apply_patches_named_modules_only():
    cpu.apply()
    cpu.apply()  # idempotent
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    assert isinstance(schedules.torch, cpu._CpuTorch)
    # torch itself is untouched: CUDA spellings still fail outside the patched modules.
    assert torch.cuda.is_available() is False
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    # Inside a patched module, device="cuda" factories and current_device() land on the CPU.
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.cuda.synchronize() is None
    assert schedules.torch.Tensor is torch.Tensor


def test_scoped_tensor_methods_are_restored():
    cpu.apply()
    from megatron.core.optimizer import clip_grads

    before = torch.Tensor.type
    seen = {}

    def probe(*args, **kwargs):
        seen["type"] = torch.ones(1).type()
        return None

    wrapped = cpu._scoped_tensor_methods(probe, {"type": cpu._cpu_tensor_type})
    wrapped()
    assert seen["type"] == "torch.cuda.FloatTensor"
    assert torch.Tensor.type is before and torch.ones(1).type() == "torch.FloatTensor"
    # A conversion (not a query) is never renamed.
    assert clip_grads.clip_grad_by_total_norm_fp32._entcov_cpu_wrapped


def test_rng_tracker_forks_cpu_streams():
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("a", 11)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork("a"):
        x1 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the default stream"
    with tracker.fork("a"):
        x2 = torch.rand(3)
    assert not torch.equal(x1, x2), "the forked stream advances across forks"
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), x1), "stream 'a' is seeded with its seed"
    with pytest.raises(Exception, match="already exists"):
        tracker.add("b", 11)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("zzz"):
            pass


def test_refuses_with_cuda(monkeypatch):
    monkeypatch.setattr(cpu, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CPU-only"):
        cpu.apply()


def test_distributed_optimizer_constructor_sees_cuda_type_names():
    """The distributed optimizer sorts its params by ``param.type()`` against the CUDA names in its constructor
    (else "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ..."): the whole constructor
    runs in the scope, and Tensor.type is restored when it raises."""
    cpu.apply()
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    seen = {}

    class Stop(Exception):
        pass

    class ProbeConfig:  # the constructor reads its config first
        def __getattr__(self, name):
            seen["type"] = torch.ones(1).type()
            raise Stop(name)

    before = torch.Tensor.type
    with pytest.raises(Stop):
        DistributedOptimizer(None, ProbeConfig(), None, None, [], {}, None, None, 0, 0)
    assert seen["type"] == "torch.cuda.FloatTensor"
    assert torch.Tensor.type is before and torch.ones(1).type() == "torch.FloatTensor"
