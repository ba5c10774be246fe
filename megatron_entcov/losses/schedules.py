"""Coefficient annealing: the value of a loss coefficient at an optimizer step.

Owns the arithmetic behind :class:`megatron_entcov.config.ScheduleConfig` for each entropy-control coefficient
(``clip_cov_ratio``, ``kl_cov_ratio``, ``kl_cov_coef``, ``entropy_coef``, ``high_entropy_ratio``,
``entropy_advantage_coef``). With ``p = (step - start_step) /
steps`` clamped to [0, 1]: constant ``base``; linear ``base + (end - base) p``; cosine ``end + (base - end)
(1 + cos(pi p)) / 2``; exponential ``base (end / base) ** p``. Before ``start_step`` the value is ``base``;
from ``start_step + steps`` on it is exactly ``end``. Values are Python floats computed on the host from the
step counter: no device work, no synchronisation.

Design notes (why anneal, and to 0): docs/design/losses.md
"""

from __future__ import annotations

import logging
import math

from megatron_entcov.config import LossConfig, ScheduleConfig

logger = logging.getLogger(__name__)

__all__ = ["value", "annealed_coefficients", "ANNEALED_COEFFICIENTS", "METHOD_COEFFICIENTS"]

ANNEALED_COEFFICIENTS = ("clip_cov_ratio", "kl_cov_ratio", "kl_cov_coef", "entropy_coef")
"""LossConfig fields that have a ``<name>_schedule``, reported (coef/<name>) for every loss."""
METHOD_COEFFICIENTS = {"high_entropy_ratio": lambda cfg: cfg.name == "high_entropy_tokens",
                       "entropy_advantage_coef": lambda cfg: cfg.entropy_advantage_coef > 0}
"""The token-entropy family's annealed fields (losses/token_entropy.py), reported only while their method is on
(so the coef/* tags of the other losses stay as they were)."""


def value(base: float, schedule: ScheduleConfig, step: int) -> float:
    """The annealed value of a coefficient at an optimizer step.

    Args:
        base: the coefficient's value before annealing (the LossConfig field).
        schedule: its ScheduleConfig.
        step: optimizer step counter (0-based, the same counter the trainer passes to policy_loss).

    Returns:
        float; ``base`` before ``schedule.start_step``, ``schedule.end`` (exactly) after the schedule ends.
    """
    if step < 0:
        raise ValueError(f"step={step!r} is invalid: must be >= 0")
    kind = schedule.kind
    if kind == "constant" or step <= schedule.start_step:
        return float(base)
    p = (step - schedule.start_step) / schedule.steps
    if p >= 1.0:
        # Return `end` itself so that a schedule annealed to 0 gives exactly 0 (no token is then chosen).
        return float(schedule.end)
    end = schedule.end
    if kind == "linear":
        return base + (end - base) * p
    if kind == "cosine":
        return end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "exponential":
        if base <= 0 or end <= 0:
            raise ValueError(f"exponential schedule needs base > 0 and end > 0, got base={base}, end={end}")
        return base * (end / base) ** p
    raise ValueError(f"schedule.kind={kind!r} is invalid: choose one of constant, linear, cosine, exponential")


def annealed_coefficients(cfg: LossConfig, step: int) -> dict[str, float]:
    """Every annealed coefficient of ``cfg`` at ``step``: {name: value} for ANNEALED_COEFFICIENTS and the
    METHOD_COEFFICIENTS whose method is on."""
    names = [*ANNEALED_COEFFICIENTS, *(name for name, on in METHOD_COEFFICIENTS.items() if on(cfg))]
    return {name: value(getattr(cfg, name), getattr(cfg, f"{name}_schedule"), step) for name in names}
