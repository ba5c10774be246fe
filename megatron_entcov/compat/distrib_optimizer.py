"""What megatron-core (0.16.x)'s distributed optimizer needs when it steps with torch's own Adam.

Without Transformer Engine or apex, ``DistributedOptimizer`` wraps ``torch.optim.AdamW``, whose ``step`` count
lives in each parameter's state; Megatron's code for that case (``HAVE_APEX_OR_TE = False``) breaks checkpoint
resumes. Each fix wraps one method of ``DistributedOptimizer``, acts only in that torch-Adam case (``apply()`` is
a no-op otherwise) and is covered by ``tests/distributed/test_distributed_optimizer.py``:
 1. ``__init__`` ends by allocating the state as torch's Adam would at its first step (step 0, zero moments),
    so ``state_dict()`` of a fresh optimizer no longer fails ``assert len(steps) == 1``; the first update is
    bit-for-bit unchanged.
 2. after ``load_state_dict()`` every parameter gets its own ``step`` tensor holding the checkpoint's step
    (Megatron's shared tensor held the fresh optimizer's step and advanced once per parameter per update).
The CPU-only part (the constructor's CUDA type names) is fix 6 of ``compat/cpu.py``.

Design notes: docs/design/compat.md
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["apply", "is_applied", "allocate_adam_state", "restore_adam_steps"]

_APPLIED = False


def _uses_torch_adam(opt) -> bool:
    """A DistributedOptimizer that owns parameters and steps them with torch's Adam/AdamW (AdamW subclasses
    Adam) over its own buffers (Megatron FSDP keeps its optimizer state another way)."""
    fsdp = getattr(getattr(opt, "ddp_config", None), "use_megatron_fsdp", False)
    return not getattr(opt, "is_stub_optimizer", True) and not fsdp and isinstance(
        getattr(opt, "optimizer", None), torch.optim.Adam)


def _fresh_adam_state(param: torch.Tensor) -> dict:
    """The state torch's Adam (non-fused, non-capturable, no amsgrad) creates at a parameter's first step."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # as torch's Adam
    return {"step": torch.tensor(0.0, dtype=scalar),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


def allocate_adam_state(opt) -> None:
    """Fix 1: give every parameter of ``opt``'s inner torch Adam the state its first step would create."""
    inner = opt.optimizer
    for group in inner.param_groups:
        if group.get("fused") or group.get("capturable") or group.get("amsgrad"):
            raise ValueError(f"compat.distrib_optimizer: the distributed optimizer's torch Adam has "
                             f"fused={group.get('fused')}, capturable={group.get('capturable')}, "
                             f"amsgrad={group.get('amsgrad')}, whose state fix 1 does not pre-build; megatron-core "
                             "0.16 builds it with all three off: extend _fresh_adam_state for the newer version")
        for p in group["params"]:
            if not inner.state[p]:
                inner.state[p] = _fresh_adam_state(p)


def restore_adam_steps(opt, state_dict: dict) -> None:
    """Fix 2: one step tensor per parameter, holding the loaded param-group step (the checkpoint's)."""
    groups = (state_dict.get("optimizer") or {}).get("param_groups") or []
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) != 1:
        return  # nothing to restore (a state dict without the torch-Adam step)
    step = float(steps.pop())
    for state in opt.optimizer.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = torch.tensor(step, dtype=old.dtype, device=old.device)


def _after_init(orig):
    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if _uses_torch_adam(self):
            allocate_adam_state(self)

    return __init__


def _after_load(orig):
    @functools.wraps(orig)
    def load_state_dict(self, state_dict):
        orig(self, state_dict)
        if _uses_torch_adam(self):
            restore_adam_steps(self, state_dict)

    return load_state_dict


def is_applied() -> bool:
    return _APPLIED


def apply() -> None:
    """Install both fixes (idempotent). A no-op when megatron-core found TE's or apex's FusedAdam."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer import distrib_optimizer as d

    if d.HAVE_APEX_OR_TE:
        logger.debug("compat.distrib_optimizer: megatron-core uses a fused Adam; nothing to fix")
    else:
        cls = d.DistributedOptimizer
        cls.__init__ = _after_init(cls.__init__)
        cls.load_state_dict = _after_load(cls.load_state_dict)
    _APPLIED = True
