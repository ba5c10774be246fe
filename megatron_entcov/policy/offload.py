"""Trainer state off the GPU while colocated SGLang servers use it (``rollout.sglang.release_memory``).

After the optimizer steps it frees the gradient buffers and moves the optimizer state (fp32 master weights,
Adam moments) to pinned host memory; while the servers generate it moves the model weights out too; before
training everything comes back. Tensors keep their identity: each storage is shrunk to zero bytes and regrown
in place, so the views Megatron keeps stay valid; weights and optimizer state come back bit for bit, gradients
zeroed. Reading an offloaded tensor is undefined: reload first. When and in which order is policy/colocation.py's.

Example:
    offload = TrainerOffload(actor.chunks, actor.optimizer, enabled=cfg.rollout.sglang.release_memory)
    offload.offload(weights=False)     # after the optimizer steps: gradients + optimizer state
    offload.offload(weights=True)      # while the servers generate: the weights too
    offload.reload()                   # before the next forward
Design notes: docs/design/trainer.md
"""

from __future__ import annotations

import logging

import torch

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


class _Moved:
    """One storage that lives on the host while offloaded (``host`` is None for a freed gradient buffer)."""

    def __init__(self, tensor: torch.Tensor, keep: bool):
        self.storage = tensor.untyped_storage()
        self.nbytes = self.storage.nbytes()
        self.device = tensor.device
        self.host = None
        if keep:
            pin = self.device.type == "cuda"
            self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
            self.host.copy_(self._bytes(), non_blocking=pin)

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

    @property
    def offloaded(self) -> tuple[str, ...]:
        """What is off the device now: a subset of ('grads', 'optimizer', 'weights')."""
        return tuple(self._moved)

    @property
    def host_bytes(self) -> int:
        """Bytes of trainer state held on the host now."""
        return sum(m.nbytes for moved in self._moved.values() for m in moved if m.host is not None)

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
            self._moved[name] = [_Moved(t, keep) for t in mine]
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
