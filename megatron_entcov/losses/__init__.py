"""Losses: group-baseline advantages, policy losses with entropy control, aggregation, coefficient schedules.

Entry points: :func:`policy_loss` (and the two-phase :func:`compute_token_selection` for micro-batched,
data-parallel training), :func:`compute_group_advantages`, :func:`schedules.value`.
The equations (arXiv 2505.22617) and the exactness contract: docs/design/losses.md.
"""

from megatron_entcov.losses.advantages import GroupAdvantages, broadcast_to_tokens, compute_group_advantages
from megatron_entcov.losses.aggregation import aggregate
from megatron_entcov.losses.policy import (
    COV_QUANTILES,
    TokenSelection,
    compute_token_selection,
    policy_loss,
    warn_if_kl_cov_inert,
)
from megatron_entcov.losses.schedules import annealed_coefficients

__all__ = [
    "COV_QUANTILES",
    "GroupAdvantages",
    "TokenSelection",
    "aggregate",
    "annealed_coefficients",
    "broadcast_to_tokens",
    "compute_group_advantages",
    "compute_token_selection",
    "policy_loss",
    "warn_if_kl_cov_inert",
]
