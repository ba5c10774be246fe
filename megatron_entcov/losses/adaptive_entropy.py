"""Adaptive entropy control toward a target entropy (Skywork-OR1, He et al. 2025, arXiv 2505.22312).

Owns the coefficient's state and its update rule, as the report's "adaptive entropy control" states it: with
target entropy tgt, step Delta and c_0 (loss.target_entropy, target_entropy_delta, target_entropy_coef_init),
at optimizer step k with mean token entropy e_k of the step's mini-batch

    alpha_k = c_k * I[e_k <= tgt]                         (the entropy loss acts only below the target)
    c_{k+1} = max(0, c_k + Delta)  if e_k < tgt;  max(0, c_k - Delta)  if e_k > tgt;  c_k if e_k == tgt

and the loss is L_pg - alpha_k * H. Released: tgt = 0.2, Delta = 0.005, c_0 = 0. e_k is the exact global token
mean (ops.covariance.masked_global_mean over the data-parallel group, fixed-point: the same bits on every
layout) of the entropy the selection phase sees (the current policy's); alpha_k is a tensor, so the loss path
has no host synchronisation. The update is one host sync per optimizer step (the config asks for it); every
rank (pipeline stages without a loss included) takes the same c_{k+1}, so the checkpointed state
(``state_dict``, written by rank 0 into trainer_state.json) resumes the trajectory bit for bit.

Example:
    control = AdaptiveEntropyCoef.from_config(cfg.loss)
    sel = compute_token_selection(..., entropy=H, adaptive_entropy_coef=control.coef)   # alpha_k inside
    control.update(sel.mean_entropy if last_stage else None, group=ps.pp_group)        # c_{k+1}
    state = control.state_dict(); control.load_state_dict(state)
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from megatron_entcov.config import LossConfig
from megatron_entcov.distributed import collectives

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveEntropyCoef", "gated_coefficient", "next_coefficient"]


def gated_coefficient(coef: float, mean_entropy: Tensor, target: float) -> Tensor:
    """alpha_k = c_k * I[e_k <= tgt] as a float64 0-dim tensor (no host sync)."""
    return (mean_entropy <= target).double() * coef


def next_coefficient(coef: float, mean_entropy: float, target: float, delta: float) -> float:
    """c_{k+1} from c_k and e_k (module docstring), clamped at 0."""
    if mean_entropy < target:
        return coef + delta
    if mean_entropy > target:
        return max(0.0, coef - delta)
    return coef


class AdaptiveEntropyCoef:
    """The coefficient c_k of one run; inactive (``enabled`` False) when loss.target_entropy == 0."""

    def __init__(self, target: float, delta: float, init: float):
        self.target, self.delta = float(target), float(delta)
        self.coef = float(init)
        """c_k, the coefficient before the gate (a Python float: exact in JSON)."""
        self.updates = 0
        """Optimizer steps taken so far (how many updates made ``coef``)."""

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "AdaptiveEntropyCoef":
        return cls(cfg.target_entropy, cfg.target_entropy_delta, cfg.target_entropy_coef_init)

    @property
    def enabled(self) -> bool:
        return self.target > 0

    def update(self, mean_entropy: Tensor | None, group=None) -> float:
        """c_{k+1} from this step's e_k. ``mean_entropy``: the selection's global mean (a 0-dim tensor) on the
        ranks that computed it, None on the others (pipeline stages without a loss); ``group``: the pipeline
        group, over which a MAX all-reduce hands e_k to those ranks. Returns e_k (NaN when off)."""
        if not self.enabled:
            return math.nan
        value = torch.tensor(-math.inf if mean_entropy is None else float(mean_entropy), dtype=torch.float64)
        if group is not None:
            value = value.to(collectives.group_device(group))
            collectives.all_reduce(value, op="max", group=group)
        e_k = float(value)
        if not math.isfinite(e_k):
            raise RuntimeError("adaptive entropy control: no rank of the pipeline group had the mean entropy "
                               f"of step {self.updates} (the last stage must pass its selection's mean_entropy)")
        self.coef = next_coefficient(self.coef, e_k, self.target, self.delta)
        self.updates += 1
        return e_k

    def state_dict(self) -> dict:
        return {"coef": self.coef, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
        self.updates = int(state["updates"])
