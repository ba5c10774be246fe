"""What one rank's training state weighs: weights, gradient buffers and optimizer state, byte for byte.

Nothing here is a hand formula. Each pipeline stage's model is built by policy/model.py (the trainer's own
builder) with the config's real sharding, inside a one-process fake world of the job's size (torch's "fake"
process-group backend: groups exist, nothing is sent) and on the meta device (nothing is allocated); Megatron's
own DistributedDataParallel then lays out its gradient buffers (and, with the distributed optimizer, the
parameter buffers) on the meta device too, so their padding is Megatron's. The optimizer state follows from those
layouts: Adam keeps two fp32 moments and a step per parameter it updates, plus an fp32 master copy of each 16-bit
parameter; the distributed optimizer keeps them for this data-parallel rank's shard of each bucket only
(Megatron's ``DistributedOptimizer._build_model_gbuf_range``). tests/distributed/test_plan_states.py checks every
figure against the tensors the trainer allocates, to the byte.

Runs in a process with no process group and no visible GPU (``megatron-entcov plan`` is one; the trainer starts
it as a child process): it needs compat/cpu.py's stand-in for Megatron's device calls.

Example:
    stages = rank_states(cfg.model, cfg.parallel, world_size=16, optimizer="adam")
    stages[0].weights_bytes, stages[0].grads_bytes, stages[0].optimizer_bytes   # per dp rank: max over them
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_entcov.config import ModelConfig, ParallelConfig

__all__ = ["RankState", "rank_states", "fake_world"]

_ADAM_STEP_BYTES = 4
"""torch's Adam keeps its step count per parameter as a float32 scalar tensor."""


@dataclass(frozen=True)
class RankState:
    """The training state of one rank of a pipeline stage (tensor-parallel ranks of a stage hold the same)."""

    stage: int
    """Pipeline rank."""
    params: int
    """Parameters this rank holds (its shards), counted once (a tied embedding on the last stage counts there)."""
    weights_bytes: int
    """The parameters' bytes; with the distributed optimizer, Megatron's padded parameter buffers."""
    grads_bytes: int
    """Megatron's fp32 gradient buffers (``grad_reduce_in_fp32``), padding included."""
    optimizer_bytes_by_dp_rank: tuple[int, ...]
    """Optimizer state per data-parallel rank (they differ by the bucket padding when it is sharded; with experts,
    index r is rank r of both the dense and the expert data-parallel group: the largest is what must fit)."""
    has_embedding: bool
    """The input embedding is on this stage."""
    has_output_layer: bool
    """The output layer (or its tied copy of the embedding) is on this stage."""
    layers: int
    """Transformer layers on this rank (all its virtual chunks)."""

    @property
    def optimizer_bytes(self) -> int:
        """The largest data-parallel rank's optimizer state (what must fit)."""
        return max(self.optimizer_bytes_by_dp_rank)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int, parallel: ParallelConfig):
    """Megatron's model-parallel groups for ``rank`` of a ``world_size`` job, in this one process, on torch's
    fake backend (collectives return at once and move nothing). Refuses when a process group already exists."""
    from megatron.core import parallel_state as mpu
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner builds in a fake world of its own; this process already has a process "
                           "group (run `megatron-entcov plan` as its own process)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=1,
            create_gloo_process_groups=False,
        )
        yield mpu
    finally:
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        dist.destroy_process_group()


def rank_states(model: ModelConfig, parallel: ParallelConfig, *, world_size: int, optimizer: str = "adam"
                ) -> list[RankState]:
    """One :class:`RankState` per pipeline stage of ``model`` laid out by ``parallel`` over ``world_size`` ranks
    (a multiple of tp x pp x cp). ``optimizer``: optim.optimizer ('adam' keeps moments; 'sgd' without momentum
    keeps nothing beyond master weights)."""
    from megatron_entcov.compat import cpu as cpu_compat

    if torch.cuda.is_available():
        raise RuntimeError("the planner builds on the meta device through the CPU compat layer; start it with no "
                           "visible GPU (CUDA_VISIBLE_DEVICES=); the trainer does so for its start-up plan")
    cpu_compat.apply()
    pp = parallel.pipeline_model_parallel_size
    per_stage = world_size // pp
    return [_stage_state(model, parallel, world_size, stage * per_stage, optimizer) for stage in range(pp)]


def _stage_state(model: ModelConfig, parallel: ParallelConfig, world_size: int, rank: int,
                 optimizer: str) -> RankState:
    from megatron_entcov.compat import cpu as cpu_compat
    from megatron_entcov.distributed.parallel import ParallelState
    from megatron_entcov.policy.model import build_model
    from megatron_entcov.policy.optimizer import wrap_chunks_ddp

    meta = torch.device("meta")
    # The local spec: the parameters (names, shapes, order within a layer aside) are Transformer Engine's too.
    build_cfg = dataclasses.replace(model, transformer_impl="local")
    with fake_world(world_size, rank, parallel) as mpu, torch.device(meta), cpu_compat.allocations_on(meta):
        ps = ParallelState(
            rank=rank, world_size=world_size,
            tp_rank=mpu.get_tensor_model_parallel_rank(), tp_size=mpu.get_tensor_model_parallel_world_size(),
            pp_rank=mpu.get_pipeline_model_parallel_rank(), pp_size=mpu.get_pipeline_model_parallel_world_size(),
            dp_rank=mpu.get_data_parallel_rank(with_context_parallel=True),
            dp_size=mpu.get_data_parallel_world_size(with_context_parallel=True),
            tp_group=None, pp_group=None, dp_group=None, mp_group=None, embedding_group=None,
            device=meta, backend="fake", vpp_size=parallel.virtual_pipeline_model_parallel_size,
            ep_rank=mpu.get_expert_model_parallel_rank(), ep_size=mpu.get_expert_model_parallel_world_size())
        chunks = build_model(build_cfg, parallel, ps, load_weights=True)
        layers = sum(len(c.decoder.layers) for c in chunks)
        has_embedding = any(getattr(c, "pre_process", False) for c in chunks)
        has_output = any(getattr(c, "post_process", False) for c in chunks)
        chunks = wrap_chunks_ddp(chunks, use_distributed_optimizer=parallel.use_distributed_optimizer)
        dense = [b for c in chunks for b in c.buffers]
        experts = [b for c in chunks for b in c.expert_parallel_buffers]
        buffers = dense + experts
        params = {id(p): p for c in chunks for p in c.parameters()}
        weights = _weights_bytes(params.values(), buffers, parallel.use_distributed_optimizer)
        grads = sum(b.numel * _itemsize(b.grad_dtype) for b in buffers)
        by_rank = _optimizer_by_rank(dense, experts, parallel.use_distributed_optimizer, optimizer)
        numel = sum(p.numel() for p in params.values())
    return RankState(stage=ps.pp_rank, params=numel, weights_bytes=weights, grads_bytes=grads,
                     optimizer_bytes_by_dp_rank=by_rank, has_embedding=has_embedding, has_output_layer=has_output,
                     layers=layers)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _weights_bytes(params, buffers, distributed: bool) -> int:
    """With the distributed optimizer every trained parameter lives in its buffer's padded ``param_data``."""
    if not distributed:
        return sum(p.numel() * p.element_size() for p in params)
    in_buffers = {id(p) for b in buffers for p in b.params}
    loose = sum(p.numel() * p.element_size() for p in params if id(p) not in in_buffers)
    return loose + sum(b.numel * _itemsize(b.param_dtype) for b in buffers)


def _optimizer_by_rank(dense, experts, distributed: bool, optimizer: str) -> tuple[int, ...]:
    """Per data-parallel rank: its shard of the dense buffers, plus the largest expert-data-parallel rank's shard
    of the expert buffers (the expert group pairs its ranks with the dense ones differently; an upper bound)."""
    dense_dp = max((b.data_parallel_world_size for b in dense), default=1)
    expert_dp = max((b.data_parallel_world_size for b in experts), default=1)
    expert = max(_optimizer_bytes(experts, r, distributed, optimizer) for r in range(expert_dp)) if experts else 0
    return tuple(_optimizer_bytes(dense, r, distributed, optimizer) + expert for r in range(dense_dp))


def _optimizer_bytes(buffers, dp_rank: int, distributed: bool, optimizer: str) -> int:
    """Adam: an fp32 master copy of each 16-bit parameter (fp32 parameters are their own master), two fp32
    moments and a step scalar per updated tensor; SGD without momentum: master copies only. Distributed: only
    the elements of each bucket's ``dp_rank``-th equal slice, one tensor per parameter the slice touches."""
    total = 0
    for b in buffers:
        master = 4 if b.param_dtype != torch.float32 else 0
        per_elem = master + (8 if optimizer == "adam" else 0)
        per_tensor = _ADAM_STEP_BYTES if optimizer == "adam" else 0
        if not distributed:
            total += sum(p.numel() * per_elem + per_tensor for p in b.params)
            continue
        dp = b.data_parallel_world_size
        for bucket in b.buckets:
            size = bucket.grad_data.numel() // dp
            lo = bucket.offset + dp_rank * size
            hi = lo + size
            for p in bucket.params:
                start, end, _ = b.param_index_map[p]
                n = max(0, min(end, hi) - max(start, lo))
                if n:
                    total += n * per_elem + per_tensor
    return total
