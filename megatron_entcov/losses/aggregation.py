"""Loss aggregation over tokens and sequences with GLOBAL denominators.

Owns ``LossConfig.agg``. The three modes are verl's ``agg_loss`` modes (the paper's released runs use
token-mean, arXiv 2505.22617), with one change that makes them exact under any split: the denominator is
the count over the whole optimizer mini-batch (all micro-batches, all data-parallel ranks), passed in by the
caller, instead of the count of the local micro-batch. Summing the returned values over every micro-batch
and every rank then gives exactly the single-process full-batch value (up to float summation order).

    token-mean:           sum_{s,t} m_st x_st / N_tok            N_tok: global number of valid tokens
    seq-mean-token-sum:   sum_s (sum_t m_st x_st) / N_seq        N_seq: global number of sequences with >= 1
    seq-mean-token-mean:  sum_s (sum_t m_st x_st / sum_t m_st) / N_seq      valid token (empty rows do not count)

A sequence's token count sum_t m_st comes either from the micro-batch itself (every sequence whole inside it: a
row slice, or a packed row whose ``segment_ids`` tell the sequences apart) or, as ``token_counts``, from the row
layout: each token carries its sequence's count, so seq-mean-token-mean is sum_{s,t} m_st x_st / c_s / N_seq and
stays exact when a sequence's tokens are split over ranks (context parallelism, docs/design/context_parallel.md).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from megatron_entcov.config import AGG_MODES

logger = logging.getLogger(__name__)

__all__ = ["aggregate", "count_valid"]


def count_valid(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Local (valid tokens, sequences with >= 1 valid token) of a [B, T] mask, as int64 0-dim tensors."""
    mask = mask.bool()
    return mask.sum(dtype=torch.int64), mask.any(dim=-1).sum(dtype=torch.int64)


def aggregate(values: Tensor, mask: Tensor, agg: str, *, num_valid: Tensor, num_seqs: Tensor,
              segment_ids: Tensor | None = None, token_counts: Tensor | None = None) -> Tensor:
    """Aggregate per-token values [B, T] to a scalar with global denominators.

    Args:
        values: [B, T] float; entries where mask is 0 are ignored (they may be inf/nan: masked with where,
            not multiplied, so they cannot leak NaN into the value or the gradient).
        mask: [B, T] bool/0-1 valid tokens.
        agg: one of AGG_MODES.
        num_valid: int64 0-dim tensor, global valid-token count of the optimizer mini-batch (token-mean).
        num_seqs: int64 0-dim tensor, global count of sequences with >= 1 valid token (seq-mean-*).
        segment_ids: [B, T] int64 sequence of each token, when a row holds several (packed micro-batches);
            None = one sequence per row.
        token_counts: [B, T] the valid-token count of each token's whole sequence (seq-mean-token-mean only;
            read at valid tokens): the per-sequence means then need no sequence whole in ``values``. None = the
            counts of ``mask`` per row / segment.

    Returns:
        0-dim tensor in values' dtype; this slice's share of the global aggregate (0 for an empty batch).
    """
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if agg == "token-mean":
        return masked.sum() / num_valid.clamp(min=1).to(values.dtype)
    if agg == "seq-mean-token-sum":
        return masked.sum() / num_seqs.clamp(min=1).to(values.dtype)
    if agg == "seq-mean-token-mean":
        if token_counts is not None:
            per_token = masked / token_counts.clamp(min=1).to(values.dtype)
            return per_token.sum() / num_seqs.clamp(min=1).to(values.dtype)
        if segment_ids is None:
            sums, counts = masked.sum(dim=-1), mask.sum(dim=-1)
        else:
            index = segment_ids.reshape(-1)
            size = index.numel()               # >= the number of segments; empty ones add 0 (no host sync)
            sums = masked.new_zeros(size).index_add(0, index, masked.reshape(-1))
            counts = torch.zeros(size, dtype=torch.int64, device=mask.device).index_add(
                0, index, mask.reshape(-1).to(torch.int64))
        per_seq = sums / counts.clamp(min=1).to(values.dtype)
        return per_seq.sum() / num_seqs.clamp(min=1).to(values.dtype)
    raise ValueError(f"loss.agg={agg!r} is invalid: choose one of {', '.join(repr(a) for a in AGG_MODES)}")
