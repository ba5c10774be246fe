"""The step's entropy change split by token class: which tokens moved the entropy, measured and predicted.

Owns the token classes of the diagnostics (issue: logged for every loss, the baseline included) and their
shares. Four partitions of the step's measured tokens, each summing to the whole:
  entropy      high / low: old entropy >= the step's exact global (1 - loss.high_entropy_ratio)-quantile
  advantage    pos / neg / zero: the sign of A
  clip         clip_low (A < 0, r < 1 - clip_ratio_low) / clip_high (A > 0, r > 1 + clip_ratio_high) / unclipped,
               r = pi_new / pi_old after the step (where PPO's clip would stop the gradient now)
  selection    selected / unselected: the tokens the loss chose (Clip-Cov detached, KL-Cov penalised,
               high_entropy_tokens trained on, Archer's high-entropy class; none for ppo and ce_gppo)
Per class c: ``entropy_class/frac_<c>`` (token share), ``entropy_class/delta_<c>`` = sum_{t in c} dH_t / N (the
measured change, new minus old entropy of the same token; the shares of a partition add up to
entropy/delta_measured), ``entropy_class/cov_<c>`` = sum_{t in c} cov_t / N (cov_t with the step's global means;
they add up to ``entropy_class/cov_total``) and, once the online law has a slope k (entropy/delta_slope, fitted
on delta_measured against cov/mean), ``entropy_class/pred_<c>`` = k * cov share. N: the measured tokens of all
data-parallel ranks. Shares are SUM-reduced like every token share (monitor/step.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_entcov.config import LossConfig
from megatron_entcov.losses.policy import TokenSelection
from megatron_entcov.losses.token_entropy import entropy_threshold
from megatron_entcov.ops.covariance import global_sum, token_covariance

__all__ = ["PARTITIONS", "chosen_tokens", "class_masks", "entropy_change_by_class", "predicted_by_class"]

PARTITIONS = {"entropy": ("high_entropy", "low_entropy"), "advantage": ("adv_pos", "adv_neg", "adv_zero"),
              "clip": ("clip_low", "clip_high", "unclipped"), "selection": ("selected", "unselected")}
"""Each partition of the tokens and its classes (the suffixes of the entropy_class/* tags)."""


def chosen_tokens(cfg: LossConfig, selection: TokenSelection) -> Tensor:
    """[B, T] bool: the tokens ``cfg``'s loss chose in ``selection`` (all False for ppo and ce_gppo)."""
    chosen = selection.clip_cov_mask | selection.kl_cov_mask
    if cfg.name == "high_entropy_tokens":
        chosen = chosen | selection.high_entropy_mask
    elif cfg.name == "archer":
        chosen = chosen | selection.archer_high_mask
    return chosen


def class_masks(cfg: LossConfig, valid: Tensor, old_entropy: Tensor, advantages: Tensor, log_ratio: Tensor,
                selected: Tensor, group=None) -> dict[str, Tensor]:
    """{class: [B, T] bool} of every class of :data:`PARTITIONS` (module docstring); the threshold is global
    over ``group`` (collective: every rank of the group calls)."""
    valid = valid.bool()
    tau = entropy_threshold(old_entropy.float(), valid, cfg.high_entropy_ratio, group)
    high = valid & (old_entropy.float().double() >= tau)
    ratio = torch.exp(torch.where(valid, log_ratio, 0.0))
    clip_low = valid & (advantages < 0) & (ratio < 1.0 - cfg.clip_ratio_low)
    clip_high = valid & (advantages > 0) & (ratio > 1.0 + cfg.clip_ratio_high)
    selected = valid & selected.bool()
    return {"high_entropy": high, "low_entropy": valid & ~high,
            "adv_pos": valid & (advantages > 0), "adv_neg": valid & (advantages < 0),
            "adv_zero": valid & (advantages == 0),
            "clip_low": clip_low, "clip_high": clip_high, "unclipped": valid & ~clip_low & ~clip_high,
            "selected": selected, "unselected": valid & ~selected}


def entropy_change_by_class(cfg: LossConfig, valid: Tensor, old_logprobs: Tensor, new_logprobs: Tensor,
                            old_entropy: Tensor, new_entropy: Tensor, advantages: Tensor, selected: Tensor,
                            group=None) -> dict[str, float]:
    """This rank's shares of the per-class figures (module docstring) over its measured tokens [B, T].

    Collective over ``group`` (the data-parallel group): the token count, the covariance means and the entropy
    threshold are global. Returns Python floats to be SUM-reduced over the ranks that own results.
    """
    valid = valid.bool()
    masks = class_masks(cfg, valid, old_entropy, advantages, new_logprobs - old_logprobs, selected, group)
    count = global_sum(valid.sum(dtype=torch.int64), group).clamp(min=1).double()
    delta = torch.where(valid, new_entropy.double() - old_entropy.double(), 0.0)
    cov = token_covariance(old_logprobs, advantages, valid, group).double()
    out = {"entropy_class/cov_total": float(cov.sum() / count)}
    for name, mask in masks.items():
        out[f"entropy_class/frac_{name}"] = float(mask.sum(dtype=torch.int64).double() / count)
        out[f"entropy_class/delta_{name}"] = float(torch.where(mask, delta, 0.0).sum() / count)
        out[f"entropy_class/cov_{name}"] = float(torch.where(mask, cov, 0.0).sum() / count)
    return out


def predicted_by_class(metrics: dict[str, float], slope: float | None) -> dict[str, float]:
    """entropy_class/pred_<class> = slope * entropy_class/cov_<class> (and pred_total), once the law has a
    slope; {} before."""
    if slope is None or "entropy_class/cov_total" not in metrics:
        return {}
    out = {"entropy_class/pred_total": slope * metrics["entropy_class/cov_total"]}
    for classes in PARTITIONS.values():
        for name in classes:
            out[f"entropy_class/pred_{name}"] = slope * metrics[f"entropy_class/cov_{name}"]
    return out
