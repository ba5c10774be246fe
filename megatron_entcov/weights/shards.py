"""This rank's Megatron shards <-> full Hugging Face-named tensors: weights into a built model, and out of it.

The in-memory weight paths training uses, on the declarative key map (:mod:`megatron_entcov.weights.hf_map`);
reading Hugging Face files is :mod:`megatron_entcov.weights.hf_checkpoint`, the offline checkpoint tools are
:mod:`megatron_entcov.weights.to_megatron` and :mod:`megatron_entcov.weights.to_hf`:

- :func:`load_hf_weights`: Hugging Face weights into this rank's shards of a built model (any tp/pp/vpp);
  the trainer's start from ``model.hf_dir`` and the hf-to-megatron import.
- :func:`iter_hf_weights`: this model's weights as (hf_name, full tensor) buckets, gathered over tp and pp,
  for weight sync to rollout engines.

Example:
    load_hf_weights(chunks, cfg.model, "/models/Qwen2.5-7B", ps)                  # any tp/pp, not collective
    for bucket in iter_hf_weights(chunks, cfg.model, ps, bucket_bytes=1 << 30):   # every tp x pp rank
        send(bucket)                                    # [(hf_name, full tensor), ...]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.metrics import iter_progress
from megatron_entcov.weights.hf_map import (EMBEDDING_RULE, RULES, WeightRule, match_megatron_name, to_hf, to_megatron,
                                             tp_shard, tp_unshard)
from megatron_entcov.weights.hf_checkpoint import HFCheckpoint

if TYPE_CHECKING:
    from megatron_entcov.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["load_hf_weights", "iter_hf_weights"]


# --------------------------------------------------------------------------------------------------
# Megatron model side: HF weights into a built model, HF-named weights out of it
# --------------------------------------------------------------------------------------------------


def _local_entries(chunks, cfg: ModelConfig, *, skip_tied_output: bool):
    """(rule, global layer or None, param) for every parameter of this rank's chunks."""
    from megatron_entcov.policy.model import unwrap_model

    entries = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            match = match_megatron_name(name)
            if match is None:
                raise ValueError(f"no Hugging Face mapping for Megatron parameter {name!r}")
            rule, local = match
            if rule.megatron == "output_layer.weight" and cfg.tie_word_embeddings and skip_tied_output:
                continue  # the last stage's copy of the tied embedding (pp > 1)
            # Layer indices in names are local to the chunk; layer_number (1-based) is global.
            layer = model.decoder.layers[local].layer_number - 1 if rule.per_layer else None
            entries.append((rule, layer, param))
    return entries


@torch.no_grad()
def load_hf_weights(chunks, model_cfg: ModelConfig, hf: HFCheckpoint | str | Path, ps: "ParallelState", *,
                    progress: bool = False) -> None:
    """Copy Hugging Face weights into this rank's model shards (any tp/pp/vpp layout; not collective).

    Each Hugging Face tensor is read whole, combined (fused QKV, [gate; up], vocab padding) and sliced for
    this tp rank. Raises ValueError for a missing tensor or a shape mismatch.
    """
    hf = hf if isinstance(hf, HFCheckpoint) else HFCheckpoint(hf)
    entries = _local_entries(chunks, model_cfg, skip_tied_output=False)
    for rule, layer, param in iter_progress(entries, len(entries), "hf -> megatron", progress):
        names = rule.hf_names(layer)
        if rule.megatron == "output_layer.weight" and model_cfg.tie_word_embeddings:
            names = EMBEDDING_RULE.hf_names()
        padded = param.shape[0] * ps.tp_size if rule.kind == "vocab" else 0
        full = to_megatron(rule, [hf.get(n) for n in names], model_cfg, padded)
        shard = tp_shard(rule, full, ps.tp_rank, ps.tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {rule.megatron_name(layer)!r} from {names}: got {tuple(shard.shape)} "
                             f"for tp rank {ps.tp_rank}, the model has {tuple(param.shape)}")
        param.copy_(shard)


def _gather_tp(rule: WeightRule, local: torch.Tensor, ps: "ParallelState") -> torch.Tensor:
    if rule.tp_dim is None or ps.tp_size == 1:
        return local
    import torch.distributed as dist

    shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=ps.tp_group)
    return tp_unshard(rule, shards)


@torch.no_grad()
def iter_hf_weights(chunks, model_cfg: ModelConfig, ps: "ParallelState", *, bucket_bytes: int = 1 << 30,
                    dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This model's weights under Hugging Face names, as full tensors, in buckets of at most ``bucket_bytes``.

    Collective over the model-parallel group: call it on every rank of a tp x pp replica (each data-parallel
    replica runs independently). Every rank receives every tensor: TP shards are all-gathered within the tp
    group, then each pipeline stage broadcasts its layers (global layer numbers) over the pp group, stage by
    stage. Memory is bounded by one bucket plus one tensor. Tensors are on the parameters' device in their
    dtype (or ``dtype``), vocabulary padding stripped; they may alias the parameters: do not modify them.
    A tensor larger than ``bucket_bytes`` comes alone in its bucket. Tied embeddings yield no lm_head.weight.

    Yields:
        lists of (hf_name, tensor), in checkpoint order within each pipeline stage.
    """
    import torch.distributed as dist

    local = _local_entries(chunks, model_cfg, skip_tied_output=True)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for stage in range(ps.pp_size):
        src = dist.get_global_rank(ps.pp_group, stage) if ps.pp_size > 1 else None
        mine = ps.pp_rank == stage
        if mine:
            meta = []
            for rule, layer, param in local:
                shape = list(param.shape)
                if rule.tp_dim is not None:
                    shape[rule.tp_dim] *= ps.tp_size
                meta.append((RULES.index(rule), layer, tuple(shape), str(param.dtype).removeprefix("torch.")))
        if ps.pp_size > 1:
            box = [meta if mine else None]
            dist.broadcast_object_list(box, src=src, group=ps.pp_group)
            meta = box[0]
        for i, (rule_index, layer, shape, dtype_name) in enumerate(meta):
            rule = RULES[rule_index]
            if mine:
                full = _gather_tp(rule, local[i][2].detach(), ps)
            else:
                full = torch.empty(shape, dtype=getattr(torch, dtype_name), device=ps.device)
            if ps.pp_size > 1:
                full = full.contiguous()
                dist.broadcast(full, src=src, group=ps.pp_group)
            for name, tensor in zip(rule.hf_names(layer), to_hf(rule, full, model_cfg)):
                if dtype is not None:
                    tensor = tensor.to(dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and size + nbytes > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((name, tensor))
                size += nbytes
    if bucket:
        yield bucket
