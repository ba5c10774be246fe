"""The token-entropy family of entropy control: which tokens count as high-entropy, and each method's per-token term.

Owns the per-token arithmetic of four methods that :func:`losses.policy.policy_loss` composes (the fifth, the
adaptive entropy coefficient, is losses/adaptive_entropy.py). Every threshold is exact and global: the
quantiles come from ops/covariance.py's radix select over the whole optimizer mini-batch and the data-parallel
group, so the chosen tokens do not depend on the split over ranks or micro-batches (the released code takes
them per micro-batch on each GPU).

- ``high_entropy_tokens`` (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939, the DAPO objective
  with the indicator I[H_t >= tau_rho^B]): the clipped surrogate only on tokens whose entropy reaches the
  (1 - rho)-quantile tau of the batch (torch.quantile's linear rule, ties kept); the denominator stays every
  valid token (the paper's 1 / sum_i |o_i|). Released: rho = 0.2, DAPO clip 0.2 / 0.28, token-mean.
- entropy advantage shaping (Cheng et al. 2025, "Reasoning with Exploration: An Entropy Perspective",
  arXiv 2506.14758): A_t + min(alpha * H_t.detach(), |A_t| / kappa). Released: alpha = 0.4, kappa = 2.
- ``archer`` (Wang et al. 2025, "Stabilizing Knowledge, Promoting Reasoning: Dual-Token Constraints for
  RLVR", arXiv 2507.15778): tokens above the entropy 0.8-quantile (per response, as released) get clip 0.5 and
  KL weight 0, the others clip 0.2 and KL weight 0.001. Deviation: the KL is to pi_old (k3 estimator), there
  being no reference model here; so it acts from the second optimizer mini-batch of a rollout batch on.
- ``ce_gppo`` (Su et al. 2025, arXiv 2509.20712, the CE-GPPO objective, released loss
  compute_gppo_loss_general_beta): outside the clip range the token keeps a bounded gradient,
  beta_1 (1 - eps_low) A grad log pi (A < 0, r < 1 - eps_low) and beta_2 (1 + eps_high) A grad log pi
  (A > 0, r > 1 + eps_high), through r / sg(r); the dual clip stays. Released: beta_1 = 0.75 (7B) / 0.5 (1.5B),
  beta_2 = 1, eps 0.2 / 0.28.
The README's method table lists what each changes in the gradient; the tests: tests/unit/losses/test_token_entropy.py.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from megatron_entcov.config import LossConfig
from megatron_entcov.ops.covariance import global_quantiles

logger = logging.getLogger(__name__)

__all__ = ["ENTROPY_LOSSES", "archer_high_mask", "archer_terms", "ce_gppo_terms", "entropy_threshold",
           "needs_entropy", "shaped_advantages"]

ENTROPY_LOSSES = ("high_entropy_tokens", "archer")
"""Loss names whose token choice reads the per-token entropy of the selection phase."""


def needs_entropy(cfg: LossConfig) -> bool:
    """Whether the selection phase needs the per-token entropy for ``cfg`` (a token choice or the adaptive gate)."""
    return cfg.name in ENTROPY_LOSSES or cfg.target_entropy > 0


def entropy_threshold(entropy: Tensor, mask: Tensor, share: float, group=None) -> Tensor:
    """tau_rho: the exact global (1 - share)-quantile of the valid tokens' entropy (linear rule, float64 0-dim).

    ``entropy >= tau`` keeps the top ``share`` of tokens as the paper's torch.quantile does, every token tied at
    the threshold included. share = 1 gives the minimum (every token kept); no valid token gives 0.
    """
    return global_quantiles(entropy, mask, (1.0 - share,), group, interpolation="linear")[0]


def archer_high_mask(cfg: LossConfig, entropy: Tensor, mask: Tensor, group=None) -> Tensor:
    """[B, T] bool: Archer's high-entropy tokens, entropy > the archer_entropy_quantile of their response
    ('response': one row of the unpacked mini-batch, torch.nanquantile's linear rule, as released) or of the
    global mini-batch ('global': exact over every rank). Strict '>' as released; invalid tokens are False."""
    valid = mask.bool()
    q = cfg.archer_entropy_quantile
    ent = entropy.detach().float()
    if cfg.archer_quantile_scope == "global":
        tau = global_quantiles(ent, valid, (q,), group, interpolation="linear")[0]
        return valid & (ent.double() > tau)
    per_row = torch.nanquantile(torch.where(valid, ent, float("nan")).double(), q, dim=-1, keepdim=True)
    return valid & (ent.double() > per_row)


def shaped_advantages(advantages: Tensor, entropy: Tensor, alpha: float, kappa: float) -> Tensor:
    """A + min(alpha * H.detach(), |A| / kappa) per token (arXiv 2506.14758); A itself when alpha == 0."""
    if alpha == 0:
        return advantages
    psi = torch.minimum(alpha * entropy.detach().to(advantages.dtype), advantages.abs() / kappa)
    return advantages + psi


def archer_terms(cfg: LossConfig, log_ratio: Tensor, advantages: Tensor, high: Tensor,
                 ppo_terms) -> tuple[dict[str, Tensor], Tensor]:
    """Archer's clipped surrogate (per-token clip epsilon by class, dual clip kept) and its KL penalty.

    Args:
        cfg: LossConfig. log_ratio: [B, T] log pi - log pi_old (0 at invalid tokens). advantages: [B, T].
        high: [B, T] bool high-entropy tokens (:func:`archer_high_mask`). ppo_terms: losses.policy.ppo_terms.

    Returns:
        (terms as ppo_terms returns them, penalty [B, T]): penalty = w_t * (exp(-d) + d - 1) with
        d = log pi - log pi_old (the k3 estimator of KL(pi_old || pi), >= 0, zero gradient at d = 0) and
        w_t = archer_kl_coef (low) or archer_kl_coef * archer_high_kl_scale (high).
    """
    def per_class(high_value: float, low_value: float) -> Tensor:   # built in log_ratio's dtype: no float32 0.2
        return torch.where(high, torch.full_like(log_ratio, high_value), torch.full_like(log_ratio, low_value))

    eps = per_class(cfg.archer_high_clip_ratio, cfg.archer_low_clip_ratio)
    terms = ppo_terms(cfg, log_ratio, advantages, clip_low=eps, clip_high=eps)
    weight = per_class(cfg.archer_kl_coef * cfg.archer_high_kl_scale, cfg.archer_kl_coef)
    penalty = weight * (torch.expm1(-log_ratio) + log_ratio)     # expm1: exp(-d) - 1 + d cancels in float32
    return terms, penalty


def ce_gppo_terms(cfg: LossConfig, log_ratio: Tensor, advantages: Tensor) -> dict[str, Tensor]:
    """CE-GPPO per-token surrogate (arXiv 2509.20712), in the keys of losses.policy.ppo_terms.

    Its value is PPO's (clip-higher + dual clip); its gradient differs only where PPO's clip is active:
    beta_1 (1 - eps_low) A and beta_2 (1 + eps_high) A times grad log pi instead of 0 (r / sg(r) has value 1
    and gradient grad log pi). The dual clip (A < 0, loss capped at -A c) still zeroes the gradient, as released.
    """
    ratio = torch.exp(log_ratio)
    eps_low, eps_high = cfg.clip_ratio_low, cfg.clip_ratio_high
    negative, positive = advantages < 0, advantages > 0
    low = negative & (ratio < 1.0 - eps_low)
    high = positive & (ratio > 1.0 + eps_high)
    preserved = ratio / ratio.detach()
    pg1 = -advantages * ratio
    pg = torch.where(low, -cfg.ce_gppo_beta1 * (1.0 - eps_low) * preserved * advantages, pg1)
    pg = torch.where(high, -cfg.ce_gppo_beta2 * (1.0 + eps_high) * preserved * advantages, pg)
    cap = -advantages * cfg.clip_ratio_c
    clip_dual = negative & (pg > cap)
    pg = torch.where(negative, torch.minimum(pg, cap), pg)
    return {"ratio": ratio, "pg_unclipped": pg1, "pg_clipped": pg, "clip_low": low.detach(),
            "clip_high": high.detach(), "clip_dual": clip_dual.detach()}
