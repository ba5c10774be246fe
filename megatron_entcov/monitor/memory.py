"""GPU and host memory per phase of an RL step: the ``mem/*`` TensorBoard tags.

Colocated runs live or die by what the trainer holds while the servers generate, so each phase reports, as
the largest value over all ranks (the rank that runs out first):

- ``mem/<phase>/allocated(GiB)``: tensors alive at the end of the phase (``torch.cuda.memory_allocated``);
- ``mem/<phase>/reserved(GiB)``: what the caching allocator keeps from the driver then (what the servers
  cannot have unless it is emptied);
- ``mem/<phase>/peak(GiB)``: the most allocated at any moment of the phase;
- ``mem/<phase>/host_rss(GiB)``: the process's resident host memory (every device, CPU runs too);
- ``mem/offloaded(GiB)``: trainer state held on the host by policy/offload.py while the servers generate.

Phases: ``rollout`` (generation, rewards; the trainer's weights and optimizer are offloaded when colocated),
``train`` (old log-probs, the mini-batch updates), ``sync`` (pushing weights to the engine). The three GPU
tags exist only on CUDA devices.

Example:
    mem = PhaseMemory(ps)
    mem.begin("train"); ...; mem.end("train")
    metrics.update(mem.collect())          # collective: every rank calls it once per step
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
import torch

from megatron_entcov.distributed import collectives

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["PhaseMemory", "PHASES"]

PHASES = ("rollout", "train", "sync")
_GIB = float(1 << 30)


class PhaseMemory:
    """Memory figures of each phase of one step, reduced (max) over the world by :meth:`collect`."""

    def __init__(self, ps: "ParallelState"):
        self.on_gpu = ps.device.type == "cuda"
        self.device = ps.device
        self.values: dict[str, float] = {}
        self._process = psutil.Process()

    def begin(self, phase: str) -> None:
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self, phase: str, *, offloaded_bytes: int | None = None) -> None:
        if phase not in PHASES:
            raise ValueError(f"memory phase {phase!r} is not one of {PHASES}")
        v = self.values
        if self.on_gpu:
            v[f"mem/{phase}/allocated(GiB)"] = torch.cuda.memory_allocated(self.device) / _GIB
            v[f"mem/{phase}/reserved(GiB)"] = torch.cuda.memory_reserved(self.device) / _GIB
            v[f"mem/{phase}/peak(GiB)"] = torch.cuda.max_memory_allocated(self.device) / _GIB
        v[f"mem/{phase}/host_rss(GiB)"] = self._process.memory_info().rss / _GIB
        if offloaded_bytes is not None:
            v["mem/offloaded(GiB)"] = offloaded_bytes / _GIB

    def collect(self) -> dict[str, float]:
        """The phase figures since the last call, each the max over all ranks (collective over the world; every
        rank has recorded the same phases)."""
        keys = sorted(self.values)
        out = collectives.reduce_values([self.values[k] for k in keys], op="max") if keys else []
        self.values = {}
        return dict(zip(keys, [float(x) for x in out]))
