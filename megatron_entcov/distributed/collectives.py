"""Every collective this package issues goes through here, and here is where the device is decided.

NCCL takes CUDA tensors only, gloo (our CPU runs) host tensors. Model tensors (logits statistics, covariance
sums, weight shards) are already on ``ps.device``: :func:`all_reduce`, :func:`broadcast`, :func:`all_gather`,
:func:`gather`, :func:`send` and :func:`recv` check that and raise
:class:`~megatron_entcov.compat.device_audit.DevicePlacementError` naming the call. Host metadata (failure flags,
cursors, token counts, metric vectors): :func:`reduce_values` moves it to the group's device, reduces and hands
back a host tensor. Object collectives (:func:`broadcast_object_list`, :func:`all_gather_object`,
:func:`gather_object`) pickle on the host.

Example:
    failed = reduce_values([1.0 if error else 0.0], op="max")        # any backend, host in and out
    all_reduce(sum_xy, group=ps.dp_group)                             # sum_xy on ps.device

Design notes: docs/design/distributed.md
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_entcov.compat import device_audit
from megatron_entcov.compat.device_audit import DevicePlacementError

__all__ = ["group_device", "is_distributed", "all_reduce", "broadcast", "all_gather", "gather", "send", "recv",
           "barrier", "reduce_values", "broadcast_object_list", "all_gather_object", "gather_object",
           "DevicePlacementError"]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed(group=None) -> bool:
    """A process group exists and has more than one rank (collectives are no-ops otherwise)."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def group_device(group=None) -> torch.device:
    """Where tensors for ``group`` must live: the simulated device under the audit, this rank's CUDA device for
    NCCL, the host for gloo."""
    if device_audit.active():
        return device_audit.AUDIT_DEVICE
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check(t: torch.Tensor, group, call: str) -> None:
    if device_audit.active():
        where = device_audit.placement(t)
        if where != "device":
            raise DevicePlacementError(
                f"{call}: a {where or 'unplaced'} tensor {tuple(t.shape)} {t.dtype} goes to a device process "
                "group (NCCL on GPUs takes CUDA tensors only). Build it on ps.device, or pass host metadata "
                "through collectives.reduce_values")
        return
    backend = dist.get_backend(group)
    if backend == "nccl" and not t.is_cuda:
        raise DevicePlacementError(f"{call}: host tensor {tuple(t.shape)} {t.dtype} given to an NCCL group; build "
                                   "it on ps.device, or pass host metadata through collectives.reduce_values")
    if backend == "gloo" and t.is_cuda:
        raise DevicePlacementError(f"{call}: CUDA tensor {tuple(t.shape)} given to a gloo group; gloo groups carry "
                                   "host tensors here (use the NCCL group, or .cpu() it)")


def _op(op):
    if isinstance(op, str):
        try:
            return _OPS[op]
        except KeyError:
            raise ValueError(f"reduce op {op!r} is not one of {sorted(_OPS)}") from None
    return op


def _audit(*tensors: torch.Tensor, call: str) -> None:
    # Under the device audit, call sites are judged even in one process (where nothing is communicated).
    if device_audit.active():
        for t in tensors:
            _check(t, None, call)


def all_reduce(t: torch.Tensor, *, group=None, op="sum") -> torch.Tensor:
    """In-place all-reduce of a tensor on the group's device; returns ``t``."""
    _audit(t, call="all_reduce")
    if is_distributed(group):
        _check(t, group, "all_reduce")
        dist.all_reduce(t, op=_op(op), group=group)
    return t


def broadcast(t: torch.Tensor, *, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src``; returns ``t``."""
    _audit(t, call="broadcast")
    if is_distributed(group):
        _check(t, group, "broadcast")
        dist.broadcast(t, src=src, group=group)
    return t


def all_gather(out: list[torch.Tensor], t: torch.Tensor, *, group=None) -> list[torch.Tensor]:
    """``out[i]`` = rank i's ``t`` (all on the group's device)."""
    _audit(t, *out, call="all_gather")
    if not is_distributed(group):
        out[0].copy_(t)
        return out
    for x in (t, *out):
        _check(x, group, "all_gather")
    dist.all_gather(out, t, group=group)
    return out


def gather(t: torch.Tensor, out: list[torch.Tensor] | None, *, dst: int, group=None) -> None:
    """Rank ``dst`` (global) receives every rank's ``t`` into ``out``; other ranks pass ``out=None``."""
    _audit(t, *(out or ()), call="gather")
    if not is_distributed(group):
        if out is not None:
            out[0].copy_(t)
        return
    for x in (t, *(out or ())):
        _check(x, group, "gather")
    dist.gather(t, out, dst=dst, group=group)


def send(t: torch.Tensor, *, dst: int, group=None) -> None:
    """Blocking send to global rank ``dst``."""
    _check(t, group, "send")
    dist.send(t, dst=dst, group=group)


def recv(t: torch.Tensor, *, src: int, group=None) -> torch.Tensor:
    """Blocking receive from global rank ``src`` into ``t``; returns ``t``."""
    _check(t, group, "recv")
    dist.recv(t, src=src, group=group)
    return t


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def reduce_values(values: torch.Tensor | Sequence[float], *, group=None, op="sum",
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reduce host metadata over ``group`` on any backend: a host tensor (``dtype``) in the shape of ``values``.

    The values travel through the group's device (NCCL cannot reduce host tensors); the result comes back to
    the host. Use it for flags, counts, cursors and metric vectors, never for model tensors."""
    host = torch.as_tensor(values, dtype=dtype, device="cpu")
    if not is_distributed(group):
        return host.clone()
    buf = host.to(group_device(group), copy=True)     # never the caller's tensor, whatever the backend
    all_reduce(buf, group=group, op=op)
    return buf.cpu()


def broadcast_object_list(objects: list, *, src: int, group=None) -> list:
    """In-place broadcast of picklable objects from global rank ``src``."""
    if is_distributed(group):
        dist.broadcast_object_list(objects, src=src, group=group)
    return objects


def all_gather_object(out: list, obj: Any, *, group=None) -> list:
    if not is_distributed(group):
        out[0] = obj
        return out
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_object(obj: Any, out: list | None, *, dst: int, group=None) -> None:
    if not is_distributed(group):
        if out is not None:
            out[0] = obj
        return
    dist.gather_object(obj, out, dst=dst, group=group)
