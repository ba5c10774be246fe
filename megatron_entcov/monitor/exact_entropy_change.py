"""The exact first-order entropy change of a step on small vocabularies, beside the batch-covariance estimate.

Cui et al. 2025 (arXiv 2505.22617, section 2): at each state, for a logit update dz,
    H(z + dz) - H(z) = -Cov_{a~pi}( log pi(a), dz_a ) + O(|dz|^2),
a covariance over the whole vocabulary under the old policy. The trainer's covariance statistic (cov/mean and
the law's entropy/delta_predicted = k * cov/mean) estimates it from the sampled tokens of the batch only (one
action per state, the advantage standing in for the update). With the full logits before and after the step
(affordable when V is small, metrics.exact_entropy_change_max_vocab) this module computes the per-state formula
itself on the step's tokens, so the estimate's accuracy is measured rather than assumed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_entcov.entropy_law import entropy_change_first_order

__all__ = ["exact_first_order_change"]


def exact_first_order_change(logits_before: Tensor, logits_after: Tensor, mask: Tensor,
                             rows_per_chunk: int = 1) -> Tensor:
    """Per-token exact first-order entropy change of a step.

    Args:
        logits_before: [N, T, V] the full-vocabulary logits z / T under the weights before the step (float32).
        logits_after: [N, T, V] the same tokens' logits under the weights after it.
        mask: [N, T] the valid tokens.
        rows_per_chunk: rows computed at once (bounds the temporaries to a few rows x T x V).

    Returns:
        [N, T] float32: -Cov_{a~pi_old}(log pi_old(a), z_after(a) - z_before(a)) per token, 0 where mask is 0.
        Its token mean over the batch is entropy/delta_first_order; entropy/delta_measured - that mean is the
        higher-order remainder.
    """
    if logits_before.shape != logits_after.shape or logits_before.shape[:2] != mask.shape:
        raise ValueError(f"logits before {tuple(logits_before.shape)}, after {tuple(logits_after.shape)} and mask "
                         f"{tuple(mask.shape)} must agree on [N, T, V] and [N, T]")
    out = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    for start in range(0, mask.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        before = logits_before[rows]
        out[rows] = entropy_change_first_order(before, logits_after[rows] - before).float()
    return out * mask.to(out.dtype)
