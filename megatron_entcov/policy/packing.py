"""Micro-batches of the model: row slices of a TrainBatch, or samples packed into one row under a token budget.

Owns :class:`MicroBatch` (what the model and the loss read of one micro-batch), :func:`micro_batches` (the
split of a batch), :func:`scatter_rows` (outputs back to the row layout) and the packed attention. With
``optim.max_tokens_per_micro_batch`` each micro-batch is ONE row [1, L] of samples back to back (balanced
first-fit, :func:`plan_bins`; boundaries in Megatron's THD ``PackedSeqParams``), every per-token tensor gathered
from the batch's rows: a token carries its padded-row values, and the loss equals the padded path's.

Context parallelism (``cp_size`` > 1): every sequence is padded to a multiple of 2 * cp (a padded micro-batch's
rows to a multiple of 2 * cp and of cp * ``multiple_of``; a packed row's samples each, and the row), then each
micro-batch keeps only this rank's tokens (policy/cp_layout.py: cp_shard_index per sequence), labels included:
they were shifted in the row layout, so a token's label is the next token by global position. Packed rows keep
the GLOBAL ``cu_seqlens`` (Megatron's RoPE and the attention divide them by cp). :func:`cp_gather` puts the
per-token outputs of the context-parallel ranks back into the full micro-batch layout.

Example:
    micro = micro_batches(batch, micro_batch_size=4, max_tokens=4096, multiple_of=tp)
    micro[0].input_ids.shape               # [1, L], L <= 4096 (padded mode: [4, T])
    micro[0].view(batch.advantages)        # the batch tensor in this micro-batch's layout
    logprobs = scatter_rows(batch, micro, [lp_0, lp_1, ...])    # [N, T] again

Design notes: docs/design/policy.md
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_entcov.distributed.collectives import all_gather
from megatron_entcov.policy.batch import TrainBatch
from megatron_entcov.policy.cp_layout import cp_shard_index
from megatron_entcov.policy.pipeline import ModelInput

__all__ = ["MicroBatch", "plan_bins", "micro_batches", "scatter_rows", "cp_gather", "cp_row_multiple",
           "HostPackedSeqParams", "PackedDotProductAttention"]


@dataclasses.dataclass(kw_only=True)
class MicroBatch(ModelInput):
    """One micro-batch of a :class:`TrainBatch`, in one of two layouts (shapes written for both):

    - padded: a row slice of the batch, every per-token tensor [b, T] (one right-padded sample per row);
    - packed: one row [1, L] holding its samples back to back (L <= the token budget, padded to a multiple of
      the tensor-parallel size), with ``packed_seq_params``, ``segment_ids`` and ``flat_index`` set.

    The model reads ``input_ids``, ``position_ids`` and ``packed_seq_params`` (:class:`ModelInput`); the rest is
    the batch's per-token tensors in this layout, for the loss. Any other [N, T] tensor of the batch (a token
    selection, entropies) maps into the layout with ``view``.
    """

    labels: torch.Tensor
    """[b, T] | [1, L] int64: the token whose log-prob the logits at each position give (the next token)."""
    loss_mask: torch.Tensor
    """[b, T] | [1, L] bool: response tokens (scored); False at prompt tokens and padding."""
    advantages: torch.Tensor
    """[b, T] | [1, L] float32: each response token's advantage (its sample's), 0 elsewhere."""
    rollout_logprobs: torch.Tensor
    """[b, T] | [1, L] float32: the rollout engine's log-probs of the response tokens, 0 elsewhere."""
    old_logprobs: torch.Tensor | None = None
    """[b, T] | [1, L] float32: log pi_old of the step (None while they are being computed)."""
    rows: slice | list[int]
    """The batch rows this micro-batch holds: a slice (padded), or the packed samples' rows in row order."""
    view: Callable[[torch.Tensor], torch.Tensor]
    """Maps a tensor of the batch's row layout [N, T] into this micro-batch's layout ([b, T] | [1, L])."""
    segment_ids: torch.Tensor | None = None
    """Packed only: [1, L] int64 sample index of each token within the row (0, 1, ...; the padding tail is one
    more segment). seq-mean-token-mean averages per sample with it. None for padded rows."""
    flat_index: torch.Tensor | None = None
    """Packed only: [L] int64 index of each token into the batch flattened to [N * T] (N * T: padding).
    :func:`scatter_rows` writes outputs back with it. None for padded rows. Under context parallelism it indexes
    the full micro-batch (outputs go through :func:`cp_gather` first)."""
    cp_lengths: tuple[int, ...] | None = None
    """Context parallelism only: the sequence lengths of the full micro-batch's row (one entry, T, for padded rows;
    each packed segment, padding included), every one a multiple of 2 * cp. The per-token fields above hold this
    rank's tokens of them (cp_shard_index), in its local order. None without context parallelism."""

    @classmethod
    def of(cls, batch: TrainBatch, view: Callable[[torch.Tensor], torch.Tensor], rows: slice | list[int],
           **packed) -> "MicroBatch":
        """The micro-batch ``view`` selects from ``batch``; ``packed``: the packed-row fields."""
        old = None if batch.old_logprobs is None else view(batch.old_logprobs)
        return cls(input_ids=view(batch.input_ids), position_ids=view(batch.position_ids),
                   labels=view(batch.labels), loss_mask=view(batch.loss_mask), advantages=view(batch.advantages),
                   rollout_logprobs=view(batch.rollout_logprobs), old_logprobs=old, rows=rows, view=view, **packed)


@dataclasses.dataclass
class HostPackedSeqParams(PackedSeqParams):
    """Megatron's PackedSeqParams plus the segment lengths on the host, so the local attention splits the row
    without reading ``cu_seqlens`` back from the device in every layer."""

    seq_lengths: tuple[int, ...] = ()


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local attention, also for packed rows: with THD ``packed_seq_params`` (query, key, value
    [t, heads, dim], RoPE already applied per sample by Megatron) it runs the local causal attention on each
    sample's segment separately, so the result is the padded path's, kernel for kernel, at sum(len^2) cost
    rather than L^2. Without ``packed_seq_params`` it is DotProductAttention unchanged."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: the local attention "
                             "reads 'thd' only")
        lengths = getattr(packed_seq_params, "seq_lengths", ()) or \
            (packed_seq_params.cu_seqlens_q[1:] - packed_seq_params.cu_seqlens_q[:-1]).tolist()
        parts = [super(PackedDotProductAttention, self).forward(q[:, None], k[:, None], v[:, None], None,
                                                                attn_mask_type=attn_mask_type)
                 for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths))]
        return torch.cat(parts)                  # [t, 1, heads * dim]; Megatron reshapes it to [t, 1, hidden]


def plan_bins(lengths: Sequence[int], max_tokens: int, *, multiple_of: int = 1,
              count_multiple: int = 1) -> list[list[int]]:
    """Assign samples to micro-batches of at most ``max_tokens`` tokens (after padding to ``multiple_of``).

    Balanced first-fit: k = ceil(total / max_tokens) micro-batches (rounded up to ``count_multiple``: Megatron's
    interleaved schedule needs a multiple of the pipeline size), then the samples longest first, each into the
    least-loaded micro-batch with room for it; if one has room nowhere, k grows and the assignment restarts.
    Every micro-batch gets at least one sample. Deterministic: ties go to the lower index.

    Args:
        lengths: tokens per sample.
        max_tokens: the budget of one micro-batch; must hold the longest sample.
        multiple_of: a micro-batch's row is padded to a multiple of this (counted against the budget).
        count_multiple: the number of micro-batches is a multiple of this.

    Returns:
        Sample indices per micro-batch, each list ascending.

    Raises:
        ValueError: a sample longer than the budget, or fewer samples than ``count_multiple``.
    """
    n = len(lengths)
    if n == 0:
        return []
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"a sample of {longest} tokens does not fit optim.max_tokens_per_micro_batch={max_tokens}; "
                         "set it to at least rollout.max_prompt_len + sampling.max_new_tokens")
    if n < count_multiple:
        raise ValueError(f"{n} samples cannot fill {count_multiple} micro-batches (the interleaved pipeline schedule "
                         "needs a multiple of the pipeline size); lower optim.max_tokens_per_micro_batch's share or "
                         "use more samples per mini-batch")
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    k = max(math.ceil(sum(lengths) / max_tokens), 1)
    while True:
        k = -(-k // count_multiple) * count_multiple
        if k > n:
            raise ValueError(f"cannot split {n} samples (lengths {sorted(lengths)}) into micro-batches of "
                             f"{max_tokens} tokens in a multiple of {count_multiple}")
        bins: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        placed = True
        for i in order:
            best = -1
            for b in range(k):
                padded = -(-(load[b] + lengths[i]) // multiple_of) * multiple_of
                if padded <= max_tokens and (best < 0 or load[b] < load[best]):
                    best = b
            if best < 0:
                placed = False
                break
            bins[best].append(i)
            load[best] += lengths[i]
        if placed:
            return [sorted(b) for b in bins]
        k += 1


def _slice(rows: slice, extra: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view ``[N, T] -> [b, T + extra]``: the rows of a row-layout tensor (a view, no copy, when ``extra`` is
    0; else a copy with ``extra`` more padding positions reading 0/False: context parallelism)."""
    if not extra:
        return lambda t: t[rows]
    return lambda t: F.pad(t[rows], (0, 0) * (t.dim() - 2) + (0, extra))     # dim 1, the tokens


def _gather(flat_index: torch.Tensor, length: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view ``[N, T] -> [1, L]``: the indexed tokens of a row-layout tensor; the padding slot reads 0/False."""
    def view(t: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1), t.new_zeros(1)])
        return flat[flat_index].view(1, length)
    return view


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def cp_row_multiple(multiple_of: int, cp_size: int) -> int:
    """What a row's length (a padded micro-batch's T, a packed row's L) is padded to: ``multiple_of`` (the
    tensor-parallel size) without context parallelism; with it, a multiple of 2 * cp (every sequence splits into
    2 * cp chunks) whose share per rank (L / cp) is a multiple of ``multiple_of`` (sequence parallelism splits
    it again)."""
    return multiple_of if cp_size == 1 else math.lcm(2 * cp_size, cp_size * multiple_of)


def _packed(batch: TrainBatch, rows: list[int], lengths: list[int], multiple_of: int,
            pad_to: int = 0, seq_multiple: int = 1) -> MicroBatch:
    """One micro-batch: ``rows`` of ``batch`` back to back in one row, each sample padded to ``seq_multiple``
    (context parallelism), the row to ``multiple_of`` (and to at least ``pad_to``)."""
    n, t = batch.input_ids.shape
    seg = [_round_up(lengths[r], seq_multiple) for r in rows]
    total = sum(seg)
    length = _round_up(max(total, pad_to), multiple_of)
    if length > total:
        seg.append(length - total)            # the padding is a segment of its own: it attends only to itself
    index = torch.full((length,), n * t, dtype=torch.long)      # n * t: the zero slot of _gather's view
    segment_ids = torch.empty(length, dtype=torch.long)
    pos = 0
    for s, r in enumerate(rows):
        index[pos:pos + lengths[r]] = torch.arange(r * t, r * t + lengths[r])
        segment_ids[pos:pos + seg[s]] = s     # a sample's own padding (seq_multiple) is masked like any padding
        pos += seg[s]
    segment_ids[pos:] = len(rows)
    device = batch.input_ids.device
    index = index.to(device)
    cu = torch.tensor([0, *torch.tensor(seg).cumsum(0).tolist()], dtype=torch.int32)
    params = HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
                                 max_seqlen_q=max(seg), max_seqlen_kv=max(seg), seq_lengths=tuple(seg))
    # Positions restart per sample (gathered from the rows); padding reads position 0.
    return MicroBatch.of(batch, _gather(index, length), rows, packed_seq_params=params,
                         segment_ids=segment_ids.to(device)[None, :], flat_index=index)


def micro_batches(batch: TrainBatch, *, micro_batch_size: int, max_tokens: int = 0, multiple_of: int = 1,
                  count_multiple: int = 1, parts: int = 1, uniform: bool = False, cp_size: int = 1,
                  cp_rank: int = 0) -> list[MicroBatch]:
    """The model's micro-batches over ``batch`` (:class:`MicroBatch`).

    ``max_tokens == 0``: consecutive slices of ``micro_batch_size`` rows, [b, T] each (the padded path).
    ``max_tokens > 0``: :func:`plan_bins` micro-batches of one packed row [1, L] each, with
    ``packed_seq_params``, ``segment_ids`` [1, L] (0.. per sample, the last one padding) and ``flat_index`` [L].
    ``parts``: plan within each of that many equal consecutive row groups (the optimizer mini-batches), so a
    forward over the whole step packs every sample with the same bin-mates as its mini-batch's training step:
    the same matmul shapes give bit-identical log-probs, and the first mini-batch's log-ratio is exactly 0 as
    on the padded path (KL-Cov's |log-ratio| would otherwise get a gradient sign from rounding noise).
    ``uniform``: every packed row padded to ``max_tokens`` (the interleaved pipeline schedule: its exchange of
    per-micro-batch shapes between virtual stages mismatches messages under gloo at pp=2, where both neighbours
    are one rank; one fixed length also keeps a whole-step forward bit-identical to each mini-batch's step).
    ``cp_size`` > 1: sequences padded for context parallelism and only rank ``cp_rank``'s tokens kept (the
    module docstring; ``cp_lengths`` set); the packing plan counts each sample's padded length.
    """
    row_multiple = cp_row_multiple(multiple_of, cp_size)
    if not max_tokens:
        if batch.num_rows % micro_batch_size:
            raise ValueError(f"{batch.num_rows} rows do not split into micro-batches of {micro_batch_size}")
        t = batch.input_ids.shape[1]
        extra = _round_up(t, row_multiple) - t if cp_size > 1 else 0
        out = []
        for i in range(batch.num_rows // micro_batch_size):
            rows = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
            mb = MicroBatch.of(batch, _slice(rows, extra), rows)
            out.append(_cp_local(mb, (t + extra,), cp_size, cp_rank) if cp_size > 1 else mb)
        return out
    seq_multiple = 2 * cp_size if cp_size > 1 else 1
    lengths = batch.seq_lengths.tolist()
    if batch.num_rows % parts:
        raise ValueError(f"{batch.num_rows} rows do not split into {parts} equal parts")
    size = batch.num_rows // parts
    planned = [_round_up(length, seq_multiple) for length in lengths]
    bins = []
    for part in range(parts):
        offset = part * size
        bins += [[offset + r for r in b] for b in plan_bins(planned[offset:offset + size], max_tokens,
                                                           multiple_of=row_multiple, count_multiple=count_multiple)]
    pad_to = max_tokens if uniform else 0
    micro = [_packed(batch, rows, lengths, row_multiple, pad_to, seq_multiple) for rows in bins]
    if cp_size > 1:
        micro = [_cp_local(mb, mb.packed_seq_params.seq_lengths, cp_size, cp_rank) for mb in micro]
    return micro


def _cp_local(mb: MicroBatch, lengths: Sequence[int], cp_size: int, cp_rank: int) -> MicroBatch:
    """This context-parallel rank's tokens of the full micro-batch ``mb`` whose row holds sequences of
    ``lengths`` (policy/cp_layout.py); the packed boundaries stay global."""
    index = cp_shard_index(lengths, cp_size, cp_rank).to(mb.input_ids.device)
    local = {f.name: getattr(mb, f.name)[:, index]
             for f in dataclasses.fields(MicroBatch)
             if f.name in ("input_ids", "position_ids", "labels", "loss_mask", "advantages", "rollout_logprobs",
                           "old_logprobs", "segment_ids") and getattr(mb, f.name) is not None}
    full_view = mb.view
    return dataclasses.replace(mb, **local, view=lambda t: full_view(t)[:, index], cp_lengths=tuple(lengths))


def cp_gather(mb: MicroBatch, value: torch.Tensor, cp_size: int, group) -> torch.Tensor:
    """A per-token output of this rank's tokens of ``mb`` ([b, t_local, ...]) as the full micro-batch's
    ([b, t, ...]): every context-parallel rank's part, all-gathered over ``group`` (collective over it), put at
    its tokens' positions. Without context parallelism (``mb.cp_lengths`` None) ``value`` itself."""
    if mb.cp_lengths is None:
        return value
    parts = [torch.empty_like(value) for _ in range(cp_size)]
    all_gather(parts, value.contiguous(), group=group)
    out = value.new_empty((value.shape[0], sum(mb.cp_lengths), *value.shape[2:]))
    for rank, part in enumerate(parts):
        out[:, cp_shard_index(mb.cp_lengths, cp_size, rank).to(value.device)] = part
    return out


def scatter_rows(batch: TrainBatch, micro: list[MicroBatch], values: list[torch.Tensor]) -> torch.Tensor:
    """Per-token outputs of ``micro`` (in their full layouts: :func:`cp_gather` under context parallelism) back in
    ``batch``'s row layout [N, T]. Padding positions read 0 in packed mode (the padded path leaves there whatever
    the model computed on padding)."""
    n, t = batch.input_ids.shape
    if not micro or micro[0].flat_index is None:
        return torch.cat(values)[:, :t]           # [:, :t]: without the padding context parallelism added
    out = values[0].new_zeros(n * t + 1)
    for mb, v in zip(micro, values):
        out.index_copy_(0, mb.flat_index, v.reshape(-1))
    return out[:-1].view(n, t)
