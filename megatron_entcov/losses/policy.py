"""Policy losses with entropy control: PPO (clip-higher, dual clip), Clip-Cov, KL-Cov, the token-entropy family
(high-entropy tokens, Archer, CE-GPPO, entropy advantage shaping, adaptive entropy coefficient: per-token terms in
losses/token_entropy.py and losses/adaptive_entropy.py), entropy bonus, TIS.

Owns ``policy_loss`` and the two-phase token selection behind Clip-Cov and KL-Cov (Cui et al. 2025, "The
Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", arXiv 2505.22617, sections 3-4):
:func:`compute_token_selection` runs once over a rank's whole optimizer mini-batch (global covariance statistics
and the chosen tokens, a function of the global batch, the seed and the step only); :func:`policy_loss` then
runs per micro-batch with that selection restricted to the micro-batch (``sel.rows(rows)``, or
``sel.view(micro_batch.view)`` for a packed row). Summed over micro-batches and data-parallel ranks, the losses
and gradients equal the single-process full-batch ones: the denominators are global, so the trainer SUMS
gradients (undoing Megatron's 1/num_microbatches and 1/dp averaging, policy/pipeline.py).

Design notes (the per-token equations, the deviations from the released code, the two-phase use):
docs/design/losses.md
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from megatron_entcov.config import AGG_MODES, LOSS_NAMES, LossConfig
from megatron_entcov.losses.adaptive_entropy import gated_coefficient
from megatron_entcov.losses.aggregation import aggregate, count_valid
from megatron_entcov.losses.schedules import annealed_coefficients
from megatron_entcov.losses.token_entropy import (
    archer_high_mask,
    archer_terms,
    ce_gppo_terms,
    entropy_threshold,
    needs_entropy,
    shaped_advantages,
)
from megatron_entcov.ops.covariance import (
    global_quantiles,
    global_random_choice_mask,
    global_sum,
    global_topk_mask,
    masked_global_mean,
    token_covariance,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COV_QUANTILES",
    "TokenSelection",
    "compute_token_selection",
    "num_to_choose",
    "policy_loss",
    "ppo_terms",
    "uses_dual_clip",
    "warn_if_kl_cov_inert",
]

COV_QUANTILES = (0.1, 0.5, 0.9, 0.99)
"""Levels of the exact global cov_t quantiles reported as cov/q10, cov/q50, cov/q90, cov/q99."""


def _quantile_key(level: float) -> str:
    return f"cov/q{level * 100:g}"  # 0.9 -> cov/q90, 0.99 -> cov/q99, 0.995 -> cov/q99.5


@dataclass(frozen=True)
class TokenSelection:
    """Result of the selection phase over a rank's whole optimizer mini-batch (or a row slice of it).

    Per-token tensors are [B, T] over this rank's rows; the counts and quantiles are global (all-reduced over
    the group) and shared by every slice. Slice with :meth:`rows` for a micro-batch.
    """

    covariance: Tensor
    """[B, T] float32 cov_t with global means, 0 at invalid tokens."""
    clip_cov_mask: Tensor
    """[B, T] bool: Clip-Cov-chosen tokens (gradient detached). All False unless loss.name == 'clip_cov'."""
    kl_cov_mask: Tensor
    """[B, T] bool: KL-Cov-chosen tokens (get the |log-ratio| penalty). All False unless loss.name == 'kl_cov'."""
    num_valid: Tensor
    """int64 0-dim: global valid-token count of the mini-batch (token-mean denominator)."""
    num_seqs: Tensor
    """int64 0-dim: global count of sequences with >= 1 valid token (seq-mean-* denominator)."""
    cov_quantiles: Tensor
    """float32 [len(quantile_levels)]: exact global quantiles of cov_t over valid tokens."""
    quantile_levels: tuple[float, ...] = COV_QUANTILES
    """Levels of cov_quantiles."""
    coefs: dict[str, float] = field(default_factory=dict)
    """Annealed coefficients at this step: clip_cov_ratio, kl_cov_ratio, kl_cov_coef, entropy_coef."""
    step: int = 0
    """Optimizer step the selection was made for (checked against policy_loss's step)."""
    high_entropy_mask: Tensor | None = None
    """[B, T] bool: entropy >= the exact global (1 - loss.high_entropy_ratio)-quantile (the tokens
    high_entropy_tokens trains on; the high-entropy class of the diagnostics). None without entropy."""
    entropy_threshold: Tensor | None = None
    """float64 0-dim: that quantile (tau_rho). None without entropy."""
    archer_high_mask: Tensor | None = None
    """[B, T] bool: Archer's high-entropy tokens (loss.name == 'archer' only)."""
    mean_entropy: Tensor | None = None
    """float64 0-dim: exact global token mean of the entropy (e_k of the adaptive coefficient). None without
    entropy."""
    adaptive_entropy_coef: Tensor | None = None
    """float64 0-dim: alpha_k = c_k * I[e_k <= loss.target_entropy] (loss.target_entropy > 0 only)."""
    seq_token_counts: Tensor | None = None
    """[B, T] int64: each token's sequence's valid-token count, from the row layout (loss.agg =
    seq-mean-token-mean only, else None): the per-sequence means stay exact when a micro-batch holds part of a
    sequence (context parallelism)."""

    def rows(self, rows: slice | Tensor) -> "TokenSelection":
        """The selection restricted to a row slice (or index tensor) of the rank's mini-batch; globals shared."""
        return self.view(lambda t: t[rows])

    def view(self, view: Callable[[Tensor], Tensor]) -> "TokenSelection":
        """The per-token tensors mapped by ``view`` (a micro-batch's ``view``: a row slice, or the gather of a
        packed row, policy/packing.py); globals shared."""
        def maybe(t: Tensor | None) -> Tensor | None:
            return None if t is None else view(t)

        return TokenSelection(covariance=view(self.covariance), clip_cov_mask=view(self.clip_cov_mask),
                              kl_cov_mask=view(self.kl_cov_mask), num_valid=self.num_valid,
                              num_seqs=self.num_seqs, cov_quantiles=self.cov_quantiles,
                              quantile_levels=self.quantile_levels, coefs=self.coefs, step=self.step,
                              high_entropy_mask=maybe(self.high_entropy_mask),
                              entropy_threshold=self.entropy_threshold,
                              archer_high_mask=maybe(self.archer_high_mask), mean_entropy=self.mean_entropy,
                              adaptive_entropy_coef=self.adaptive_entropy_coef,
                              seq_token_counts=maybe(self.seq_token_counts))


def num_to_choose(ratio: float, num_valid: Tensor) -> Tensor:
    """max(int(ratio * N_valid), 1) as an int64 tensor (no host sync); 0 when ratio == 0 or N_valid == 0.

    ratio == 0 (an annealed ratio that reached its end) chooses nothing, so annealing switches the control
    off exactly; the released floor of 1 applies to every ratio > 0.
    """
    if ratio < 0 or ratio > 1:
        raise ValueError(f"a token share must lie in [0, 1], got {ratio!r}")
    if ratio == 0:
        return torch.zeros_like(num_valid)
    # floor(ratio * N) in float64 equals Python's int(ratio * N) for the N that fit in a double.
    n = torch.floor(num_valid.double() * ratio).to(torch.int64).clamp(min=1)
    return torch.where(num_valid > 0, n, torch.zeros_like(n))


def uses_dual_clip(cfg: LossConfig) -> bool:
    """PPO and the token-entropy losses (built on verl's PPO loss) always apply the dual clip; Clip-Cov only
    with loss.clip_cov_dual_clip; KL-Cov never clips."""
    return cfg.name in ("ppo", "high_entropy_tokens", "archer", "ce_gppo") or (
        cfg.name == "clip_cov" and cfg.clip_cov_dual_clip)


def ppo_terms(cfg: LossConfig, log_ratio: Tensor, advantages: Tensor, *, clip_low: float | Tensor | None = None,
              clip_high: float | Tensor | None = None) -> dict[str, Tensor]:
    """Per-token PPO quantities (clip-higher, + the dual clip where :func:`uses_dual_clip`) from the log-ratio.

    Args:
        cfg: LossConfig (name, clip_ratio_low, clip_ratio_high, clip_ratio_c, clip_cov_dual_clip).
        log_ratio: [B, T] log pi - log pi_old (0 at invalid tokens). advantages: [B, T].
        clip_low, clip_high: the clip epsilons (a float, or [B, T] per token as Archer's); None = cfg's.

    Returns:
        dict of [B, T] tensors: ratio, pg_unclipped (-A ratio), pg_clipped (clip + dual clip), and bool masks
        clip_low (A < 0, lower clip active), clip_high (A > 0, upper clip active), clip_dual (A < 0, the
        dual-clip cap -A c active). A token with any mask True has zero policy gradient.
    """
    ratio = torch.exp(log_ratio)
    low = cfg.clip_ratio_low if clip_low is None else clip_low
    high = cfg.clip_ratio_high if clip_high is None else clip_high
    pg1 = -advantages * ratio
    if isinstance(low, Tensor) or isinstance(high, Tensor):
        # clamp, not minimum/maximum: at a ratio on the bound those split the gradient in halves.
        pg2 = -advantages * torch.clamp(ratio, 1.0 - torch.as_tensor(low, dtype=ratio.dtype),
                                        1.0 + torch.as_tensor(high, dtype=ratio.dtype))
    else:
        pg2 = -advantages * torch.clamp(ratio, 1.0 - low, 1.0 + high)
    clipped = torch.maximum(pg1, pg2)
    negative = advantages < 0
    if uses_dual_clip(cfg):
        cap = -advantages * cfg.clip_ratio_c
        pg = torch.where(negative, torch.minimum(clipped, cap), clipped)
        clip_dual = negative & (cap < clipped)
    else:
        pg, clip_dual = clipped, torch.zeros_like(negative)
    clip_active = pg2 > pg1
    return {
        "ratio": ratio,
        "pg_unclipped": pg1,
        "pg_clipped": pg,
        "clip_low": (clip_active & negative).detach(),
        "clip_high": (clip_active & (advantages > 0)).detach(),
        "clip_dual": clip_dual.detach(),
    }


def _check_inputs(cfg: LossConfig, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if cfg.name not in LOSS_NAMES:
        raise ValueError(f"loss.name={cfg.name!r} is invalid: choose one of {', '.join(LOSS_NAMES)}")
    if cfg.agg not in AGG_MODES:
        raise ValueError(f"loss.agg={cfg.agg!r} is invalid: choose one of {', '.join(AGG_MODES)}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)} like logprobs")


def compute_token_selection(cfg: LossConfig, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                            mask: Tensor, *, token_keys: Tensor | None = None, group=None, step: int = 0,
                            seed: int = 0, quantile_levels: tuple[float, ...] = COV_QUANTILES,
                            entropy: Tensor | None = None,
                            adaptive_entropy_coef: float | None = None) -> TokenSelection:
    """Phase 1: global covariance statistics and the Clip-Cov / KL-Cov token choice for one mini-batch.

    Call once per optimizer mini-batch on each data-parallel rank, with the rank's WHOLE local mini-batch
    (every row its micro-batches will cover), before the micro-batch forward/backward passes.

    Args:
        cfg: LossConfig.
        logprobs: [B, T] log pi of the current policy (a no-grad forward is enough; detached here).
        old_logprobs: [B, T] log pi_old (rollout-time policy). advantages: [B, T]. mask: [B, T] valid tokens.
        token_keys: [B, T] int64, unique over the GLOBAL mini-batch and independent of the split, e.g.
            global_sample_id * max_len + position. Ties and the random choice are functions of these keys.
            Default (only allowed with group=None): row * T + position.
        group: the data-parallel group (context-parallel ranks of a replica pass the same rows and are not in
            it); None = single process.
        step: optimizer step (annealing and the random choice). seed: run seed (random choice).
        quantile_levels: levels of the exact cov quantiles (() skips them; 4 all-reduce rounds otherwise).
        entropy: [B, T] per-token entropy of the same policy as ``logprobs`` (detached here). Required by
            high_entropy_tokens, archer and loss.target_entropy > 0; when given, the high-entropy class
            (entropy >= the global (1 - loss.high_entropy_ratio)-quantile) and the mean entropy are computed
            for every loss (the diagnostics' token classes).
        adaptive_entropy_coef: c_k of the adaptive entropy coefficient (losses/adaptive_entropy.py); None =
            loss.target_entropy_coef_init (a run's first step). Used only when loss.target_entropy > 0.

    Returns:
        TokenSelection. Communication: 1 + 1 + (12 for kl_cov | 8 for clip_cov) + 4 small SUM all-reduces,
        + 5 with entropy (+ 4 for archer's global scope), no host synchronisation.
    """
    _check_inputs(cfg, logprobs, old_logprobs, advantages, mask)
    if token_keys is None:
        if group is not None:
            raise ValueError("compute_token_selection: token_keys are required with a process group (they must be "
                             "unique over the global batch, e.g. global_sample_id * max_len + position)")
        b, t = logprobs.shape
        token_keys = torch.arange(b * t, device=logprobs.device, dtype=torch.int64).view(b, t)
    elif token_keys.shape != logprobs.shape:
        raise ValueError(f"token_keys has shape {tuple(token_keys.shape)}, expected {tuple(logprobs.shape)}")
    valid = mask.bool()
    logprobs = logprobs.detach()
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    coefs = annealed_coefficients(cfg, step)

    counts = global_sum(torch.stack(count_valid(valid)), group)
    num_valid, num_seqs = counts[0], counts[1]
    cov = token_covariance(logprobs, advantages, valid, group)

    none = torch.zeros_like(valid)
    clip_cov_mask, kl_cov_mask = none, none
    if cfg.name == "clip_cov":
        log_ratio = torch.where(valid, logprobs - old_logprobs, 0.0)
        terms = ppo_terms(cfg, log_ratio, advantages)
        ppo_clipped = terms["clip_low"] | terms["clip_high"] | terms["clip_dual"]
        candidates = valid & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub) & ~ppo_clipped
        n = num_to_choose(coefs["clip_cov_ratio"], num_valid)
        clip_cov_mask = global_random_choice_mask(token_keys, candidates, n, seed=seed, step=step, group=group)
    elif cfg.name == "kl_cov":
        k = num_to_choose(coefs["kl_cov_ratio"], num_valid)
        kl_cov_mask = global_topk_mask(cov, token_keys, valid, k, group)
    quantiles = global_quantiles(cov, valid, quantile_levels, group)
    entropy_fields = _entropy_selection(cfg, entropy, valid, coefs, group, adaptive_entropy_coef)
    # A row is one sequence: its count, on each of its tokens (an expanded view, no copy).
    seq_counts = (valid.sum(dim=-1, keepdim=True, dtype=torch.int64).expand_as(valid)
                  if cfg.agg == "seq-mean-token-mean" else None)
    return TokenSelection(covariance=cov, clip_cov_mask=clip_cov_mask, kl_cov_mask=kl_cov_mask,
                          num_valid=num_valid, num_seqs=num_seqs, cov_quantiles=quantiles,
                          quantile_levels=tuple(quantile_levels), coefs=coefs, step=step,
                          seq_token_counts=seq_counts, **entropy_fields)


def _entropy_selection(cfg: LossConfig, entropy: Tensor | None, valid: Tensor, coefs: dict[str, float], group,
                       adaptive_entropy_coef: float | None) -> dict[str, Tensor | None]:
    """The token-entropy fields of a TokenSelection (losses/token_entropy.py, losses/adaptive_entropy.py)."""
    if entropy is None:
        if needs_entropy(cfg):
            raise ValueError(f"loss.name={cfg.name!r} with loss.target_entropy={cfg.target_entropy} needs the "
                             "per-token entropy in the selection phase: pass entropy=[B, T] "
                             "(from ops.vocab_parallel.logprobs_and_entropy)")
        return {}
    if entropy.shape != valid.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {tuple(valid.shape)}")
    entropy = entropy.detach().float()
    share = coefs.get("high_entropy_ratio", cfg.high_entropy_ratio)
    tau = entropy_threshold(entropy, valid, share, group)
    mean, _ = masked_global_mean(entropy, valid, group)
    out = {"high_entropy_mask": valid & (entropy.double() >= tau), "entropy_threshold": tau, "mean_entropy": mean}
    if cfg.name == "archer":
        out["archer_high_mask"] = archer_high_mask(cfg, entropy, valid, group)
    if cfg.target_entropy > 0:
        c_k = cfg.target_entropy_coef_init if adaptive_entropy_coef is None else adaptive_entropy_coef
        out["adaptive_entropy_coef"] = gated_coefficient(c_k, mean, cfg.target_entropy)
    return out


def policy_loss(cfg: LossConfig, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                entropy: Tensor | None = None, selection: TokenSelection | None = None, step: int = 0,
                rollout_logprobs: Tensor | None = None,
                segment_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss of ``cfg.name`` (+ entropy bonus) for one micro-batch, normalised by GLOBAL denominators.

    Contract: let the optimizer mini-batch be split over data-parallel ranks and, on each rank, into
    micro-batches (row slices, or packed rows). If every call gets its part of one :class:`TokenSelection`
    computed by :func:`compute_token_selection` over the rank's whole mini-batch with the data-parallel group
    (``selection=sel.rows(rows)`` or ``sel.view(micro_batch.view)``), then the SUM of the returned losses over
    all micro-batches and all ranks equals the single-process full-batch loss, and so do the summed gradients
    (exactly in exact arithmetic; in floating point up to summation order). The denominators are global:
    token-mean divides by the global valid-token count N_tok, seq-mean-* by the global count N_seq of
    sequences with >= 1 valid token (losses/aggregation.py). The trainer must therefore SUM, not average,
    gradients over micro-batches and dp ranks (undo Megatron's 1/num_microbatches and 1/dp scaling).

    Args:
        cfg: LossConfig (name, clip ratios, Clip-Cov/KL-Cov parameters, entropy_coef, agg, schedules).
        logprobs: [B, T] float log pi of the sampled tokens under the current policy (requires grad).
        old_logprobs: [B, T] log pi_old from rollout time (no grad). advantages: [B, T] (no grad).
        mask: [B, T] bool/0-1 valid response tokens. Values at invalid positions are ignored (may be inf).
        entropy: [B, T] per-token entropy (differentiable); required when cfg.entropy_coef > 0, else unused.
        selection: phase-1 result of :func:`compute_token_selection`, restricted to these rows (``sel.rows``,
            ``sel.view``); its step must equal ``step``. None: these tensors are a whole single-process
            mini-batch and the selection is computed here from them (token keys row * T + position, seed 0).
        step: optimizer step: coefficient annealing (and the check against the selection's step).
        rollout_logprobs: [B, T] log-probs of the sampled tokens under the rollout engine's numerics (no grad);
            required when cfg.tis_cap > 0 (truncated importance sampling weight min(exp(old - rollout), C) per
            token), else unused. Invalid positions are ignored.
        segment_ids: [B, T] int64 sample index of each token when several samples share a row (a packed
            micro-batch, policy/packing.py): seq-mean-token-mean then averages per sample, not per row.
            None = one sample per row. A given ``selection`` (made on the rows) carries each token's sequence count
            instead, which holds for part of a sequence too (context parallelism).

    Returns:
        (loss, metrics). loss: 0-dim tensor. metrics: detached 0-dim float32 tensors, each already this
        slice's share of the global value, so ONE SUM all-reduce over all micro-batches and ranks gives the
        global value: token fractions and means are divided by N_tok; global constants (annealed coefficients,
        cov quantiles) are weighted by this slice's share of valid tokens (n_local / N_tok). Keys:
        train/loss, train/pg_loss, train/entropy_bonus, train/ppo_kl, train/clip_frac_low,
        train/clip_frac_high, train/clip_frac_dual, train/clip_cov_frac, train/kl_cov_frac, cov/mean,
        cov/q10, cov/q50, cov/q90, cov/q99, coef/clip_cov_ratio, coef/kl_cov_ratio, coef/kl_cov_coef,
        coef/entropy_coef; with cfg.tis_cap > 0 also train/is_ratio_mean (mean untruncated exp(old - rollout)),
        train/tis_weight_mean (mean truncated weight w) and train/tis_clip_frac (share of tokens where the cap
        applied). No max is logged: the metrics are SUM-reduced, and a max does not sum. The step's entropy is
        the trainer's (entropy/mean, from the rollout batch's forward); a loss-level copy summed over mini-batches
        would count it again.
    """
    _check_loss_inputs(cfg, logprobs, old_logprobs, advantages, mask, entropy, rollout_logprobs, selection, step)
    # A given selection was made on the rows: its per-token sequence counts hold even for part of a sequence.
    counts = None if selection is None else selection.seq_token_counts
    if selection is None:
        selection = compute_token_selection(cfg, logprobs, old_logprobs, advantages, mask, step=step,
                                            entropy=None if entropy is None else entropy.detach())
    valid = mask.bool()
    coefs = selection.coefs
    agg = functools.partial(aggregate, mask=valid, agg=cfg.agg, num_valid=selection.num_valid,
                            num_seqs=selection.num_seqs, segment_ids=segment_ids, token_counts=counts)

    # Mask before exp: padding may hold -inf/garbage; exp of it would put inf*0 = nan into the gradient.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros((), dtype=logprobs.dtype,
                                                                        device=logprobs.device))
    advantages = advantages.detach().to(logprobs.dtype)
    raw_advantages = advantages
    if coefs.get("entropy_advantage_coef", 0.0) > 0:       # arXiv 2506.14758: A + min(alpha H, |A| / kappa)
        advantages = shaped_advantages(advantages, entropy, coefs["entropy_advantage_coef"],
                                       cfg.entropy_advantage_kappa)
    terms = ppo_terms(cfg, log_ratio, advantages)
    zeros = torch.zeros_like(valid)
    clipped = {"low": zeros, "high": zeros, "dual": zeros}
    penalty = None
    if cfg.name in ("ppo", "high_entropy_tokens", "archer", "ce_gppo"):
        if cfg.name == "archer":
            terms, penalty = archer_terms(cfg, log_ratio, advantages, selection.archer_high_mask, ppo_terms)
        elif cfg.name == "ce_gppo":
            terms = ce_gppo_terms(cfg, log_ratio, advantages)
        pg = terms["pg_clipped"]
        if cfg.name == "high_entropy_tokens":    # arXiv 2506.01939: I[H_t >= tau_rho] * surrogate
            pg = torch.where(selection.high_entropy_mask, pg, torch.zeros_like(pg))
        clipped = {"low": terms["clip_low"], "high": terms["clip_high"], "dual": terms["clip_dual"]}
    elif cfg.name == "clip_cov":
        pg = torch.where(selection.clip_cov_mask, terms["pg_clipped"].detach(), terms["pg_clipped"])
        clipped = {"low": terms["clip_low"], "high": terms["clip_high"], "dual": terms["clip_dual"]}
    else:  # kl_cov: unclipped surrogate everywhere, |log-ratio| penalty on the top-k tokens by covariance.
        pg = terms["pg_unclipped"]
        penalty = coefs["kl_cov_coef"] * log_ratio.abs()
        penalty = torch.where(selection.kl_cov_mask, penalty, torch.zeros_like(penalty))

    is_ratio = tis_weight = None
    if cfg.tis_cap > 0:
        is_ratio, tis_weight = _tis_weight(cfg.tis_cap, valid, old_logprobs, rollout_logprobs, logprobs.dtype)
        pg = pg * tis_weight
    if penalty is not None:
        pg = pg + penalty

    pg_loss = agg(pg)
    loss = pg_loss
    bonus = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    entropy_coef = coefs["entropy_coef"]
    if cfg.target_entropy > 0:            # Skywork-OR1: alpha_k = c_k I[e_k <= target], a tensor (no host sync)
        entropy_coef = selection.adaptive_entropy_coef.to(logprobs.dtype)
    if entropy is not None and (cfg.entropy_coef > 0 or cfg.target_entropy > 0):
        bonus = agg(entropy)
        # A zero coefficient (annealed off) still multiplies, so the graph and the metric keys do not change.
        loss = loss - entropy_coef * bonus
    tis = None if is_ratio is None else (is_ratio, tis_weight, cfg.tis_cap)
    metrics = _loss_metrics(valid, selection, loss, pg_loss, entropy_coef * bonus, log_ratio, clipped, tis)
    metrics.update(_token_entropy_metrics(cfg, valid, selection, raw_advantages, advantages, penalty))
    return loss, metrics


def _check_loss_inputs(cfg: LossConfig, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                       entropy: Tensor | None, rollout_logprobs: Tensor | None, selection: TokenSelection | None,
                       step: int) -> None:
    """policy_loss's arguments: shapes, the inputs the config needs, a selection of these rows and this step."""
    _check_inputs(cfg, logprobs, old_logprobs, advantages, mask)
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"loss.entropy_coef={cfg.entropy_coef} > 0 needs the per-token entropy: pass entropy=[B, T] "
                         "(from ops.vocab_parallel.logprobs_and_entropy)")
    for name in ("entropy_advantage_coef", "target_entropy"):
        if getattr(cfg, name) > 0 and entropy is None:
            raise ValueError(f"loss.{name}={getattr(cfg, name)} > 0 needs the per-token entropy: pass "
                             "entropy=[B, T] (from ops.vocab_parallel.logprobs_and_entropy)")
    if selection is not None and needs_entropy(cfg) and selection.mean_entropy is None:
        raise ValueError(f"loss.name={cfg.name!r} (loss.target_entropy={cfg.target_entropy}) needs a selection made "
                         "with the entropy: pass entropy=[B, T] to compute_token_selection")
    if entropy is not None and entropy.shape != logprobs.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected {tuple(logprobs.shape)}")
    if cfg.tis_cap > 0:
        if rollout_logprobs is None:
            raise ValueError(f"loss.tis_cap={cfg.tis_cap} > 0 needs the rollout engine's log-probs: pass "
                             "rollout_logprobs=[B, T] (TrainBatch.rollout_logprobs), or set loss.tis_cap=0")
        if rollout_logprobs.shape != logprobs.shape:
            raise ValueError(f"rollout_logprobs has shape {tuple(rollout_logprobs.shape)}, expected "
                             f"{tuple(logprobs.shape)} like logprobs")
    if selection is not None:
        if selection.covariance.shape != logprobs.shape:
            raise ValueError(f"selection covers shape {tuple(selection.covariance.shape)} but the tensors are "
                             f"{tuple(logprobs.shape)}: pass selection.rows(<this micro-batch's rows>)")
        if selection.step != step:
            raise ValueError(f"selection was computed for step {selection.step}, policy_loss got step={step}")


def _tis_weight(cap: float, valid: Tensor, old_logprobs: Tensor, rollout_logprobs: Tensor,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(is_ratio, w) [B, T]: exp(old - rollout) and w = min(is_ratio, cap) in ``dtype``; 1 at invalid tokens.

    Truncated importance sampling of the rollout/trainer mismatch. Detached (a weight, not a gradient path), per
    token (so invariant to the batch layout), masked before exp like the log-ratio. It multiplies the
    policy-gradient surrogate only, not the KL-Cov penalty or the entropy bonus (why: docs/design/losses.md).
    """
    with torch.no_grad():
        is_log_ratio = torch.where(valid, old_logprobs.detach() - rollout_logprobs.detach(),
                                   torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device))
        is_ratio = torch.exp(is_log_ratio)
        return is_ratio, torch.clamp(is_ratio, max=cap).to(dtype)


def _loss_metrics(valid: Tensor, selection: TokenSelection, loss: Tensor, pg_loss: Tensor, bonus: Tensor,
                  log_ratio: Tensor, clipped: dict[str, Tensor],
                  tis: tuple[Tensor, Tensor, float] | None) -> dict[str, Tensor]:
    """policy_loss's metrics: detached float32 shares of the global values (one SUM all-reduce gives them).

    ``bonus``: the aggregated entropy times its coefficient; ``clipped``: the low/high/dual clip masks [B, T];
    ``tis``: (is_ratio, weight, cap) when truncated importance sampling is on.
    """
    coefs = selection.coefs
    with torch.no_grad():
        inv_n = 1.0 / selection.num_valid.clamp(min=1).double()
        local_valid = valid.sum(dtype=torch.int64)
        share = local_valid.double() * inv_n

        def frac(m: Tensor) -> Tensor:
            return ((m & valid).sum(dtype=torch.int64).double() * inv_n).float()

        def token_mean(x: Tensor) -> Tensor:
            return (torch.where(valid, x.detach().double(), 0.0).sum() * inv_n).float()

        metrics: dict[str, Tensor] = {
            "train/loss": loss.detach().float(),
            "train/pg_loss": pg_loss.detach().float(),
            "train/entropy_bonus": bonus.detach().float(),
            "train/ppo_kl": token_mean(-log_ratio),
            "train/clip_frac_low": frac(clipped["low"]),
            "train/clip_frac_high": frac(clipped["high"]),
            "train/clip_frac_dual": frac(clipped["dual"]),
            "train/clip_cov_frac": frac(selection.clip_cov_mask),
            "train/kl_cov_frac": frac(selection.kl_cov_mask),
            "cov/mean": token_mean(selection.covariance),
        }
        if tis is not None:
            is_ratio, tis_weight, cap = tis
            metrics["train/is_ratio_mean"] = token_mean(is_ratio)
            metrics["train/tis_weight_mean"] = token_mean(tis_weight)
            metrics["train/tis_clip_frac"] = frac(is_ratio > cap)
        for level, q in zip(selection.quantile_levels, selection.cov_quantiles):
            metrics[_quantile_key(level)] = (q.double() * share).float()
        for name, value in coefs.items():
            metrics[f"coef/{name}"] = (share * value).float()
    return metrics


def _token_entropy_metrics(cfg: LossConfig, valid: Tensor, selection: TokenSelection, raw_advantages: Tensor,
                           advantages: Tensor, penalty: Tensor | None) -> dict[str, Tensor]:
    """The token-entropy family's own metrics, only for the methods that are on (shares of the global value,
    as :func:`_loss_metrics`): train/high_entropy_frac and entropy/threshold (high_entropy_tokens),
    train/archer_high_frac and train/archer_kl (archer), train/adv_shaping_mean and train/adv_shaping_bound_frac
    (entropy_advantage_coef > 0), coef/adaptive_entropy_coef and entropy/adaptive_mean (target_entropy > 0)."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        inv_n = 1.0 / selection.num_valid.clamp(min=1).double()
        share = valid.sum(dtype=torch.int64).double() * inv_n

        def frac(m: Tensor) -> Tensor:
            return ((m & valid).sum(dtype=torch.int64).double() * inv_n).float()

        def token_mean(x: Tensor) -> Tensor:
            return (torch.where(valid, x.detach().double(), 0.0).sum() * inv_n).float()

        if cfg.name == "high_entropy_tokens":
            out["train/high_entropy_frac"] = frac(selection.high_entropy_mask)
            out["entropy/threshold"] = (selection.entropy_threshold.double() * share).float()
        if cfg.name == "archer":
            out["train/archer_high_frac"] = frac(selection.archer_high_mask)
            out["train/archer_kl"] = token_mean(penalty)
        if advantages is not raw_advantages:
            out["train/adv_shaping_mean"] = token_mean(advantages - raw_advantages)
            bound = raw_advantages.abs() / cfg.entropy_advantage_kappa
            out["train/adv_shaping_bound_frac"] = frac((advantages - raw_advantages) >= bound)
        if cfg.target_entropy > 0:
            out["coef/adaptive_entropy_coef"] = (selection.adaptive_entropy_coef.double() * share).float()
            out["entropy/adaptive_mean"] = (selection.mean_entropy.double() * share).float()
    return out


@functools.cache
def _warn_kl_cov_inert_once() -> None:
    logger.warning("loss.name='kl_cov' with optim.num_mini_batches=1: every mini-batch is fully on-policy "
                   "(log pi == log pi_old), so the KL-Cov penalty beta*|log pi - log pi_old| is 0 and its gradient "
                   "sign(0) = 0: KL-Cov is inert and the loss is plain -A*ratio. Use several optimizer mini-batches "
                   "per rollout batch (released: 8).")


def warn_if_kl_cov_inert(loss_cfg: LossConfig, num_mini_batches: int) -> bool:
    """Warn once (per process) if KL-Cov runs with a single optimizer mini-batch per rollout batch.

    policy_loss cannot see the batch split, so the trainer calls this at start-up. Returns True when inert.
    """
    inert = loss_cfg.name == "kl_cov" and num_mini_batches == 1
    if inert:
        _warn_kl_cov_inert_once()
    return inert
