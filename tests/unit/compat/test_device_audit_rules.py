"""The device audit judges tensors as a GPU machine would (megatron_entcov/compat/device_audit.py), and the collective
helper refuses what NCCL would refuse (megatron_entcov/distributed/collectives.py). Each case below is a bug a CPU run
cannot otherwise see; each is checked to raise, and its correct form to pass."""

import pytest
import torch
import torch.nn.functional as F

from megatron_entcov.compat import device_audit
from megatron_entcov.compat.device_audit import AUDIT_DEVICE, DevicePlacementError, placement
from megatron_entcov.distributed import collectives


@pytest.fixture
def audit():
    device_audit.arm()
    try:
        yield
    finally:
        device_audit.disarm()


def test_host_ids_into_a_device_model_raise(audit):
    emb = torch.nn.Embedding(8, 4).to(AUDIT_DEVICE)          # Module.to: parameters move in place
    assert placement(emb.weight) == "device"
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(DevicePlacementError, match="embedding: host tensor \\(1, 3\\)"):
        emb(ids)
    out = emb(ids.to(AUDIT_DEVICE))
    assert placement(out) == "device" and out.device is AUDIT_DEVICE


def test_a_discarded_move_leaves_the_tensor_on_the_host(audit):
    x = torch.ones(3)
    x.to(AUDIT_DEVICE)                                        # on a GPU this copy is thrown away
    w = torch.ones(3, device=AUDIT_DEVICE)
    with pytest.raises(DevicePlacementError, match="add|mul"):
        w * x
    assert placement(w * x.to(AUDIT_DEVICE)) == "device"


def test_what_cuda_accepts_passes(audit):
    w = torch.arange(6.0, device=AUDIT_DEVICE).reshape(2, 3)
    assert placement(w * torch.tensor(2.0)) == "device"       # a 0-dim host scalar
    idx = torch.tensor([1, 0])
    assert torch.equal(w[idx], w.flip(0))                     # host index tensors
    assert placement(torch.zeros(2, device=w.device)) == "device"   # device= taken from a device tensor
    assert placement(w.new_zeros(2)) == "device"
    host = w.cpu()
    assert placement(host) == "host" and placement(host + 1) == "host"
    assert placement(w.to(torch.float64)) == "device"        # a dtype change stays put


def test_what_cuda_refuses_raises(audit):
    w = torch.arange(6.0, device=AUDIT_DEVICE).reshape(2, 3)
    with pytest.raises(DevicePlacementError, match="index_select"):
        w.index_select(0, torch.tensor([1, 0]))               # CUDA takes no host index here (only [] indexing)
    with pytest.raises(DevicePlacementError, match="masked_fill"):
        w.masked_fill(torch.tensor([[True, False, True], [False, True, False]]), 0.0)
    with pytest.raises(DevicePlacementError, match="stack"):
        torch.stack([w[0, 0], torch.tensor(1.0)])             # not even a 0-dim host tensor
    with pytest.raises(DevicePlacementError, match="numpy: device tensor \\(2, 3\\).*\\.cpu\\(\\) first"):
        w.numpy()
    assert w.cpu().numpy().shape == (2, 3)


def test_collectives_refuse_host_tensors_under_the_audit(audit):
    with pytest.raises(DevicePlacementError, match="all_reduce: a host tensor \\(2,\\)"):
        collectives.all_reduce(torch.zeros(2))
    collectives.all_reduce(torch.zeros(2, device=AUDIT_DEVICE))
    # Host metadata goes through reduce_values, which places it itself and hands back a host tensor.
    out = collectives.reduce_values([3.0, 1.0], op="max")
    assert out.tolist() == [3.0, 1.0] and placement(out) == "host"


def test_old_pack_call_fails_and_the_device_argument_is_required(audit):
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.rollout.types import Sample

    s = Sample(prompt_ids=[1, 2], response_ids=[3], rollout_logprobs=[-0.5], finish_reason="stop",
               weight_version=0, index=0)
    with pytest.raises(TypeError, match="device"):
        rows_from_samples([s], torch.zeros(1), pad_id=0, sample_ids=[0], key_stride=4)
    host = rows_from_samples([s], torch.zeros(1), pad_id=0, sample_ids=[0], key_stride=4, device="cpu")
    on_device = rows_from_samples([s], torch.zeros(1), pad_id=0, sample_ids=[0], key_stride=4, device=AUDIT_DEVICE)
    emb = torch.nn.Embedding(8, 4).to(AUDIT_DEVICE)
    with pytest.raises(DevicePlacementError):
        emb(host.input_ids)
    assert placement(emb(on_device.input_ids)) == "device"


def test_disarm_restores_torch():
    real = torch._C._nn._parse_to
    device_audit.arm()
    device_audit.disarm()
    assert torch._C._nn._parse_to is real and not device_audit.active()
    x = torch.ones(2)
    assert placement(x) is None and F.relu(x).sum() == 2


def test_helper_checks_backends_without_the_audit(monkeypatch):
    # On a GPU machine: NCCL takes CUDA tensors only, gloo host tensors only.
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(DevicePlacementError, match="host tensor \\(2,\\) torch.float32 given to an NCCL group"):
        collectives._check(torch.zeros(2), None, "all_reduce")
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "gloo")
    collectives._check(torch.zeros(2), None, "all_reduce")


def test_unknown_reduce_op_is_named():
    with pytest.raises(ValueError, match="'mean' is not one of"):
        collectives._op("mean")


def test_a_direct_collective_from_the_package_raises_naming_the_caller(audit):
    # Code in a megatron_entcov module (not collectives.py) that calls torch.distributed itself.
    namespace = {"__name__": "megatron_entcov.somewhere", "torch": torch}
    exec("def sum_flags(t):\n    torch.distributed.all_reduce(t)\n", namespace)
    with pytest.raises(DevicePlacementError, match=r"megatron_entcov.somewhere \(line 2\) calls "
                                                   r"torch.distributed.all_reduce directly.*collectives.all_reduce"):
        namespace["sum_flags"](torch.zeros(1, device=AUDIT_DEVICE))
    # The same call from outside the package (here: a test) goes to torch as it is.
    assert torch.distributed.all_reduce.__wrapped__ is device_audit._REAL_COLLECTIVES["all_reduce"]


def test_disarm_restores_the_collectives():
    real = torch.distributed.all_reduce
    device_audit.arm()
    assert torch.distributed.all_reduce is not real
    device_audit.disarm()
    assert torch.distributed.all_reduce is real
