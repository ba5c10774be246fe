"""Distributed state: torch.distributed initialisation and Megatron's model-parallel groups.

This is the only module that imports ``megatron.core.parallel_state``. Everything else receives a
:class:`ParallelState` and passes its groups explicitly (``tp_group=``, ``dp_group=``), so ops and losses
also run without any process group (``group=None`` means single process). The process-group store never
listens on all interfaces when this module can help it (:func:`loopback_store` is the launcher's side).

Example:
    ps = init_parallel(cfg.parallel, seed=cfg.seed)   # reads RANK/WORLD_SIZE/MASTER_* (torchrun)
    logits = model(tokens, positions, None)            # Megatron uses the groups set up here
    logprobs, entropy = logprobs_and_entropy(logits, labels, ps.tp_group)
    destroy_parallel()

Design notes (the rendezvous): docs/design/distributed.md
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_entcov.compat import cpu as cpu_compat
from megatron_entcov.compat import device_audit
from megatron_entcov.config import ParallelConfig
from megatron_entcov.distributed import collectives

logger = logging.getLogger(__name__)

__all__ = ["ParallelState", "init_parallel", "destroy_parallel", "resolve_backend", "seed_everything", "raise_together",
           "fail_together", "loopback_store", "build_rollout_group"]


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
    """Data-parallel group: one rank of each replica (the same tp, cp and pp coordinates). The rows of a step are
    split over it; row-layout statistics (covariance, selection, metrics) reduce over it. Context-parallel ranks
    are not in it: they hold the same rows (docs/design/context_parallel.md)."""
    mp_group: object | None
    """The ranks of one data-parallel replica (tp x cp x pp; tp x pp without context parallelism): they hold one
    full copy of the model and the same rows of the step."""
    embedding_group: object | None
    """First and last pipeline stages (tied embeddings)."""
    device: torch.device
    backend: str
    vpp_size: int | None = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: object | None = None
    """Expert-parallel group (ep): the ranks of one pipeline stage that split each MoE layer's experts (Megatron's
    expert mesh with expert tp = 1: consecutive ranks, the tp ranks of a replica first, then other replicas).
    Each expert is whole on its rank."""
    cp_rank: int = 0
    cp_size: int = 1
    cp_group: object | None = None
    """Context-parallel group (cp): the ranks of a replica that split every sequence's tokens (Megatron's
    load-balanced 2 * cp chunks, policy/cp_layout.py) and hold the same weights; None when cp = 1. Gradients
    reduce over dp x cp (Megatron's DDP)."""

    @property
    def is_rank0(self) -> bool:
        """The one process that writes TensorBoard, prints and talks to rollout engines."""
        return self.rank == 0

    @property
    def layout(self) -> dict[str, int]:
        """The layout a checkpoint records (its RNG files are per rank of this layout): tp, pp, dp, and cp when > 1
        (so checkpoints of runs without context parallelism keep their record)."""
        out = {"tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size}
        return {**out, "cp": self.cp_size} if self.cp_size > 1 else out

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def owns_results(self) -> bool:
        """tp_rank 0 and cp_rank 0 on the last pipeline stage: the one rank per data-parallel replica that counts
        the replica's per-token results (losses, entropies, in the row layout) into summed metrics; other ranks
        hold copies (a training step's loss metrics are summed over the context-parallel ranks first,
        policy/actor.py)."""
        return self.tp_rank == 0 and self.cp_rank == 0 and self.is_last_stage

    @property
    def is_generator(self) -> bool:
        """tp_rank 0 and cp_rank 0 on the first pipeline stage: the one rank per data-parallel replica that holds
        the rollout engine (talks to its servers, scores rewards) and counts generation statistics."""
        return self.tp_rank == 0 and self.cp_rank == 0 and self.pp_rank == 0


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
    # Single-process runs need no launcher.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        store = dist.HashStore()               # one process: nothing to meet over a socket
    else:
        store = dist.PrefixStore("default_pg", _rendezvous_store(rank, world_size, timeout))  # as env:// names it
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _listen_socket(host: str, port: int) -> socket.socket | None:
    """A listening TCP socket on ``host``'s address only (not the wildcard), or None when ``host`` is not an
    address of this machine (or does not resolve)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError:
            sock.close()
    return None


def _hosted_store(host: str, sock: socket.socket, world_size: int | None, timeout: datetime.timedelta):
    """A TCPStore server on an already bound and listening socket (torch binds all interfaces otherwise)."""
    port = sock.getsockname()[1]
    try:
        store = dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=world_size is not None,
                              multi_tenant=True, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()                              # the store's server owns the descriptor now
    return store


def _rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The env:// rendezvous store (MASTER_ADDR/MASTER_PORT), built as torch builds it except that rank 0's
    server listens on MASTER_ADDR's interface only."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch the ranks with "
                         "torchrun or srun (slurm/*.sbatch), or use --nproc N on one machine")
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if hosts:
        sock = _listen_socket(host, int(port))
        if sock is not None:
            return _hosted_store(host, sock, world_size, timeout)
        logger.warning("rendezvous: MASTER_ADDR=%s is not an address of this machine; the store listens on all "
                       "interfaces", host)
    return dist.TCPStore(host, int(port), world_size, hosts, timeout, multi_tenant=True)


def loopback_store(timeout: datetime.timedelta = datetime.timedelta(minutes=30)):
    """(store, port): a TCPStore server on 127.0.0.1 only, on a port the OS picks. The ``--nproc`` launcher
    hosts torchrun's c10d rendezvous in it (torchrun's own servers would listen on all interfaces)."""
    sock = _listen_socket("127.0.0.1", 0)
    if sock is None:
        raise RuntimeError("cannot listen on 127.0.0.1 (no loopback interface?)")
    port = sock.getsockname()[1]
    return _hosted_store("127.0.0.1", sock, None, timeout), port


def init_parallel(cfg: ParallelConfig, *, seed: int, timeout_minutes: int = 30) -> ParallelState:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups; seed the RNGs.

    On a CPU-only torch this first applies :mod:`megatron_entcov.compat.cpu`.
    Raises ValueError when the world size does not fit the tp x pp layout.
    """
    backend = resolve_backend(cfg.backend)
    if not torch.cuda.is_available():
        cpu_compat.apply()
    if device_audit.armed():
        device_audit.arm()                      # a simulated accelerator: see megatron_entcov/compat/device_audit.py
    _init_process_group(backend, timeout_minutes)
    backend = dist.get_backend()               # a caller's own process group (tests: gloo) decides the device
    world_size = dist.get_world_size()
    mp = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.context_parallel_size
    if world_size % mp:
        raise ValueError(
            f"parallel.tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size = {mp} "
            f"must divide the world size {world_size}; launch a multiple of {mp} processes or change the layout")
    ep, pp = cfg.expert_model_parallel_size, cfg.pipeline_model_parallel_size
    if (world_size // pp) % ep:
        raise ValueError(
            f"parallel.expert_model_parallel_size={ep} must divide the ranks of a pipeline stage, {world_size // pp} "
            f"(world {world_size} / pp {pp} = tp x cp x dp): experts are split over a stage's tp and data-parallel "
            f"ranks; launch a multiple of {pp * ep} processes or lower it")

    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=timeout_minutes,
        # The gloo copies are only needed by the distributed optimizer's checkpoint path.
        create_gloo_process_groups=backend == "gloo" or cfg.use_distributed_optimizer,
    )
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = device_audit.current_device()  # the host, or the audit's simulated accelerator
    ps = ParallelState(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        mp_group=_replica_group(mpu, cfg, world_size),
        embedding_group=_embedding_group(mpu),
        device=device,
        backend=backend,
        vpp_size=cfg.virtual_pipeline_model_parallel_size,
        ep_rank=mpu.get_expert_model_parallel_rank(),
        ep_size=mpu.get_expert_model_parallel_world_size(),
        ep_group=mpu.get_expert_model_parallel_group() if ep > 1 else None,
        cp_rank=mpu.get_context_parallel_rank(),
        cp_size=mpu.get_context_parallel_world_size(),
        cp_group=mpu.get_context_parallel_group() if cfg.context_parallel_size > 1 else None,
    )
    seed_everything(seed, ps)
    logger.info("parallel: world=%d tp=%d pp=%d cp=%d dp=%d ep=%d backend=%s", world_size, ps.tp_size, ps.pp_size,
                ps.cp_size, ps.dp_size, ps.ep_size, backend)
    return ps


def build_rollout_group(ps: ParallelState):
    """A second group over the generating ranks (tp_rank 0, pp_rank 0 of every replica: the ranks of their
    data-parallel group), for the background rollout thread of ``rollout.overlap`` (rollout/prefetch.py): its gathers
    must not share a group with the main thread's collectives. gloo whatever the world's backend: it carries
    pickled payloads on the host, and keeps the thread off the training's NCCL streams.

    Collective over the world (every rank calls ``new_group`` in the same order, members or not). Returns the
    group on a generating rank when dp > 1, else None (one replica gathers nothing)."""
    if ps.dp_size == 1 or not collectives.is_distributed():
        return None
    flags = [0.0] * ps.world_size
    flags[ps.rank] = 1.0 if ps.is_generator else 0.0
    members = [r for r, f in enumerate(collectives.reduce_values(flags).tolist()) if f]
    assert len(members) == ps.dp_size, f"generating ranks {members} != one per replica (dp={ps.dp_size})"
    group = dist.new_group(ranks=members, backend="gloo")
    return group if ps.is_generator else None


def _replica_group(mpu, cfg: ParallelConfig, world_size: int):
    """The group of this rank's data-parallel replica: Megatron's model-parallel group (tp x pp) without context
    parallelism, else tp x cp x pp (Megatron builds no such group). Collective over the world when cp > 1 (every
    rank creates every replica's group, in the same order). Group rank 0 is the replica's lowest global rank,
    tp_rank = cp_rank = pp_rank = 0: its generating rank."""
    cp = cfg.context_parallel_size
    if cp == 1:
        return mpu.get_model_parallel_group()
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    ranks = mpu.RankGenerator(tp=tp, ep=1, dp=world_size // (tp * pp * cp), pp=pp, cp=cp, order="tp-cp-ep-dp-pp",
                              rank_offset=0).get_ranks("tp-cp-pp")
    mine = None
    for members in ranks:
        group = dist.new_group(ranks=sorted(members))
        if dist.get_rank() in members:
            mine = group
    return mine


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
        # Expert weights and dropout inside experts draw from a stream per ep rank (Megatron's seed offsets).
        cpu_compat.model_parallel_manual_seed(seed, tp_rank=ps.tp_rank, ep_rank=ps.ep_rank)


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
    failed = collectives.reduce_values([1.0 if error is not None else 0.0], op="max")
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
    device_audit.disarm()
