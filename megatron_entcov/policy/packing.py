"""Micro-batches of the model: row slices of a TrainBatch, or samples packed into one row under a token budget.

With ``optim.max_tokens_per_micro_batch = B`` the samples of a (mini-)batch are assigned to micro-batches by
balanced first-fit (longest first, each into the least-loaded micro-batch it fits), and each micro-batch is ONE
row holding its samples back to back, padded only to a multiple of ``multiple_of`` (tensor parallelism with
sequence parallelism splits the row). Megatron-Core reads the boundaries from ``PackedSeqParams`` (THD format,
``cu_seqlens``): attention stays inside a sample and RoPE positions restart at 0 for each sample (Transformer
Engine natively; the local spec through :class:`PackedDotProductAttention`).

Nothing downstream changes layout: every per-token tensor of the micro-batch (labels, masks, advantages, old and
rollout log-probs, token keys) is gathered from the batch's row layout with one flat index, so a sample's token
carries exactly the values it has in its padded row, and the model's outputs scatter back to that layout
(:func:`scatter_rows`). Token selection, metrics and histograms keep reading the row layout; the loss reads its
selection through ``micro_batch["view"]``. The loss and its gradients therefore equal the padded path's to
float tolerance (tests/distributed/test_packing_equivalence.py, tests/distributed/test_layout_invariance.py).

Example:
    micro = micro_batches(batch, micro_batch_size=4, max_tokens=4096, multiple_of=tp)
    micro[0]["input_ids"].shape            # [1, L], L <= 4096 (padded mode: [4, T])
    micro[0]["view"](batch.advantages)     # the batch tensor in this micro-batch's layout
    logprobs = scatter_rows(batch, micro, [lp_0, lp_1, ...])    # [N, T] again
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_entcov.policy.batch import TrainBatch

__all__ = ["plan_bins", "micro_batches", "scatter_rows", "HostPackedSeqParams", "PackedDotProductAttention"]


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


def plan_bins(lengths: Sequence[int], max_tokens: int, *, multiple_of: int = 1, count_multiple: int = 1) -> list[list[int]]:
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


def _gather(flat_index: torch.Tensor, length: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view ``[N, T] -> [1, L]``: the indexed tokens of a row-layout tensor; the padding slot reads 0/False."""
    def view(t: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1), t.new_zeros(1)])
        return flat[flat_index].view(1, length)
    return view


def _packed(batch: TrainBatch, rows: list[int], lengths: list[int], multiple_of: int, pad_to: int = 0) -> dict:
    """One micro-batch: ``rows`` of ``batch`` back to back in one row, padded to ``multiple_of`` (and to at
    least ``pad_to``)."""
    n, t = batch.input_ids.shape
    seg = [lengths[r] for r in rows]
    total = sum(seg)
    length = max(-(-total // multiple_of) * multiple_of, pad_to)
    if length > total:
        seg.append(length - total)            # the padding is a segment of its own: it attends only to itself
    index = torch.full((length,), n * t, dtype=torch.long)      # n * t: the zero slot of _gather's view
    segment_ids = torch.empty(length, dtype=torch.long)
    pos = 0
    for s, r in enumerate(rows):
        index[pos:pos + lengths[r]] = torch.arange(r * t, r * t + lengths[r])
        segment_ids[pos:pos + lengths[r]] = s
        pos += lengths[r]
    segment_ids[pos:] = len(rows)
    device = batch.input_ids.device
    index = index.to(device)
    view = _gather(index, length)
    mb = {f.name: view(getattr(batch, f.name)) for f in dataclasses.fields(batch)
          if getattr(batch, f.name) is not None and f.name != "seq_lengths"}
    # Positions restart per sample (gathered from the rows); padding reads position 0.
    cu = torch.tensor([0, *torch.tensor(seg).cumsum(0).tolist()], dtype=torch.int32)
    mb["packed_seq_params"] = HostPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu.to(device), cu_seqlens_kv=cu.to(device),
        max_seqlen_q=max(seg), max_seqlen_kv=max(seg), seq_lengths=tuple(seg))
    mb["segment_ids"] = segment_ids.to(device)[None, :]
    mb["flat_index"] = index
    mb["view"] = view
    return mb


def micro_batches(batch: TrainBatch, *, micro_batch_size: int, max_tokens: int = 0, multiple_of: int = 1,
                  count_multiple: int = 1, parts: int = 1, uniform: bool = False) -> list[dict]:
    """The model's micro-batches over ``batch``: dicts of model inputs and per-token tensors, plus ``view``
    (maps any [N, T] tensor of ``batch`` to the micro-batch's layout) and ``rows`` (the batch rows it holds).

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
    """
    if not max_tokens:
        if batch.num_rows % micro_batch_size:
            raise ValueError(f"{batch.num_rows} rows do not split into micro-batches of {micro_batch_size}")
        out = []
        for i in range(batch.num_rows // micro_batch_size):
            rows = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
            mb = batch.rows(rows).as_model_input()
            mb["rows"] = rows
            mb["view"] = (lambda r: (lambda t: t[r]))(rows)
            out.append(mb)
        return out
    lengths = batch.seq_lengths.tolist()
    if batch.num_rows % parts:
        raise ValueError(f"{batch.num_rows} rows do not split into {parts} equal parts")
    size = batch.num_rows // parts
    bins = []
    for part in range(parts):
        offset = part * size
        bins += [[offset + r for r in b] for b in plan_bins(lengths[offset:offset + size], max_tokens,
                                                           multiple_of=multiple_of, count_multiple=count_multiple)]
    pad_to = max_tokens if uniform else 0
    out = []
    for rows in bins:
        mb = _packed(batch, rows, lengths, multiple_of, pad_to)
        mb["rows"] = rows
        out.append(mb)
    return out


def scatter_rows(batch: TrainBatch, micro: list[dict], values: list[torch.Tensor]) -> torch.Tensor:
    """Per-token outputs of ``micro`` (in their layouts) back in ``batch``'s row layout [N, T]. Padding positions
    read 0 in packed mode (the padded path leaves there whatever the model computed on padding)."""
    if not micro or "flat_index" not in micro[0]:
        return torch.cat(values)
    n, t = batch.input_ids.shape
    out = values[0].new_zeros(n * t + 1)
    for mb, v in zip(micro, values):
        out.index_copy_(0, mb["flat_index"], v.reshape(-1))
    return out[:-1].view(n, t)
