"""Distributed state: torch.distributed initialisation and Megatron's model-parallel groups.

This is the only module that imports ``megatron.core.parallel_state``. Everything else receives a
:class:`ParallelState` and passes its groups explicitly (``tp_group=``, ``dp_group=``), so ops and losses
also run without any process group (``group=None`` means single process).

Example:
    ps = init_parallel(cfg.parallel, seed=cfg.seed)   # reads RANK/WORLD_SIZE/MASTER_* (torchrun)
    logits = model(tokens, positions, None)            # Megatron uses the groups set up here
    logprobs, entropy = logprobs_and_entropy(logits, labels, ps.tp_group)
    destroy_parallel()
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_entcov.compat import cpu as cpu_compat
from megatron_entcov.config import ParallelConfig
from megatron_entcov.net import free_port

logger = logging.getLogger(__name__)

__all__ = ["ParallelState", "init_parallel", "destroy_parallel", "resolve_backend", "seed_everything", "raise_together",
           "fail_together"]


@dataclass(frozen=True)
class ParallelState:
    """Ranks, sizes and process groups of this process. Built once by :func:`init_parallel`."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    tp_group: object | None
    pp_group: object | None
    dp_group: object | None
    """Data-parallel group (with context parallel when cp > 1: the group covariance statistics reduce over)."""
    mp_group: object | None
    """Model-parallel group (tp x pp): ranks that hold one full copy of the model."""
    embedding_group: object | None
    """First and last pipeline stages (tied embeddings)."""
    device: torch.device
    backend: str
    vpp_size: int | None = None

    @property
    def is_rank0(self) -> bool:
        """The one process that writes TensorBoard, prints and talks to rollout engines."""
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def owns_results(self) -> bool:
        """tp_rank 0 on the last pipeline stage: the one rank per data-parallel replica that counts the
        replica's per-token results (losses, entropies) into summed metrics; other ranks hold copies."""
        return self.tp_rank == 0 and self.is_last_stage

    @property
    def is_generator(self) -> bool:
        """tp_rank 0 on the first pipeline stage: the one rank per data-parallel replica that holds the rollout
        engine (talks to its servers, scores rewards) and counts generation statistics."""
        return self.tp_rank == 0 and self.pp_rank == 0


def resolve_backend(requested: str) -> str:
    """'auto' -> nccl with CUDA, gloo without; an explicit 'nccl' without CUDA is an error."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend='nccl' needs CUDA, which this torch build or machine lacks; use 'gloo' or 'auto'")
    return requested


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    # Single-process runs need no launcher: fill the env:// rendezvous with a local default.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_parallel(cfg: ParallelConfig, *, seed: int, timeout_minutes: int = 30) -> ParallelState:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups; seed the RNGs.

    On a CPU-only torch this first applies :mod:`megatron_entcov.compat.cpu`.
    Raises ValueError when the world size does not fit the tp x pp layout.
    """
    backend = resolve_backend(cfg.backend)
    if not torch.cuda.is_available():
        cpu_compat.apply()
    _init_process_group(backend, timeout_minutes)
    world_size = dist.get_world_size()
    mp = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size
    if world_size % mp:
        raise ValueError(
            f"parallel.tensor_model_parallel_size * pipeline_model_parallel_size = {mp} must divide the world "
            f"size {world_size}; launch a multiple of {mp} processes or change the layout")

    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        # The gloo copies are only needed by the distributed optimizer's checkpoint path.
        create_gloo_process_groups=backend == "gloo" or cfg.use_distributed_optimizer,
    )
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    ps = ParallelState(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(with_context_parallel=True),
        dp_size=mpu.get_data_parallel_world_size(with_context_parallel=True),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(with_context_parallel=True),
        mp_group=mpu.get_model_parallel_group(),
        embedding_group=_embedding_group(mpu),
        device=device,
        backend=backend,
        vpp_size=cfg.virtual_pipeline_model_parallel_size,
    )
    seed_everything(seed, ps)
    logger.info("parallel: world=%d tp=%d pp=%d dp=%d backend=%s", world_size, ps.tp_size, ps.pp_size,
                ps.dp_size, backend)
    return ps


def _embedding_group(mpu):
    # Ranks outside the first/last stages belong to no embedding group; Megatron asserts instead of None.
    try:
        return mpu.get_embedding_group()
    except AssertionError:
        return None


def seed_everything(seed: int, ps: ParallelState) -> None:
    """Seed Python, torch and Megatron's model-parallel RNG tracker (tensor-parallel ranks get distinct streams)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.model_parallel_manual_seed(seed, tp_rank=ps.tp_rank)


class fail_together:
    """Context manager form of :func:`raise_together`: an exception in the body on any rank raises on every
    rank when the block ends. Collective over the world: every rank enters the block, whatever work its
    role gives it inside. Exceptions that are not ``Exception`` (KeyboardInterrupt, SystemExit) pass at once.

    Example:
        with fail_together(f"step {step} rollouts"):
            if ps.is_generator:
                exp = collect_experience(...)      # only this rank talks to the servers
        exp = broadcast_experience(exp, ps)         # every rank gets here, or every rank raised
    """

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> "fail_together":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False
        raise_together(exc, self.what)
        return False


def raise_together(error: BaseException | None, what: str) -> None:
    """Collective over the world: when ``error`` is set on any rank, raise on EVERY rank (the failing rank its
    own error, the others a RuntimeError pointing to it) instead of leaving the others blocked in the next
    collective. For work only some ranks do (the generating ranks talk to the rollout servers).

    Example:
        err = None
        if is_generator:
            try: exp = collect_experience(...)
            except Exception as e: err = e
        raise_together(err, "rollout")            # then the broadcast that every rank joins
    """
    failed = torch.tensor([1.0 if error is not None else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"{what} failed on another rank (a generating rank); its error is in its log")


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (tests call this between layouts)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
