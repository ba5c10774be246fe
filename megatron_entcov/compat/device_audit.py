"""A simulated accelerator on CPU: catches host tensors that would meet device tensors on a GPU.

Armed (``ENTCOV_DEVICE_AUDIT=1``, read by ``parallel.init_parallel``), this module tracks where each tensor
*would* live on a GPU machine and raises :class:`DevicePlacementError` at the first operation that would fail
there: ``ps.device`` becomes :data:`AUDIT_DEVICE`; :class:`DeviceAudit` (a ``TorchFunctionMode``) marks results
``"device"`` or ``"host"`` and raises when a device tensor meets a host tensor of one or more dimensions;
:mod:`megatron_entcov.distributed.collectives` requires :func:`placement` ``"device"`` of every tensor it hands
to a process group, and a ``torch.distributed`` collective called straight from any other module of this
package raises. It costs a Python call per torch operation: for tests, never for training runs.

Example:
    ENTCOV_DEVICE_AUDIT=1 python -m megatron_entcov train configs/quickstart.yaml

Design notes (the marking rules, what it cannot see): docs/design/compat.md
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["AUDIT_DEVICE", "DeviceAudit", "DevicePlacementError", "armed", "arm", "disarm", "active",
           "placement", "mark", "current_device"]

ENV = "ENTCOV_DEVICE_AUDIT"

AUDIT_DEVICE = torch.device("cpu")
"""The simulated accelerator: a CPU device object told apart from every other one by identity."""

_ATTR = "_entcov_placement"
_DEVICE_GETTER = torch._C.TensorBase.__dict__["device"]
_MOVES = {"to", "cuda", "cpu", "copy_", "type", "new_tensor", "set_"}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
"""The calls CUDA lets take host index tensors (index_select, masked_fill and the like do not)."""
_NO_HOST_SCALARS = {"cat", "stack", "concat", "concatenate", "hstack", "vstack", "where"}
"""Calls that refuse even a 0-dim host tensor next to device tensors (elementwise ops accept one)."""
_TO_HOST = {"numpy", "__array__"}
"""Reading a device tensor as numpy: CUDA tensors must be copied with .cpu() first."""
_HOST_FACTORIES = {"from_numpy", "as_tensor", "tensor", "frombuffer"}


class DevicePlacementError(RuntimeError):
    """A host tensor met a device tensor (or a process group) where a GPU run would fail."""


def armed() -> bool:
    """Whether this process asked for the audit (``ENTCOV_DEVICE_AUDIT=1``)."""
    return os.environ.get(ENV, "") not in ("", "0")


_mode: "DeviceAudit | None" = None


def active() -> bool:
    """Whether the audit is running in this process now."""
    return _mode is not None


def arm() -> None:
    """Start auditing every torch call of this process (idempotent; ``parallel.init_parallel`` calls it)."""
    global _mode
    if torch.cuda.is_available():
        raise RuntimeError(f"{ENV}=1 simulates a GPU on a CPU-only machine; on a GPU machine the real device "
                           "does the checking: unset it")
    if _mode is None:
        _mode = DeviceAudit()
        _mode.__enter__()
        torch._C._nn._parse_to = _parse_to_keeping_identity
        for name in _GUARDED:
            setattr(torch.distributed, name, _guarded(name, _REAL_COLLECTIVES[name]))


def disarm() -> None:
    """Stop auditing (``parallel.destroy_parallel`` calls it)."""
    global _mode
    if _mode is not None:
        mode, _mode = _mode, None
        mode.__exit__(None, None, None)
        torch._C._nn._parse_to = _REAL_PARSE_TO
        for name in _GUARDED:
            setattr(torch.distributed, name, _REAL_COLLECTIVES[name])


_REAL_PARSE_TO = torch._C._nn._parse_to

_GUARDED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather", "scatter", "reduce",
            "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
            "batch_isend_irecv", "barrier", "broadcast_object_list", "all_gather_object", "gather_object",
            "scatter_object_list")
"""isend/irecv are left alone: torch.distributed.P2POp (Megatron's pipeline) accepts them by identity."""
_REAL_COLLECTIVES = {name: getattr(torch.distributed, name) for name in _GUARDED
                     if hasattr(torch.distributed, name)}
_GUARDED = tuple(_REAL_COLLECTIVES)
_OWNER = "megatron_entcov.distributed.collectives"


def _guarded(name: str, real):
    def call(*args, **kwargs):
        frame = sys._getframe(1)
        module = frame.f_globals.get("__name__", "")
        if module.startswith("megatron_entcov") and module != _OWNER:
            raise DevicePlacementError(
                f"{module} (line {frame.f_lineno}) calls torch.distributed.{name} directly, past the device check "
                f"of megatron_entcov/distributed/collectives.py; call collectives.{name} (host metadata: reduce_values)")
        return real(*args, **kwargs)
    call.__wrapped__ = real
    return call


def _parse_to_keeping_identity(*args, **kwargs):
    # Module.to parses its arguments into a new torch.device, which would lose the simulated device's identity.
    device, *rest = _REAL_PARSE_TO(*args, **kwargs)
    asked = kwargs.get("device", args[0] if args else None)
    if asked is AUDIT_DEVICE:
        device = AUDIT_DEVICE
    return (device, *rest)


def current_device():
    """What the CPU compat layer answers for ``torch.cuda.current_device()``: the simulated device when armed."""
    return AUDIT_DEVICE if active() else torch.device("cpu")


def placement(t: torch.Tensor) -> str | None:
    """'device', 'host' or None (not seen being made) for a tensor under the audit."""
    return getattr(t, _ATTR, None)


def mark(t, where: str):
    """Mark ``t`` (a tensor, or tensors nested in lists/tuples/dicts) as living on ``where``."""
    for leaf in tree_flatten(t)[0]:
        if isinstance(leaf, torch.Tensor):
            try:
                setattr(leaf, _ATTR, where)
            except (AttributeError, RuntimeError):   # some C++-owned results refuse attributes: stay unjudged
                pass
    return t


def _where_of_device(device) -> str:
    if device is AUDIT_DEVICE:
        return "device"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "device"
    if isinstance(device, str) and device.startswith("cuda"):
        return "device"
    return "host"


def _target_of_move(name: str, args, kwargs, current: str | None) -> str | None:
    if name == "cpu":
        return "host"
    if name == "cuda":
        return "device"
    if name in ("copy_", "set_", "type"):
        return current
    if name == "new_tensor":
        return current if "device" not in kwargs else _where_of_device(kwargs["device"])
    # Tensor.to(device | dtype | tensor, ...)
    if "device" in kwargs:
        return _where_of_device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            return placement(a)
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return _where_of_device(a)
    return current


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _describe(t: torch.Tensor) -> str:
    return f"{placement(t)} tensor {tuple(t.shape)} {t.dtype}"


class DeviceAudit(TorchFunctionMode):
    """The torch-function mode behind :func:`arm`: marks results, refuses host/device mixes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "__get__" and getattr(func, "__self__", None) is _DEVICE_GETTER:
            out = func(*args, **kwargs)
            return AUDIT_DEVICE if placement(args[0]) == "device" else out
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        places = [placement(t) for t in tensors]
        if name in _TO_HOST and places and places[0] == "device":
            raise DevicePlacementError(f"{name}: {_describe(tensors[0])} read as numpy; on a GPU this fails (can't "
                                       "convert a CUDA tensor to numpy). Copy it with .cpu() first")
        if name in _MOVES:
            where = _target_of_move(name, args, kwargs, places[0] if places else None)
        else:
            self._refuse_mix(name, args, tensors, places)
            if "device" in kwargs:
                where = _where_of_device(kwargs["device"])
            elif "device" in places:
                where = "device"
            elif "host" in places or not tensors or name in _HOST_FACTORIES:
                where = "host"
            else:
                where = None
        out = func(*args, **kwargs)
        if name in _MOVES and out is args[0] and where != (places[0] if places else None) \
                and not isinstance(out, torch.nn.Parameter):
            # On a GPU a move makes a new tensor and leaves the original where it was; on CPU ``.to`` returns
            # the input itself. Copy, so a discarded ``x.to(ps.device)`` still leaves ``x`` on the host.
            # (Module.to moves parameters in place on every device: they keep their identity.)
            out = out.clone()
        if where is not None:
            mark(out, where)
        return out

    @staticmethod
    def _refuse_mix(name, args, tensors, places) -> None:
        if "device" not in places or "host" not in places:
            return
        judged = tensors
        if name in _INDEXING and args and isinstance(args[0], torch.Tensor):
            # CUDA accepts host index tensors and masks; the indexed tensor and a value must match.
            judged = [args[0]] + [a for a in args[2:] if isinstance(a, torch.Tensor)]
        host = [t for t in judged if placement(t) == "host" and (t.dim() > 0 or name in _NO_HOST_SCALARS)]
        device = [t for t in judged if placement(t) == "device"]
        if host and device:
            raise DevicePlacementError(
                f"{name}: {_describe(host[0])} meets {_describe(device[0])}; on a GPU this fails (tensors on "
                "different devices). Move the host tensor with .to(ps.device) where it is made, or build it "
                "with device=ps.device")
