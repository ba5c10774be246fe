"""Outcome-reward advantages with a per-prompt group baseline: GRPO, Dr.GRPO, RLOO.

Owns the step from one scalar reward per response to per-token advantages. Each prompt has a group of n
responses and the baseline is computed inside the group: GRPO (arXiv 2402.03300) A_i = (r_i - mean_g r) /
(std_g r + eps) (unbiased std, as verl; ``normalize_std=False`` drops the division), Dr.GRPO (arXiv 2503.20783)
A_i = r_i - mean_g r, RLOO (arXiv 2402.14740) A_i = n/(n-1) * (r_i - mean_g r). Groups whose rewards are all
equal (no signal) and groups of one response (no baseline, advantage 0) are reported, so the trainer can drop
or refill them (DAPO dynamic sampling). Runs once per rollout batch on the host side; it may synchronise.

Design notes (Dr.GRPO's length normalisation as an aggregation choice, the released setting):
docs/design/losses.md
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["ESTIMATORS", "GroupAdvantages", "compute_group_advantages", "broadcast_to_tokens"]

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-response advantages and the group bookkeeping the trainer needs."""

    advantages: Tensor
    """[N] float32, one advantage per response."""
    group_index: Tensor
    """[N] int64, dense group index 0..G-1 of each response (order of first appearance of its group)."""
    degenerate: Tensor
    """[G] bool, True for groups whose rewards are all equal (or that have a single response)."""

    @property
    def num_degenerate(self) -> Tensor:
        """int64 0-dim: number of degenerate groups."""
        return self.degenerate.sum(dtype=torch.int64)

    @property
    def sample_in_degenerate(self) -> Tensor:
        """[N] bool: responses that belong to a degenerate group (drop these rows to drop the groups)."""
        return self.degenerate[self.group_index]


def _dense_groups(num: int, group_size: int | None, group_ids: Tensor | None, device) -> Tensor:
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (contiguous groups) or group_ids (explicit groups)")
    if group_ids is not None:
        if group_ids.shape != (num,):
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({num},) like rewards")
        # Dense ids in order of first appearance, so group k is the k-th distinct prompt seen.
        _, inverse = torch.unique(group_ids, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if num else 0,), num, dtype=torch.int64, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(num, device=device), reduce="amin")
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=device)
        return rank[inverse]
    if group_size < 1 or num % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the number of rewards {num} "
                         "(rewards of one prompt are contiguous)")
    return torch.arange(num, device=device) // group_size


def compute_group_advantages(rewards: Tensor, *, group_size: int | None = None, group_ids: Tensor | None = None,
                             estimator: str = "grpo", normalize_std: bool = True, eps: float = 1e-6
                             ) -> GroupAdvantages:
    """Group-baseline advantages of one scalar reward per response.

    Args:
        rewards: [N] float rewards, N = num_prompts * n when ``group_size=n`` (each prompt's n responses
            contiguous), or any order with ``group_ids``.
        group_size: n, for contiguous groups. Exactly one of group_size / group_ids.
        group_ids: [N] int ids, responses with the same id share a prompt (groups may differ in size).
        estimator: "grpo", "dr_grpo" or "rloo" (see the module docstring).
        normalize_std: GRPO only: divide by (unbiased group std + eps). Ignored by dr_grpo and rloo.
        eps: added to the std (a group with std 0 then has advantages exactly 0, not nan).

    Returns:
        GroupAdvantages (advantages [N] float32, group_index [N], degenerate [G]).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is invalid: choose one of {', '.join(ESTIMATORS)}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps={eps!r} must be >= 0")
    r = rewards.detach().to(torch.float64)
    num = r.numel()
    index = _dense_groups(num, group_size, group_ids, r.device)
    num_groups = int(index.max()) + 1 if num else 0
    size = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)
    mean = total / size
    centered = r - mean[index]
    rmax = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=r.device)
    rmin = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=r.device)
    rmax.scatter_reduce_(0, index, r, reduce="amax")
    rmin.scatter_reduce_(0, index, r, reduce="amin")
    degenerate = (rmax == rmin) | (size < 2)

    if estimator == "grpo" and normalize_std:
        sq = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, centered**2)
        std = torch.sqrt(sq / (size - 1).clamp(min=1))  # unbiased (Bessel), as torch.std / verl
        adv = centered / (std[index] + eps)
    elif estimator == "rloo":
        n = size[index]
        adv = centered * n / (n - 1).clamp(min=1)
    else:
        adv = centered
    adv = torch.where(degenerate[index], torch.zeros_like(adv), adv)
    return GroupAdvantages(advantages=adv.float(), group_index=index, degenerate=degenerate)


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Give every valid response token its response's advantage.

    Args:
        advantages: [N] per-response advantages. mask: [N, T] valid response tokens (bool or 0/1).

    Returns:
        [N, T] float32: advantages[i] where mask[i, t], else 0.
    """
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"broadcast_to_tokens: advantages [N] and mask [N, T] expected, got "
                         f"{tuple(advantages.shape)} and {tuple(mask.shape)}")
    return torch.where(mask.bool(), advantages.float().unsqueeze(1), 0.0)
