"""Trainer state off the GPU while colocated SGLang servers use it (``rollout.sglang.release_memory``).

After the optimizer steps it frees the gradient buffers and moves the optimizer state (fp32 master weights,
Adam moments) to pinned host memory; while the servers generate it moves the model weights out too; before
training everything comes back. Tensors keep their identity: each storage is shrunk to zero bytes and regrown
in place, so the views Megatron keeps stay valid; weights and optimizer state come back bit for bit, gradients
zeroed. Reading an offloaded tensor is undefined: reload first. When and in which order is policy/colocation.py's.
Each storage has one host buffer for the run, page-locked at its exact size on a GPU (docs/design/policy.md).

Example:
    offload = TrainerOffload(actor.chunks, actor.optimizer, enabled=cfg.rollout.sglang.release_memory)
    offload.offload(weights=False)     # after the optimizer steps: gradients + optimizer state
    offload.offload(weights=True)      # while the servers generate: the weights too
    offload.reload()                   # before the next forward
Design notes: docs/design/trainer.md, docs/design/policy.md (host buffers)
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["TrainerOffload"]

logger = logging.getLogger(__name__)


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device, s.data_ptr(), s.nbytes())


def _unique_storages(tensors) -> list[torch.Tensor]:
    """One tensor per distinct non-empty storage (views of one buffer share it)."""
    seen, out = set(), []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's (chained, mixed-precision, distributed) optimizer."""
    if optimizer is None:
        return []
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in _torch_optimizers(c)]
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return [inner]
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    raise TypeError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")


def _unregister(ptr: int) -> None:
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err:
        logger.warning("offload: cudaHostUnregister of a host buffer failed (cudaError %d)", err)


def _host_buffer(nbytes: int, *, pin: bool) -> torch.Tensor:
    """A uint8 host buffer of exactly ``nbytes``; ``pin``: page-locked with cudaHostRegister (unregistered when its
    storage dies), or, where registering fails, from torch's pinned allocator (rounded up to a power of two)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or not nbytes:
        return buf
    err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
    if err:
        logger.warning("offload: cudaHostRegister of %d bytes failed (cudaError %d); using torch's pinned memory "
                       "(rounded up to a power of two)", nbytes, err)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    # Unregister before the memory is freed, and never after the CUDA context is gone (as torch's own staging of
    # checkpoints does, torch/distributed/checkpoint/_state_dict_stager.py).
    weakref.finalize(buf.untyped_storage(), _unregister, buf.data_ptr()).atexit = False
    return buf


class _Moved:
    """One storage that lives on the host while offloaded (``host`` is None for a freed gradient buffer)."""

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor | None):
        self.storage = tensor.untyped_storage()
        self.nbytes = self.storage.nbytes()
        self.device = tensor.device
        self.host = host
        if host is not None:
            host.copy_(self._bytes(), non_blocking=self.device.type == "cuda")

    def _bytes(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=self.device).set_(self.storage)

    def free(self) -> None:
        self.storage.resize_(0)

    def restore(self) -> None:
        self.storage.resize_(self.nbytes)
        view = self._bytes()
        if self.host is None:
            view.zero_()
        else:
            view.copy_(self.host, non_blocking=self.device.type == "cuda")


class TrainerOffload:
    """Frees the trainer's GPU memory around rollouts and brings it back, bit for bit, before training."""

    def __init__(self, chunks, optimizer, *, enabled: bool):
        self.chunks, self.optimizer, self.enabled = chunks, optimizer, enabled
        self._moved: dict[str, list[_Moved]] = {}
        # Device storage -> its host buffer, for the run: an entry goes with its storage (weak keys).
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @property
    def offloaded(self) -> tuple[str, ...]:
        """What is off the device now: a subset of ('grads', 'optimizer', 'weights')."""
        return tuple(self._moved)

    @property
    def host_bytes(self) -> int:
        """Bytes of trainer state held on the host now."""
        return sum(m.nbytes for moved in self._moved.values() for m in moved if m.host is not None)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the host buffers kept for reuse (page-locked on a GPU), offloaded or not."""
        return sum(buf.numel() for buf in self._host.values())

    def _host_for(self, t: torch.Tensor) -> torch.Tensor:
        """The host buffer of ``t``'s storage: the one from earlier steps, or a new one at the first offload or
        when the storage's size changed."""
        storage = t.untyped_storage()
        buf = self._host.get(storage)
        if buf is None or buf.numel() != storage.nbytes():
            self._host.pop(storage, None)                   # the old buffer goes before the new one comes
            buf = self._host[storage] = _host_buffer(storage.nbytes(), pin=t.device.type == "cuda")
        return buf

    def _weights(self) -> list[torch.Tensor]:
        return [p for c in self.chunks for p in c.parameters()]

    def _grads(self) -> list[torch.Tensor]:
        out = []
        for c in self.chunks:
            # Megatron DDP's lists of param-and-grad buffers (``buffers`` is a method on a plain nn.Module).
            bufs = [b for attr in ("buffers", "expert_parallel_buffers")
                    for b in (getattr(c, attr, None) if isinstance(getattr(c, attr, None), (list, tuple)) else ())]
            out += [b.grad_data for b in bufs if getattr(b, "grad_data", None) is not None]
        out += [p.main_grad for p in self._weights() if getattr(p, "main_grad", None) is not None]
        return out

    def _optimizer_state(self) -> list[torch.Tensor]:
        out = []
        for opt in _torch_optimizers(self.optimizer):
            for group in opt.param_groups:
                out += [p for p in group["params"]]
            for state in opt.state.values():
                out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return out

    def offload(self, *, weights: bool) -> None:
        """Free the gradient buffers and move the optimizer state (and, with ``weights``, the model weights) to
        the host; then return the cached device blocks to the driver. Idempotent per part."""
        if not self.enabled:
            return
        parts = [("grads", self._grads, False), ("optimizer", self._optimizer_state, True)]
        if weights:
            parts.append(("weights", self._weights, True))
        # The weights stay for the weight sync unless asked for, also where the optimizer holds them (fp32 runs:
        # its parameters are the model's, or views of the distributed optimizer's buffer of them).
        weight_keys = {_storage_key(t) for t in _unique_storages(self._weights())}
        for name, tensors, keep in parts:
            if name in self._moved:
                continue
            mine = [t for t in _unique_storages(tensors()) if not self._claimed(t)
                    and (name == "weights" or _storage_key(t) not in weight_keys)]
            self._moved[name] = [_Moved(t, self._host_for(t) if keep else None) for t in mine]
        if torch.cuda.is_available():
            torch.cuda.synchronize()          # the host copies are complete before the storages go
        for moved in self._moved.values():
            for m in moved:
                if m.storage.nbytes():
                    m.free()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _claimed(self, t: torch.Tensor) -> bool:
        key = _storage_key(t)
        return any((m.device, m.storage.data_ptr(), m.nbytes) == key for moved in self._moved.values()
                   for m in moved)

    def reload(self, parts: tuple[str, ...] | None = None) -> None:
        """The offloaded ``parts`` (default: all) back on the device: weights and optimizer state as they were,
        gradient buffers zeroed."""
        names = [n for n in self._moved if parts is None or n in parts]
        if not names:
            return
        for name in names:
            for m in self._moved.pop(name):
                m.restore()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
