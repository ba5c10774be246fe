"""Mixture-of-experts layers (Qwen3-MoE) in Megatron-Core: the TransformerConfig fields and the layer specs.

Qwen3-MoE's routing is a softmax over the router logits, the top-k experts, and (``norm_topk_prob``) their
probabilities renormalised; Megatron's top-k router gives the same with ``moe_router_pre_softmax=False`` (softmax
over the top-k logits, which equals the renormalised top-k probabilities) or, without renormalisation,
``moe_router_pre_softmax=True``. Routing is dropless (no capacity factor); tokens reach the experts of other
expert-parallel ranks through the all-to-all dispatcher. Layers are MoE or dense as ``ModelConfig.moe_layer_pattern``
says (Hugging Face's ``decoder_sparse_step`` / ``mlp_only_layers``). The load-balancing loss is off unless
``model.moe_aux_loss_coeff`` > 0; :func:`aux_loss_metrics` reads what Megatron tracked of it.

Example:
    TransformerConfig(..., **moe_transformer_fields(cfg.model, cfg.parallel))     # policy/model.py
    spec = build_block_spec(config, use_te=False, vp_stage=0, pp_rank=ps.pp_rank)  # one chunk's layer specs

Design notes: docs/design/weights.md (expert weights), docs/design/compat.md (fixes 10 and 11), docs/design/policy.md
(optimizer.py: the expert grads at tp > 1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_entcov.config import ModelConfig, ParallelConfig

if TYPE_CHECKING:
    import torch

    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["moe_transformer_fields", "build_block_spec", "mark_expert_params", "aux_loss_metrics"]


def moe_transformer_fields(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """TransformerConfig keywords for the experts of ``model`` (none for a dense model)."""
    if model.num_experts is None:
        if parallel.expert_model_parallel_size != 1:
            raise ValueError(f"parallel.expert_model_parallel_size={parallel.expert_model_parallel_size} needs a "
                             "mixture-of-experts model (model.num_experts); set it to 1")
        return {}
    if model.num_experts % parallel.expert_model_parallel_size:
        raise ValueError(f"parallel.expert_model_parallel_size={parallel.expert_model_parallel_size} must divide "
                         f"model.num_experts={model.num_experts}")
    if parallel.tensor_model_parallel_size > 1 and not parallel.sequence_parallel:
        # Megatron's MoE layer refuses to train with tp > 1 without it (each tp rank would route every token).
        raise ValueError(f"parallel.tensor_model_parallel_size={parallel.tensor_model_parallel_size} with experts "
                         "(model.num_experts) needs parallel.sequence_parallel=true; set it true")
    aux = model.moe_aux_loss_coeff > 0
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_layer_freq=model.moe_layer_pattern(),
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_expert_capacity_factor=None,              # dropless
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        # Experts whole on each rank (expert tp = 1): the tp ranks of a replica share its experts over ep instead.
        # (Expert tp = tp gathers a variable number of tokens over tp, an all-gather-v gloo does not implement.)
        expert_tensor_parallel_size=1,
    )


def build_block_spec(config, *, use_te: bool, vp_stage: int | None, pp_rank: int):
    """This pipeline chunk's layer specs (MoE or dense per layer), with the local spec's core attention replaced
    by the packed-sequence one (policy/packing.py) as for dense models."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                      vp_stage=vp_stage, pp_rank=pp_rank)
    if not use_te:
        from megatron_entcov.policy.packing import PackedDotProductAttention

        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def mark_expert_params(chunk: "torch.nn.Module") -> None:
    """Mark the experts' parameters of ``chunk`` as expert-parallel (``allreduce=False``) also at expert-parallel
    size 1 when tp > 1, before Megatron's DDP and optimizer read the mark (:func:`policy.optimizer.wrap_chunks_ddp`).

    With expert tp = 1 the tp ranks of a replica hold whole experts and, under sequence parallelism, each feeds
    them only its shard of the tokens: their gradients must be summed over the expert-data-parallel group (which
    holds the tp ranks), as Megatron's DDP does for the parameters it marks ``allreduce=False``. Megatron marks
    them only when ``expert_model_parallel_size > 1``; unmarked, they were reduced over the data-parallel group
    (no tp rank), so each tp rank stepped by its own shard's gradient (the replicas' experts drifted apart), and
    the grad norm summed the tp ranks' partial expert gradients with the dense ones. Marked, the experts go to the
    expert buffers and the expert optimizer, whose norm is taken over the expert tensor-model-pipeline group.
    At ep > 1 Megatron marks them itself; at tp 1 the groups coincide: nothing changes there."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config = chunk.config
    if (not config.num_moe_experts or config.expert_model_parallel_size > 1
            or config.tensor_model_parallel_size == config.expert_tensor_parallel_size):
        return
    for module in chunk.modules():
        if isinstance(module, MoELayer):
            for param in module.experts.parameters():
                param.allreduce = False


def aux_loss_metrics(model: ModelConfig, ps: "ParallelState", num_micro_batches: int) -> dict[str, float]:
    """``train/moe_aux_loss``: the load-balancing loss (without its coefficient) Megatron's routers tracked in the
    training forwards since the last call, as this rank's share of the step's value: the mean over the MoE layers
    (summed over the pipeline stages), the micro-batches and the data-parallel replicas, on the rank that owns
    the replica's results ({} elsewhere and when the loss is off). Collective over the pipeline group; clears the
    tracker."""
    if model.num_experts is None or model.moe_aux_loss_coeff <= 0:
        return {}
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from megatron_entcov.distributed.collectives import reduce_values

    values = get_moe_layer_wise_logging_tracker().get("load_balancing_loss", {}).get("values")
    local = 0.0 if values is None else float(values.detach().double().sum())
    clear_aux_losses_tracker()
    total = float(reduce_values([local], group=ps.pp_group)[0])
    if not ps.owns_results:
        return {}
    layers = max(sum(model.moe_layer_pattern()), 1)
    return {"train/moe_aux_loss": total / (layers * max(num_micro_batches, 1) * ps.dp_size)}
