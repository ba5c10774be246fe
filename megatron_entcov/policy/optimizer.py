"""Megatron DDP wrapping, the Megatron optimizer and its learning-rate schedule, built from OptimConfig.

Example:
    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, ps), cfg)
    opt, sched = build_optimizer(chunks, cfg)
    zero_grads(chunks, opt)
    run_microbatches(chunks, mbs, loss_fn, ps=ps, forward_only=False)
    applied, grad_norm = optimizer_step(opt)      # skipped when the norm is not finite
    if applied:
        sched.step(1)
"""

from __future__ import annotations

import logging
import math

import torch

from megatron_entcov.compat import distrib_optimizer as distrib_optimizer_compat
from megatron_entcov.config import RunConfig
from megatron_entcov.policy.moe import mark_expert_params

logger = logging.getLogger(__name__)

__all__ = ["wrap_ddp", "wrap_chunks_ddp", "mark_tensor_parallel_weights", "build_optimizer", "zero_grads", "optimizer_step"]


def wrap_ddp(chunks: list[torch.nn.Module], cfg: RunConfig) -> list[torch.nn.Module]:
    """Wrap each chunk in Megatron's DistributedDataParallel (fp32 grad buffers, grads reduced at the end
    of the step by ``finalize_model_grads``, which also syncs tied embeddings and sequence-parallel norms)."""
    return wrap_chunks_ddp(chunks, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)


def wrap_chunks_ddp(chunks: list[torch.nn.Module], *, use_distributed_optimizer: bool) -> list[torch.nn.Module]:
    """:func:`wrap_ddp` given the layout's one setting it reads (the planner wraps meta-device chunks with it, so
    its buffer layout is the trainer's)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # non-finite grads are detected and the step skipped by the trainer
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        mark_tensor_parallel_weights(chunk)  # the grad norm counts every tp rank's shard
        mark_expert_params(chunk)  # expert grads summed over the tp ranks too (expert tp 1)
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                               # one bucket per chunk: fewer, larger all-reduces on gloo
                                               disable_bucketing=i > 0))
    return wrapped


def mark_tensor_parallel_weights(chunk: torch.nn.Module) -> None:
    """Give the weights of Megatron's tensor-parallel layers the ``tensor_model_parallel`` attributes Megatron sets
    only when it initialises them (``perform_initialization``, off when policy/model.py builds a model whose
    weights will be loaded).

    The optimizer's grad norm (and count of zeros) reads them: a parameter without ``tensor_model_parallel=True``
    counts as a copy held by every tp rank and only tp rank 0's is summed. Without the mark the norm at tp > 1
    held only tp rank 0's shard of every split weight (the vocabulary-parallel embedding and output layer, the
    column- and row-parallel linears), and with expert tp 1 each tp rank's experts counted on tp rank 0 only
    while the expert norm is reduced over the expert tensor-model-pipeline group (no tp rank): a norm that
    differed between the tp ranks. The dimensions are Megatron's (column-parallel and embedding 0, row-parallel
    1); a layer Megatron initialised keeps its own."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    dims = ((ColumnParallelLinear, 0), (VocabParallelEmbedding, 0), (RowParallelLinear, 1))
    for module in chunk.modules():
        weight = getattr(module, "weight", None)
        dim = next((d for kind, d in dims if isinstance(module, kind)), None)
        if dim is not None and isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def build_optimizer(chunks: list[torch.nn.Module], cfg: RunConfig):
    """Megatron optimizer (Adam or SGD, grad clipping, optional distributed optimizer) and its LR schedule.

    The distributed optimizer (``parallel.use_distributed_optimizer``) shards the Adam state over data-parallel
    ranks; with torch's Adam (no TE/apex) it needs compat/distrib_optimizer.py for its checkpoint resume.

    Returns:
        (optimizer, scheduler): ``optimizer.step()`` returns (update_successful, grad_norm, num_zeros);
        ``scheduler.step(1)`` advances the learning rate by one optimizer step.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if cfg.parallel.use_distributed_optimizer:
        distrib_optimizer_compat.apply()  # its checkpoint resume with torch's Adam (no TE/apex)
    o = cfg.optim
    dtype = chunks[0].config.params_dtype
    if dtype != torch.float32 and not torch.cuda.is_available():
        raise ValueError(f"model.params_dtype={cfg.model.params_dtype!r} trains only on GPU (Megatron's "
                         "mixed-precision optimizer is CUDA-only); use float32 on CPU")
    opt_config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=0.0,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    total_steps = cfg.steps * o.num_mini_batches
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(total_steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    logger.info("optimizer: %s lr=%g clip_grad=%g distributed=%s, %d optimizer steps planned", o.optimizer,
                o.lr, o.clip_grad, cfg.parallel.use_distributed_optimizer, total_steps)
    return optimizer, scheduler


def zero_grads(chunks: list[torch.nn.Module], optimizer) -> None:
    """Zero the DDP grad buffers and the optimizer's grads before a step's micro-batches."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def optimizer_step(optimizer) -> tuple[bool, float]:
    """Step unless the global gradient norm is not finite (then nothing is applied).

    Megatron's fp32 optimizer has no overflow check of its own: a NaN gradient would be applied. The norm
    is global (reduced over model- and data-parallel ranks), so every rank takes the same decision. This is
    Megatron's ``step()`` taken apart so the gradients are prepared and their norm reduced once per step
    (calling ``step()`` after our own check would do both again).

    With the distributed optimizer nothing is skipped either: DDP's ``finish_grad_sync`` (run by the schedule
    through ``finalize_model_grads``) has reduce-scattered the gradients, so ``prepare_grads`` hands each rank
    its shard; the norm of the shards is reduced over all ranks, so clipping the shards by it clips like the
    whole; and ``step_with_ready_grads`` updates this rank's shard, then all-gathers the parameters
    (``overlap_param_gather`` is off in ``wrap_ddp``), so every rank holds the whole updated model on return.

    Returns:
        (applied, grad_norm): grad_norm before clipping; applied is False for a skipped step.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if params and part.config.clip_grad > 0.0 and not getattr(part, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(params, max_norm=part.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm
