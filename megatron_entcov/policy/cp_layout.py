"""Which tokens of a sequence each context-parallel rank holds: the one definition the batch split, the attention
across ranks and the tests share.

Megatron's load-balanced layout (the one Transformer Engine's context-parallel attention and Megatron's RoPE
slicing expect): every sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r``, in that order, so each rank gets the same share of the causal mask's work. A packed row (THD)
applies this per sequence: each sequence's length is a multiple of ``2 * cp`` (padded so), and a rank's tokens are
its two chunks of the first sequence, then of the second, and so on.

Example:
    cp_shard_index([8], cp_size=2, cp_rank=0)        # tensor([0, 1, 6, 7])
    cp_shard_index([8], cp_size=2, cp_rank=1)        # tensor([2, 3, 4, 5])
    cp_shard_index([4, 8], cp_size=2, cp_rank=1)     # tensor([1, 2, 6, 7, 8, 9])
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["cp_shard_index"]


def cp_shard_index(lengths: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """The positions (int64, into the row of ``sum(lengths)`` tokens) of the tokens context-parallel rank
    ``cp_rank`` of ``cp_size`` holds, in its local order (see the module docstring).

    Args:
        lengths: the row's sequence lengths, back to back (one entry for a padded row [T]); each a multiple of
            ``2 * cp_size``.
        cp_size: the context-parallel size (1: every position).
        cp_rank: this rank's index in the context-parallel group.

    Raises:
        ValueError: a length not divisible by ``2 * cp_size``, or a rank outside the group.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is outside a group of {cp_size}")
    parts = []
    start = 0
    for length in lengths:
        if length % (2 * cp_size):
            raise ValueError(f"a sequence of {length} tokens does not split into 2 * context_parallel_size = "
                             f"{2 * cp_size} equal chunks; pad it to a multiple of {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        start += length
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)
