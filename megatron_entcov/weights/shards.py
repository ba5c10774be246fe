"""This rank's Megatron shards <-> full Hugging Face-named tensors: weights into a built model, and out of it.

The in-memory weight paths training uses, on the declarative key map (:mod:`megatron_entcov.weights.hf_map`):
- :func:`load_hf_weights`: Hugging Face weights into this rank's shards of a built model (any tp/pp/vpp);
  the trainer's start from ``model.hf_dir`` and the hf-to-megatron import.
- :func:`iter_hf_weights`: this model's weights as (hf_name, full tensor) buckets, gathered over tp, ep and pp:
  to the generating rank only for weight sync to rollout engines (``dst="generator"``), or to every rank.
  Expert weights (Qwen3-MoE) are first all-gathered over the expert-parallel group, one expert slot at a time,
  so every rank of a stage walks every global expert; the tp and pp paths below treat them as any tensor.
  Context-parallel ranks > 0 hold cp_rank 0's dense weights and skip the sync's gathers, but not the expert
  all-gathers: Megatron's expert-parallel group may span cp ranks, which hold different experts.

Example:
    load_hf_weights(chunks, cfg.model, "/models/Qwen2.5-7B", ps)                  # any tp/pp, not collective
    for bucket in iter_hf_weights(chunks, cfg.model, ps, bucket_bytes=1 << 30,    # every tp x pp rank
                                  dst="generator"):
        send(bucket)                          # [(hf_name, full tensor), ...]; only where ps.is_generator

Design notes: docs/design/weights.md
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch
import torch.distributed as dist

from megatron_entcov.config import ModelConfig
from megatron_entcov.distributed import collectives
from megatron_entcov.monitor.metrics import iter_progress
from megatron_entcov.weights.hf_checkpoint import HFCheckpoint
from megatron_entcov.weights.hf_map import (
    EMBEDDING_RULE,
    RULES,
    WeightRule,
    match_megatron_param,
    to_hf,
    to_megatron,
    tp_shard,
    tp_unshard,
)

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["load_hf_weights", "iter_hf_weights"]


# --------------------------------------------------------------------------------------------------
# Megatron model side: HF weights into a built model, HF-named weights out of it
# --------------------------------------------------------------------------------------------------


def _local_entries(chunks, cfg: ModelConfig, ps: "ParallelState", *, skip_tied_output: bool):
    """(rule, global layer or None, global expert or None, param) for every parameter of this rank's chunks."""
    from megatron_entcov.policy.model import unwrap_model

    per_rank = (cfg.num_experts or 0) // ps.ep_size
    entries = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            match = match_megatron_param(name)
            if match is None:
                raise ValueError(f"no Hugging Face mapping for Megatron parameter {name!r}")
            rule, local, local_expert = match
            if rule.megatron == "output_layer.weight" and cfg.tie_word_embeddings and skip_tied_output:
                continue  # the last stage's copy of the tied embedding (pp > 1)
            # Layer indices in names are local to the chunk; layer_number (1-based) is global. Expert indices
            # are local to the ep rank, which holds experts [ep_rank * per_rank, (ep_rank + 1) * per_rank).
            layer = model.decoder.layers[local].layer_number - 1 if rule.per_layer else None
            expert = ps.ep_rank * per_rank + local_expert if rule.per_expert else None
            entries.append((rule, layer, expert, param))
    return entries


class _EpSlot:
    """The same local expert slot of every ep rank, fetched by one all-gather on first use (collective over the
    ep group: its ranks walk their entries in the same order)."""

    def __init__(self, param: torch.Tensor, ps: "ParallelState"):
        self.param, self.ps, self.shards = param, ps, None

    def get(self, ep_rank: int) -> torch.Tensor:
        if self.ps.ep_size == 1:
            return self.param.detach()
        if self.shards is None:
            local = self.param.detach().to(self.ps.device).contiguous()
            self.shards = [torch.empty_like(local) for _ in range(self.ps.ep_size)]
            collectives.all_gather(self.shards, local, group=self.ps.ep_group)
        shard = self.shards[ep_rank]
        self.shards[ep_rank] = None                  # held until used once
        return shard


def _gathered_entries(local, cfg: ModelConfig, ps: "ParallelState"):
    """:func:`_local_entries` with each expert entry replaced by the same slot of every ep rank: (rule, layer,
    expert, fetch) where fetch() returns this rank's tp shard of that tensor (the experts of other ep ranks over
    the ep group, lazily)."""
    per_rank = (cfg.num_experts or 0) // ps.ep_size
    out = []
    for rule, layer, expert, param in local:
        if expert is None:
            out.append((rule, layer, None, param, param.detach))
            continue
        slot, local_expert = _EpSlot(param, ps), expert - ps.ep_rank * per_rank
        out += [(rule, layer, r * per_rank + local_expert, param, functools.partial(slot.get, r))
                for r in range(ps.ep_size)]
    return out


@torch.no_grad()
def load_hf_weights(chunks, model_cfg: ModelConfig, hf: HFCheckpoint | str | Path, ps: "ParallelState", *,
                    progress: bool = False) -> None:
    """Copy Hugging Face weights into this rank's model shards (any tp/pp/vpp layout; not collective).

    Each Hugging Face tensor is read whole, combined (fused QKV, [gate; up], vocab padding) and sliced for
    this tp rank. Raises ValueError for a missing tensor or a shape mismatch.
    """
    hf = hf if isinstance(hf, HFCheckpoint) else HFCheckpoint(hf)
    entries = _local_entries(chunks, model_cfg, ps, skip_tied_output=False)
    for rule, layer, expert, param in iter_progress(entries, len(entries), "hf -> megatron", progress):
        names = rule.hf_names(layer, expert)
        if rule.megatron == "output_layer.weight" and model_cfg.tie_word_embeddings:
            names = EMBEDDING_RULE.hf_names()
        padded = param.shape[0] * ps.tp_size if rule.kind == "vocab" else 0
        full = to_megatron(rule, [hf.get(n) for n in names], model_cfg, padded)
        shard = tp_shard(rule, full, ps.tp_rank, ps.tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {rule.megatron_name(layer)!r} from {names}: got {tuple(shard.shape)} "
                             f"for tp rank {ps.tp_rank}, the model has {tuple(param.shape)}")
        param.copy_(shard)


def _full_shape(rule: WeightRule, param: torch.Tensor, ps: "ParallelState") -> tuple[int, ...]:
    shape = list(param.shape)
    if rule.tp_dim is not None:
        shape[rule.tp_dim] *= ps.tp_size
    return tuple(shape)


def _stage_meta(local, ps: "ParallelState") -> list[tuple[int, int | None, int | None, tuple[int, ...], str]]:
    """(rule index, global layer, global expert, full shape, dtype name) of each of this stage's tensors (every
    expert of the ep group), in order; needs no communication (an expert slot has one shape on every ep rank)."""
    return [(RULES.index(rule), layer, expert, _full_shape(rule, param, ps), str(param.dtype).removeprefix("torch."))
            for rule, layer, expert, param, _ in local]


def _empty(shape, dtype_name: str, ps: "ParallelState") -> torch.Tensor:
    """A receive buffer on the device collectives of ``ps`` carry (NCCL: this rank's GPU)."""
    return torch.empty(shape, dtype=getattr(torch, dtype_name), device=ps.device)


def _all_gather_tp(rule: WeightRule, local: torch.Tensor, ps: "ParallelState") -> torch.Tensor:
    """The full tensor on every tp rank ('all')."""
    if rule.tp_dim is None or ps.tp_size == 1:
        return local
    local = local.to(ps.device).contiguous()
    shards = [torch.empty(local.shape, dtype=local.dtype, device=ps.device) for _ in range(ps.tp_size)]
    collectives.all_gather(shards, local, group=ps.tp_group)
    return tp_unshard(rule, shards)


def _gather_tp_to_first(rule: WeightRule, local: torch.Tensor, ps: "ParallelState") -> torch.Tensor | None:
    """The full tensor on tp rank 0 of the stage, None on the others ('generator'). Other tp ranks send their
    shard once; a replicated tensor (norms) needs no communication."""
    if ps.tp_size == 1:
        return local
    if rule.tp_dim is None:
        return local if ps.tp_rank == 0 else None
    local = local.to(ps.device).contiguous()
    dst = dist.get_global_rank(ps.tp_group, 0)
    if ps.tp_rank != 0:
        collectives.gather(local, None, dst=dst, group=ps.tp_group)
        return None
    if rule.tp_dim == 0 and rule.kind != "gate_up":
        # Shards of a dim-0 split are contiguous row blocks of the full tensor: receive them in place, so the
        # largest tensors (embedding, output layer) are not held twice (shards + their concatenation).
        full = torch.empty((local.shape[0] * ps.tp_size, *local.shape[1:]), dtype=local.dtype, device=ps.device)
        collectives.gather(local, list(full.chunk(ps.tp_size, dim=0)), dst=dst, group=ps.tp_group)
        return full
    shards = [torch.empty(local.shape, dtype=local.dtype, device=ps.device) for _ in range(ps.tp_size)]
    collectives.gather(local, shards, dst=dst, group=ps.tp_group)
    return tp_unshard(rule, shards)


class _Buckets:
    """Groups (hf_name, tensor) pairs into lists of at most ``limit`` bytes (a larger tensor comes alone)."""

    def __init__(self, model_cfg: ModelConfig, limit: int, dtype: torch.dtype | None):
        self.model_cfg, self.limit, self.dtype = model_cfg, limit, dtype
        self.bucket: list[tuple[str, torch.Tensor]] = []
        self.size = 0

    def add(self, rule: WeightRule, layer: int | None, expert: int | None, full: torch.Tensor):
        """Yields the full buckets that adding this Megatron tensor's HF tensors closes."""
        for name, tensor in zip(rule.hf_names(layer, expert), to_hf(rule, full, self.model_cfg)):
            if self.dtype is not None:
                tensor = tensor.to(self.dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if self.bucket and self.size + nbytes > self.limit:
                yield self.bucket
                self.bucket, self.size = [], 0
            self.bucket.append((name, tensor))
            self.size += nbytes

    def rest(self):
        if self.bucket:
            yield self.bucket
            self.bucket, self.size = [], 0


@torch.no_grad()
def iter_hf_weights(chunks, model_cfg: ModelConfig, ps: "ParallelState", *, bucket_bytes: int = 1 << 30,
                    dtype: torch.dtype | None = None,
                    dst: Literal["all", "generator"] = "all") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This model's weights under Hugging Face names, as full tensors, in buckets of at most ``bucket_bytes``.

    Collective over the model-parallel group: call it on every rank of a tp x pp replica and run it to its end
    (each data-parallel replica runs independently, within its own groups). Where the full tensors go:

    - ``dst="generator"`` (weight sync): only the replica's generating rank (``ps.is_generator``: tp rank 0 of
      the first stage) receives them; every other rank yields nothing. Within each stage the other tp ranks
      send their shard to the stage's tp rank 0 (a gather); the first stage's tp rank 0 is the generating rank,
      and each later stage's tp rank 0 sends each gathered tensor point to point to the generating rank (its
      pipeline group: the tp-rank-0 ranks of every stage), stage by stage. A later stage's tp rank 0 so holds
      one full tensor at a time, in flight; no other rank holds any.
    - ``dst="all"``: every rank receives every tensor: TP shards are all-gathered within the tp group, then each
      pipeline stage broadcasts its full layers over the pp group (for callers that need the whole model on
      every rank: tests, layout comparisons).

    Memory is bounded by one bucket plus one tensor on the receiving ranks (on GPUs a sending stage waits for
    its sends after every ``bucket_bytes`` of them, so queued sends stay bounded too). Tensors are on the
    parameters' device in their dtype (or ``dtype``), vocabulary padding stripped; they may alias the
    parameters: do not modify them. A tensor larger than ``bucket_bytes`` comes alone in its bucket. Tied
    embeddings yield no lm_head.weight. Communication goes through :mod:`megatron_entcov.distributed.collectives`, tensors
    on ``ps.device``.

    Yields:
        lists of (hf_name, tensor), pipeline stage by stage, in checkpoint order within each stage; the same
        names in the same order for both ``dst``.
    """
    if dst not in ("all", "generator"):
        raise ValueError(f"iter_hf_weights: dst={dst!r} is invalid; choose 'generator' (only the generating rank "
                         "receives the full tensors: weight sync) or 'all' (every rank does)")
    local = _gathered_entries(_local_entries(chunks, model_cfg, ps, skip_tied_output=True), model_cfg, ps)
    buckets = _Buckets(model_cfg, bucket_bytes, dtype)
    if dst == "all":
        yield from _to_all(local, buckets, ps)
    else:
        yield from _to_generator(local, buckets, ps, bucket_bytes)
    yield from buckets.rest()


def _to_all(local, buckets: _Buckets, ps: "ParallelState"):
    for stage in range(ps.pp_size):
        src = dist.get_global_rank(ps.pp_group, stage) if ps.pp_size > 1 else None
        mine = ps.pp_rank == stage
        meta = _stage_meta(local, ps) if mine else None
        if ps.pp_size > 1:
            box = collectives.broadcast_object_list([meta], src=src, group=ps.pp_group)
            meta = box[0]
        for i, (rule_index, layer, expert, shape, dtype_name) in enumerate(meta):
            rule = RULES[rule_index]
            full = _all_gather_tp(rule, local[i][4](), ps) if mine else _empty(shape, dtype_name, ps)
            if ps.pp_size > 1:
                full = full.to(ps.device).contiguous()
                collectives.broadcast(full, src=src, group=ps.pp_group)
            yield from buckets.add(rule, layer, expert, full)


def _to_generator(local, buckets: _Buckets, ps: "ParallelState", bucket_bytes: int):
    generator = ps.is_generator
    if ps.cp_rank > 0:     # context-parallel ranks > 0 hold cp_rank 0's dense weights: no part in their gathers,
        _serve_expert_gathers(local)          # but their experts differ, and the ep group may span cp ranks
        return
    # The tp-rank-0 ranks of every stage share one pipeline group, whose first member is the generating rank;
    # the other tp ranks' pipeline groups take no part after the tp gathers.
    relay = ps.tp_rank == 0 and not generator
    metas = None
    if ps.pp_size > 1 and ps.tp_rank == 0:
        # Every later stage's tensor list (shapes, dtypes, layers), to the generating rank, in one gather.
        metas = [None] * ps.pp_size if generator else None
        collectives.gather_object(_stage_meta(local, ps), metas, dst=dist.get_global_rank(ps.pp_group, 0),
                                  group=ps.pp_group)
    if generator:
        for rule, layer, expert, _, fetch in local:
            yield from buckets.add(rule, layer, expert, _gather_tp_to_first(rule, fetch(), ps))
        for stage in range(1, ps.pp_size):
            src = dist.get_global_rank(ps.pp_group, stage)
            for rule_index, layer, expert, shape, dtype_name in metas[stage]:
                full = collectives.recv(_empty(shape, dtype_name, ps), src=src, group=ps.pp_group)
                yield from buckets.add(RULES[rule_index], layer, expert, full)
        return
    sent = 0
    for rule, layer, _, _, fetch in local:
        full = _gather_tp_to_first(rule, fetch(), ps)
        if not relay:                 # a tp rank > 0: its shard went to its stage's tp rank 0
            continue
        full = full.to(ps.device).contiguous()
        collectives.send(full, dst=dist.get_global_rank(ps.pp_group, 0), group=ps.pp_group)
        sent += full.numel() * full.element_size()
        if sent >= bucket_bytes:
            _wait_for_sends(ps)
            sent = 0
    _wait_for_sends(ps)


def _serve_expert_gathers(local) -> None:
    """A cp rank > 0's part in the expert all-gathers (ep > 1): Megatron's expert-parallel group spans
    context-parallel ranks, which hold different experts, so every ep rank walks every expert slot in the same
    order as cp_rank 0's ranks do (each slot's first fetch is its all-gather; with ep 1 nothing is collective)."""
    for _, _, expert, _, fetch in local:
        if expert is not None:
            fetch()


def _wait_for_sends(ps: "ParallelState") -> None:
    """NCCL sends return once queued on the GPU and keep their tensors alive until done: wait for them, so a
    stage that runs ahead of the generating rank does not pile up full tensors (gloo sends are synchronous)."""
    if ps.device.type == "cuda":
        torch.cuda.current_stream(ps.device).synchronize()
