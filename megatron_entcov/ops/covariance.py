"""Global token covariance and exact global token selection over a data-parallel group.

Owns the batch statistics behind Clip-Cov and KL-Cov (arXiv 2505.22617, sections 3-4):
``cov_t = (log pi_t - mean(log pi)) * (A_t - mean(A))`` over valid tokens, with both means over every valid
token of the *global* optimizer batch (every micro-batch passed in, every rank of ``group``); a global top-k
with a deterministic tie rule (KL-Cov); a seeded global uniform choice among candidates (Clip-Cov: the n
smallest hashes of (seed, step, token key)); exact global quantiles. Every result depends only on the global
batch (values and token keys), the seed and the step, never on the split over ranks, rows or micro-batches:
the sums are 64-bit fixed point (associative) and the selections a radix select of a fixed number of rounds,
each one small SUM all-reduce. No host synchronisation. ``group=None`` means single process: no communication.

Design notes (the exactness argument, the deviations from the released code, why no all_gather):
docs/design/ops.md
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from megatron_entcov.distributed import collectives

logger = logging.getLogger(__name__)

__all__ = [
    "FIXED_POINT_BITS",
    "global_sum",
    "masked_global_mean",
    "token_covariance",
    "splitmix64",
    "selection_salt",
    "float_to_ordered_int",
    "ordered_int_to_float",
    "radix_select_smallest",
    "global_topk_mask",
    "global_random_choice_mask",
    "global_quantiles",
]

FIXED_POINT_BITS = 24
"""Fractional bits of the fixed-point sums behind the global means (see the module docstring)."""

_RADIX_BITS = 8
_RADIX = 1 << _RADIX_BITS
_MASK32 = 0xFFFFFFFF
_SIGN64 = -(1 << 63)  # 0x8000000000000000 as a signed int64

# splitmix64 constants (Steele, Lea, Flood 2014), written as signed int64 so torch accepts them.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def global_sum(x: Tensor, group=None) -> Tensor:
    """SUM all-reduce of a detached copy of ``x`` over ``group`` (None: returned as is, no communication)."""
    if group is None:
        return x
    out = x.detach().clone()
    collectives.all_reduce(out, op="sum", group=group)
    return out


def _fixed_point_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of x over mask as an int64 count of 2**-FIXED_POINT_BITS units (order-independent)."""
    scaled = torch.where(mask, x.detach().double(), 0.0) * float(1 << FIXED_POINT_BITS)
    return torch.round(scaled).to(torch.int64).sum()


def masked_global_mean(x: Tensor, mask: Tensor, group=None) -> tuple[Tensor, Tensor]:
    """Mean of ``x`` over valid entries of every rank of ``group``, bitwise independent of the split.

    Args:
        x: [...] float tensor (detached internally). Values at masked-out positions are ignored (may be inf/nan).
        mask: [...] bool/0-1 tensor, same shape; valid entries.
        group: process group to reduce over; None = this process only.

    Returns:
        (mean, count): mean is a float64 0-dim tensor (0 when there is no valid entry), count the int64
        global number of valid entries. One SUM all-reduce of 2 int64 values.
    """
    mask = mask.bool()
    stats = torch.stack([_fixed_point_sum(x, mask), mask.sum(dtype=torch.int64)])
    stats = global_sum(stats, group)
    total, count = stats[0], stats[1]
    mean = total.double() / float(1 << FIXED_POINT_BITS) / count.clamp(min=1).double()
    return mean, count


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor, group=None) -> Tensor:
    """Token-level centred cross product cov_t = (logp_t - mean(logp)) * (A_t - mean(A)) (arXiv 2505.22617).

    Args:
        logprobs: [B, T] (any shape) log pi of the sampled tokens; detached here (selection statistic only).
        advantages: [B, T] advantages broadcast to tokens.
        mask: [B, T] valid response tokens (bool or 0/1).
        group: the data-parallel group; the means run over every valid token of every rank. (Under context
            parallelism the ranks of a cp group hold the same rows in the row layout and pass the same values:
            the result is the same on each; docs/design/context_parallel.md.) Pass the rank's whole optimizer mini-batch (all its micro-batches) so the means are those of
            the global batch. None = this process only.

    Returns:
        [B, T] float32, 0 where mask is 0. Bitwise identical for any split of the same global batch over
        ranks (the means use fixed-point sums, see the module docstring); +0.0 is canonical for zeros.
    """
    if logprobs.shape != advantages.shape or logprobs.shape != mask.shape:
        raise ValueError(f"token_covariance: shapes differ: logprobs {tuple(logprobs.shape)}, "
                         f"advantages {tuple(advantages.shape)}, mask {tuple(mask.shape)}")
    mask = mask.bool()
    logprobs = logprobs.detach()
    advantages = advantages.detach()
    # Both means in one all-reduce: [sum logp, sum A, count].
    stats = torch.stack([_fixed_point_sum(logprobs, mask), _fixed_point_sum(advantages, mask),
                         mask.sum(dtype=torch.int64)])
    stats = global_sum(stats, group)
    denom = stats[2].clamp(min=1).double() * float(1 << FIXED_POINT_BITS)
    mean_logp = stats[0].double() / denom
    mean_adv = stats[1].double() / denom
    cov = (logprobs.double() - mean_logp) * (advantages.double() - mean_adv)
    # `+ 0.0` turns -0.0 into +0.0 so that equal values have equal integer encodings in the selection.
    return torch.where(mask, cov, 0.0).float() + 0.0


# --------------------------------------------------------------------------------------------------
# Hashing: a counter-based, split-independent random order.
# --------------------------------------------------------------------------------------------------


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64 finaliser on an int64 tensor (bit pattern as uint64, wrapping arithmetic). A bijection."""
    z = x.to(torch.int64) + _GOLDEN
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def _splitmix64_int(x: int) -> int:
    """The same function on Python ints (unsigned 64-bit result)."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def selection_salt(seed: int, step: int) -> int:
    """A 64-bit salt from (seed, step) as a signed int64 Python int; hashed on the host, no device work."""
    s = _splitmix64_int(_splitmix64_int(int(seed) & ((1 << 64) - 1)) ^ (int(step) & ((1 << 64) - 1)))
    return s - (1 << 64) if s >= 1 << 63 else s


# --------------------------------------------------------------------------------------------------
# Order-preserving integer encodings.
# --------------------------------------------------------------------------------------------------


def float_to_ordered_int(x: Tensor, *, descending: bool = False) -> Tensor:
    """float32 -> int64 in [0, 2**32) whose unsigned order is the float order (descending: reversed).

    -0.0 sorts just below +0.0 and NaN above +inf; canonicalise zeros (``x + 0.0``) before encoding.
    """
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)  # sign-extended
    enc = torch.where(bits >= 0, bits | (1 << 31), (~bits) & _MASK32)
    return (~enc) & _MASK32 if descending else enc


def ordered_int_to_float(enc: Tensor) -> Tensor:
    """Inverse of :func:`float_to_ordered_int` (ascending encoding) -> float32."""
    enc = enc.to(torch.int64) & _MASK32
    bits = torch.where(enc >= (1 << 31), enc & 0x7FFFFFFF, (~enc) & _MASK32)
    bits = torch.where(bits >= (1 << 31), bits - (1 << 32), bits)  # to the signed int32 range
    return bits.to(torch.int32).view(torch.float32)


# --------------------------------------------------------------------------------------------------
# Exact global radix select.
# --------------------------------------------------------------------------------------------------


def radix_select_smallest(words: Sequence[tuple[Tensor, int]], eligible: Tensor, n: Tensor,
                          group=None) -> tuple[Tensor, list[Tensor]]:
    """Select the ``n`` globally smallest eligible elements under a lexicographic integer key; exact.

    Args:
        words: the key, most significant word first, as (int64 tensor shaped like ``eligible``, nbits);
            each word compares as an unsigned ``nbits``-bit integer (nbits a multiple of 8, at most 64; the
            bits above nbits must be 0, except for nbits=64).
        eligible: [...] bool, the candidates of this rank.
        n: int64 tensor, [] or [Q]: how many to select, per query (Q independent selections share rounds and
            all-reduces). n larger than the global candidate count selects every candidate; n=0 selects none.
        group: reduce over this group (None: this process only). All ranks must call with the same words layout.

    Returns:
        (selected, boundary): selected is bool [...] (or [Q, ...] when n is 1-D); boundary is a list, one per
        word, of int64 [] / [Q]: the key of the n-th smallest global candidate (meaningful when
        1 <= n <= global candidate count). If several candidates share the boundary key all of them are
        selected; with keys unique (the callers ensure it) exactly n are.

    Cost: sum(nbits) / 8 rounds, each one SUM all-reduce of Q * 256 int64. No host synchronisation.
    """
    shape = eligible.shape
    batched = n.dim() == 1
    n = n.reshape(-1).to(device=eligible.device, dtype=torch.int64)
    q = n.numel()
    elig = eligible.reshape(-1).bool()
    alive = elig.unsqueeze(0).expand(q, -1).clone()
    selected = torch.zeros_like(alive)
    remaining = n.clone()
    offsets = (torch.arange(q, device=elig.device, dtype=torch.int64) * _RADIX).unsqueeze(1)
    zero_col = torch.zeros(q, 1, dtype=torch.int64, device=elig.device)
    boundary = []
    for word, nbits in words:
        if nbits % _RADIX_BITS or not 0 < nbits <= 64:
            raise ValueError(f"radix_select_smallest: nbits={nbits} must be a multiple of 8 in (0, 64]")
        word = word.reshape(-1).to(torch.int64)
        prefix = torch.zeros(q, dtype=torch.int64, device=elig.device)
        for shift in range(nbits - _RADIX_BITS, -1, -_RADIX_BITS):
            digit = (word >> shift) & (_RADIX - 1)  # arithmetic shift + mask = the unsigned byte
            index = (digit.unsqueeze(0) + offsets).reshape(-1)
            hist = torch.zeros(q * _RADIX, dtype=torch.int64, device=elig.device)
            hist.scatter_add_(0, index, alive.reshape(-1).to(torch.int64))
            hist = global_sum(hist, group).view(q, _RADIX)
            cum = hist.cumsum(dim=1)
            # Boundary digit b: the smallest digit whose cumulative count reaches `remaining`
            # (b = 256 when there are fewer candidates than `remaining`: everything alive is taken).
            b = (cum < remaining.unsqueeze(1)).sum(dim=1)
            below = torch.cat([zero_col, cum], dim=1).gather(1, b.unsqueeze(1)).squeeze(1)
            digit_q = digit.unsqueeze(0)
            selected |= alive & (digit_q < b.unsqueeze(1))
            alive &= digit_q == b.unsqueeze(1)
            remaining = remaining - below
            prefix = prefix | (b.clamp(max=_RADIX - 1) << shift)
        boundary.append(prefix if batched else prefix[0])
    # Whatever is still alive shares the boundary key exactly; take it if some of n is left.
    selected |= alive & (remaining > 0).unsqueeze(1)
    selected = selected.view(q, *shape)
    return (selected if batched else selected[0]), boundary


def _key_word(token_keys: Tensor) -> Tensor:
    """int64 keys -> 64-bit unsigned word with the signed order (flip the sign bit)."""
    return token_keys.to(torch.int64) ^ _SIGN64


def global_topk_mask(values: Tensor, token_keys: Tensor, eligible: Tensor, k: Tensor, group=None) -> Tensor:
    """Mask of the ``k`` largest ``values`` among eligible tokens of the whole group; ties -> smaller key first.

    Args:
        values: [B, T] float (compared as float32; NaN counts as largest).
        token_keys: [B, T] int64, unique over the global batch (e.g. global_sample_id * max_len + position).
        eligible: [B, T] bool.
        k: int64 0-dim tensor (global count), may be 0.
        group: data-parallel group or None.

    Returns:
        [B, T] bool; exactly min(k, global eligible) True over the group, the same set one process would pick.
    """
    words = [(float_to_ordered_int(values.detach().float() + 0.0, descending=True), 32),
             (_key_word(token_keys), 64)]
    selected, _ = radix_select_smallest(words, eligible, k, group)
    return selected


def global_random_choice_mask(token_keys: Tensor, eligible: Tensor, n: Tensor, *, seed: int, step: int,
                              group=None) -> Tensor:
    """Uniform random choice of ``n`` eligible tokens of the whole group, a function of (keys, seed, step) only.

    Each token is ranked by ``splitmix64(token_key XOR selection_salt(seed, step))`` and the n smallest ranks
    among eligible tokens are taken. For a fixed salt the hash is a bijection of the key, so ranks are
    distinct; across keys they behave as independent uniform draws, i.e. the chosen set is a uniform random
    n-subset of the candidates (as ``randperm(...)[:n]`` in the released code), fresh at every step.

    Args:
        token_keys: [B, T] int64 unique token keys. eligible: [B, T] bool. n: int64 0-dim tensor.
        seed, step: Python ints (run seed and optimizer step). group: data-parallel group or None.

    Returns:
        [B, T] bool with exactly min(n, global eligible) True over the group.
    """
    ranks = splitmix64(token_keys.to(torch.int64) ^ selection_salt(seed, step))
    selected, _ = radix_select_smallest([(ranks, 64)], eligible, n, group)
    return selected


def global_quantiles(values: Tensor, mask: Tensor, levels: Sequence[float], group=None, *,
                     interpolation: str = "lower") -> Tensor:
    """Exact global quantiles of ``values`` over valid tokens (as torch.quantile with that ``interpolation``).

    With N valid values of the whole group and position p = q * (N - 1) (0-based, float64): 'lower' is the
    order statistic of 1-based rank floor(p) + 1, 'higher' the one of rank ceil(p) + 1, 'linear' the float64
    interpolation lo + (p - floor(p)) * (hi - lo) between the two (torch.quantile's default; returned as
    float64 so that a threshold test ``x >= t`` on float32 values is the same on every layout). Found by one
    batched radix select (4 rounds for float32, one all-reduce each; 'linear' selects both ranks at once).

    Args:
        values: [...] float (as float32). mask: [...] valid entries. levels: quantile levels in [0, 1].
        group: data-parallel group or None.
        interpolation: 'lower' (default), 'higher' or 'linear'.

    Returns:
        [len(levels)]: float32 ('lower', 'higher') or float64 ('linear'); 0 where there is no valid value.
    """
    if interpolation not in ("lower", "higher", "linear"):
        raise ValueError(f"interpolation={interpolation!r} is invalid: choose 'lower', 'higher' or 'linear'")
    if not levels:
        return values.new_zeros(0, dtype=torch.float64 if interpolation == "linear" else torch.float32)
    for level in levels:
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"quantile level {level!r} must lie in [0, 1]")
    mask = mask.bool()
    count = global_sum(mask.sum(dtype=torch.int64), group)
    lv = torch.tensor(list(levels), dtype=torch.float64, device=values.device)
    position = lv * (count - 1).clamp(min=0).double()
    lower = torch.floor(position).to(torch.int64) + 1
    upper = torch.ceil(position).to(torch.int64) + 1
    ranks = {"lower": lower, "higher": upper, "linear": torch.cat([lower, upper])}[interpolation]
    words = [(float_to_ordered_int(values.detach().float() + 0.0), 32)]
    _, (boundary,) = radix_select_smallest(words, mask, ranks, group)
    out = ordered_int_to_float(boundary)
    if interpolation == "linear":
        lo, hi = out[:len(levels)].double(), out[len(levels):].double()
        out = lo + (position - torch.floor(position)) * (hi - lo)
    return torch.where(count > 0, out, torch.zeros_like(out))
