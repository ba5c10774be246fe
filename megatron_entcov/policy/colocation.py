"""Who holds the GPU in each phase of an RL step when colocated SGLang servers share it with the trainer
(``rollout.sglang.release_memory``): the trainer's offload (policy/offload.py), the servers' release/resume
calls, the cached blocks handed back to the driver, the barriers, and their order, as phase contexts. When
colocation is off every hand-over is a no-op without collectives; the phases still take the per-phase memory
figures (monitor/memory.py) when given a recorder.
Example:
    colo = Colocation.from_config(cfg, actor.chunks, actor.optimizer, memory=PhaseMemory(ps))
    with colo.rollout():
        with colo.generating(engine): ...      # the generating rank: the servers release the GPU after
    with colo.train(): ...                     # old log-probs, the updates
    with colo.sync(), colo.push(engine) as prepare:
        weight_sync.push(engine, version, prepare=prepare)
    with colo.checkpoint(engine): checkpointer.save(...)
Design notes: docs/design/trainer.md
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch

from megatron_entcov.distributed import collectives
from megatron_entcov.distributed.parallel import fail_together
from megatron_entcov.policy.offload import TrainerOffload

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig

__all__ = ["Colocation", "PhaseRecorder"]


class PhaseRecorder(Protocol):
    """What records memory figures at the phase boundaries (monitor/memory.py ``PhaseMemory``)."""

    def begin(self, phase: str) -> None: ...

    def end(self, phase: str, *, offloaded_bytes: int | None = None) -> None: ...


def _return_cached_blocks() -> None:
    """Hand the caching allocator's free blocks back to the driver, where the servers can take them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Colocation:
    """The GPU hand-over between the trainer and colocated servers, phase by phase. Every context is collective
    over the world when colocation is on (every rank enters it; ``engine`` is None on ranks without one)."""

    def __init__(self, offload: TrainerOffload, *, memory: PhaseRecorder | None = None):
        """``offload``: the trainer's state mover; its ``enabled`` is whether the servers are colocated.
        ``memory``: records each phase's memory figures at its boundaries (None = none)."""
        self.offload, self.memory = offload, memory

    @classmethod
    def from_config(cls, cfg: "RunConfig", chunks, optimizer, *, memory: PhaseRecorder | None = None) -> "Colocation":
        return cls(TrainerOffload(chunks, optimizer, enabled=cfg.rollout.sglang.release_memory), memory=memory)

    @property
    def enabled(self) -> bool:
        """Whether the servers share the trainer's GPUs and hand them over between phases."""
        return self.offload.enabled

    @property
    def sync_every_step(self) -> bool:
        """Colocated servers drop their weights after generating: every step pushes them back, even one whose
        updates were all skipped (its weights are unchanged)."""
        return self.enabled

    @contextmanager
    def rollout(self) -> Iterator[None]:
        """The servers generate: the trainer's weights, gradients and optimizer state leave the device first;
        the memory figures are taken before they come back, at the end."""
        self._begin("rollout")
        self._make_room(weights=True)
        yield
        self._end("rollout", offloaded_bytes=self.offload.host_bytes if self.enabled else None)
        self.offload.reload()                  # the servers released their memory at the end of generating

    @contextmanager
    def generating(self, engine) -> Iterator[None]:
        """The generating rank's rollouts (inside :meth:`rollout`): once they are done, colocated servers give
        their memory back to the trainer. Not after an error: the servers keep what they hold."""
        yield
        if self.enabled:
            engine.release_memory()

    @contextmanager
    def train(self) -> Iterator[None]:
        """Old log-probs and the optimizer steps: the trainer holds the GPU (its state came back in :meth:`rollout`)."""
        self._begin("train")
        yield
        self._end("train")

    @contextmanager
    def sync(self) -> Iterator[None]:
        """The step's weight sync (:meth:`push` hands the GPU over around the push itself)."""
        self._begin("sync")
        yield
        self._end("sync")

    @contextmanager
    def push(self, engine) -> Iterator[Callable[[], None] | None]:
        """Around one weight push; yields the ``prepare`` hook for ``WeightSync.push`` (None when off).
        Gradients and optimizer state leave before the servers take their weight memory back (in ``prepare``,
        on the generating rank, just before the push); the sync's buffers leave too before the servers take
        their KV cache and CUDA graphs back, after the push."""
        self._make_room(weights=False)
        yield (lambda: engine.resume_memory(["weights"])) if self.enabled else None
        if self.enabled:                       # the same on every rank: no collective when off
            self._make_room(weights=False)
            with fail_together("resuming the servers' memory"):
                if engine is not None:
                    engine.resume_memory()

    @contextmanager
    def checkpoint(self, engine) -> Iterator[None]:
        """A checkpoint save: colocated servers keep their (synced) weights but give back their KV cache and
        CUDA graphs while the optimizer state is on the device for the save; they take them back after it,
        also when the save fails."""
        if self.enabled:
            with fail_together("releasing the servers' KV cache for a checkpoint"):
                if engine is not None:
                    engine.release_memory(["kv_cache", "cuda_graph"])
        try:
            self.offload.reload(parts=("optimizer", "weights"))      # the gradient buffers stay freed
            yield
        finally:
            if self.enabled:
                self._make_room(weights=False)
                with fail_together("resuming the servers' KV cache after a checkpoint"):
                    if engine is not None:
                        engine.resume_memory()

    def _make_room(self, *, weights: bool) -> None:
        """Offload the trainer's state, hand the cached blocks back to the driver, and wait for every rank to
        have done so before any server takes memory back (collective when on; nothing otherwise)."""
        if not self.enabled:
            return
        self.offload.offload(weights=weights)
        _return_cached_blocks()
        collectives.barrier()

    def _begin(self, phase: str) -> None:
        if self.memory is not None:
            self.memory.begin(phase)

    def _end(self, phase: str, **kwargs) -> None:
        if self.memory is not None:
            self.memory.end(phase, **kwargs)
