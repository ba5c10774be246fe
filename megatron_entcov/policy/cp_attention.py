"""Attention across context-parallel ranks for Megatron's local spec: the exact CPU implementation and the
reference the GPU path is compared with.

With context parallelism (cp > 1) each rank holds two of the ``2 * cp`` chunks of every sequence (Megatron's
load-balanced layout, :func:`megatron_entcov.policy.cp_layout.cp_shard_index`). Megatron's local
``DotProductAttention`` refuses cp > 1 (only Transformer Engine's attention implements it), so this module does
it: each rank all-gathers the keys and values of its context-parallel group (differentiable: the backward sums
their gradients over the group and hands each rank those of its own tokens), puts them in global order and
attends its local queries to the keys of their own sequence, causally by GLOBAL position. The scores, the
softmax (scale, fp32, offset), the dropout and the value matmul are Megatron's own (``DotProductAttention``'s
forward, given the rectangular [s/cp, s] mask), so the result equals full attention restricted to this rank's
queries, to float tolerance. On GPUs Transformer Engine's context-parallel attention runs instead (the comm type
is ``TransformerConfig.cp_comm_type``: "p2p", TE's default ring exchange of K/V overlapped with the blocks'
compute, or "all_gather" / "a2a" / "a2a+p2p"); this module is the exact reference that path is compared with.

Inputs, as Megatron's ``SelfAttention`` hands them over (``attention_mask=None``, causal):
- padded rows (SBHD): query [s/cp, b, heads, dim], key and value [s/cp, b, groups, dim]: this rank's chunks of
  each row in its local order; the global length is s = s/cp * cp.
- packed rows (THD): query [t/cp, heads, dim] with ``packed_seq_params`` whose lengths are the GLOBAL ones (as
  Megatron passes them under cp, and as its THD RoPE reads them: local lengths = global // cp). The lengths
  are read from ``HostPackedSeqParams.seq_lengths`` when set, else ``cu_seqlens_q_padded``, else
  ``cu_seqlens_q``; each a multiple of ``2 * cp``; the local tokens are each sequence's two chunks in turn.

Cost per layer and rank, for a sequence of s tokens: scores [heads, s/cp, s] (1/cp of the full attention's,
built per sequence of a packed row: sum of len * len/cp, never [t, t]), the gathered K and V [s, groups, dim]
(the full length on every rank: the all-gather's price), and the communication of K and V: an all-gather
forward ((cp - 1)/cp * s * groups * dim values received per rank, each) and an all-reduce of their gradients
backward (twice that; a reduce-scatter would do, but distributed/collectives.py, the package's device-checked
door to torch.distributed, has none).

Example:
    spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    # Megatron's Attention builds it with pg_collection (tp and cp); with a cp group of size 1 it is
    # PackedDotProductAttention unchanged.

Design notes: docs/design/context_parallel.md
"""

from __future__ import annotations

import copy
import functools

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_entcov.distributed import collectives
from megatron_entcov.policy.cp_layout import cp_shard_index
from megatron_entcov.policy.packing import PackedDotProductAttention

__all__ = ["ContextParallelDotProductAttention", "gather_global_order"]


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along dim 0 within ``group`` (rank-major); the backward sums the gradient over the group and
    keeps this rank's slice, so each rank gets the gradient of its own tokens from every rank that used them.

    Through distributed/collectives.py (the package's one door to torch.distributed, device-checked), which has
    no reduce-scatter: the backward is an all-reduce and a slice, twice a reduce-scatter's traffic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = collectives.all_gather([torch.empty_like(x) for _ in range(group.size())], x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank = ctx.group.size(), ctx.group.rank()
        total = collectives.all_reduce(grad.clone(memory_format=torch.contiguous_format), group=ctx.group)
        n = grad.size(0) // size
        return total[rank * n:(rank + 1) * n], None


@functools.lru_cache(maxsize=64)
def _global_order(lengths: tuple[int, ...], cp_size: int) -> torch.Tensor:
    """Index that puts the rank-major concatenation of every rank's local tokens in global (row) order."""
    held = torch.cat([cp_shard_index(lengths, cp_size, r) for r in range(cp_size)])
    return torch.argsort(held)


def gather_global_order(x: torch.Tensor, lengths: tuple[int, ...], group) -> torch.Tensor:
    """The whole row of ``x`` (local tokens along dim 0) in global order, gathered over the context-parallel
    ``group``, differentiably: [t/cp, ...] -> [t, ...] with t = sum(lengths)."""
    gathered = _AllGatherSequence.apply(x, group)
    return gathered.index_select(0, _global_order(tuple(lengths), group.size()).to(x.device))


def _causal_mask(length: int, cp_size: int, cp_rank: int, device) -> torch.Tensor:
    """[1, 1, length/cp, length] bool, True where a local query (global position by cp_shard_index) must not see
    a key (Megatron's convention: True is masked out)."""
    query_pos = cp_shard_index([length], cp_size, cp_rank).to(device)
    return (torch.arange(length, device=device)[None, :] > query_pos[:, None])[None, None]


def _cp_group(config, pg_collection):
    """The context-parallel group: the one Megatron's Attention hands over in ``pg_collection`` (tp and cp), else
    Megatron's default one when the config asks for cp > 1, else None (no context parallelism)."""
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        return pg_collection.cp
    if config.context_parallel_size > 1:
        return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"]).cp
    return None


def _global_lengths(packed_seq_params) -> tuple[int, ...]:
    """The packed row's GLOBAL sequence lengths (see the module docstring for the fields read)."""
    lengths = tuple(getattr(packed_seq_params, "seq_lengths", ()) or ())
    if lengths:
        return lengths
    cu = packed_seq_params.cu_seqlens_q_padded
    cu = packed_seq_params.cu_seqlens_q if cu is None else cu
    return tuple((cu[1:] - cu[:-1]).tolist())


class ContextParallelDotProductAttention(PackedDotProductAttention):
    """Megatron's local attention across context-parallel ranks (exact; see the module docstring).

    Built as Megatron builds any core attention (same arguments). The parent is constructed with a copy of the
    config whose ``context_parallel_size`` is 1 (its __init__ asserts that; nothing else of it depends on cp),
    then ``self.config`` is the real one. The cp group comes from ``pg_collection.cp`` (what Megatron's
    Attention passes), else from Megatron's parallel state when ``config.context_parallel_size > 1``. With a
    group of size 1 (or none) the forward is :class:`PackedDotProductAttention`'s, unchanged. ``cp_comm_type``
    is kept (``self.cp_comm_type``) but does not change this CPU algorithm (always an all-gather of K/V).

    Raises:
        ValueError: the group's size differs from ``config.context_parallel_size``, or, under cp > 1, a mask type
            other than causal or sliding-window attention (``config.window_size``).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        local = copy.copy(config)
        local.context_parallel_size = 1         # the parent's __init__ asserts it; its forward never reads it
        super().__init__(local, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        self.cp_comm_type = cp_comm_type
        self.cp_group = _cp_group(config, pg_collection)
        self.cp_size = 1 if self.cp_group is None else self.cp_group.size()
        self.cp_rank = 0 if self.cp_group is None else self.cp_group.rank()
        if self.cp_size != config.context_parallel_size:
            raise ValueError(f"the context-parallel group has {self.cp_size} ranks but context_parallel_size is "
                             f"{config.context_parallel_size}; build the model with the group of that size")
        if self.cp_size > 1:
            self._check_supported()

    def _check_supported(self) -> None:
        """What the all-gather path implements: causal masks only; never the fused square-causal kernel."""
        if self.attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type {self.attn_mask_type.name} under context_parallel_size="
                             f"{self.cp_size}: the local context-parallel attention is causal only; use the "
                             "causal mask or context_parallel_size=1")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError(f"window_size={self.config.window_size} (sliding-window attention) under "
                             f"context_parallel_size={self.cp_size}: not implemented by the local "
                             "context-parallel attention; unset window_size or use context_parallel_size=1")
        # The fused causal softmax kernel ignores the mask and needs square scores; ours are [s/cp, s].
        self.scale_mask_softmax.scaled_masked_softmax_fusion = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.cp_size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        self._check_call(attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params is None:
            return self._attend_rows(query, key, value)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences in format {packed_seq_params.qkv_format!r}: the local attention "
                             "reads 'thd' only")
        return self._attend_packed(query, key, value, _global_lengths(packed_seq_params))

    def _check_call(self, attention_mask, attn_mask_type, attention_bias) -> None:
        if attention_mask is not None:
            raise ValueError("an explicit attention_mask under context parallelism: the local context-parallel "
                             "attention builds the causal mask by global position itself; pass None")
        if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type {attn_mask_type.name} under context parallelism: causal only")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the local attention; pass None")

    def _attend(self, query, key, value, length: int) -> torch.Tensor:
        """Megatron's local attention of this rank's queries of one sequence ([s/cp, b, n, d]) to its keys and
        values in global order ([s, b, g, d]), with the causal mask by global position."""
        mask = _causal_mask(length, self.cp_size, self.cp_rank, query.device)
        return DotProductAttention.forward(self, query, key, value, mask)

    def _attend_rows(self, query, key, value) -> torch.Tensor:
        """SBHD: every row is one sequence of s = s_local * cp tokens. Returns [s/cp, b, heads * dim]."""
        lengths = (query.size(0) * self.cp_size,)
        key = gather_global_order(key, lengths, self.cp_group)
        value = gather_global_order(value, lengths, self.cp_group)
        return self._attend(query, key, value, lengths[0])

    def _attend_packed(self, query, key, value, lengths: tuple[int, ...]) -> torch.Tensor:
        """THD: per sequence of the packed row (global ``lengths``). Returns [t/cp, 1, heads * dim]."""
        if sum(lengths) != query.size(0) * self.cp_size:
            raise ValueError(f"packed_seq_params give {sum(lengths)} tokens in all, but this rank holds "
                             f"{query.size(0)} x context_parallel_size {self.cp_size}: pass the GLOBAL cu_seqlens "
                             "(each sequence padded to a multiple of 2 * context_parallel_size)")
        key = gather_global_order(key, lengths, self.cp_group)
        value = gather_global_order(value, lengths, self.cp_group)
        local = [n // self.cp_size for n in lengths]
        parts = [self._attend(q[:, None], k[:, None], v[:, None], n)
                 for q, k, v, n in zip(query.split(local), key.split(list(lengths)), value.split(list(lengths)),
                                       lengths) if n]
        return torch.cat(parts)
