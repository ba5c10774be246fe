"""GPU and host memory per phase of an RL step (``rollout``, ``train``, ``sync``): the ``mem/*`` tags, each the
largest value over all ranks (the rank that runs out first).

- ``mem/<phase>/allocated_GiB``, ``reserved_GiB``, ``peak_GiB``: tensors alive at the end of the phase, what
  the caching allocator keeps from the driver then, the most allocated during the phase (CUDA devices only);
- ``mem/<phase>/host_rss_GiB``: the process's resident host memory (every device);
- ``mem/offloaded_GiB``: trainer state on the host (policy/offload.py) while colocated servers generate.

Example:
    mem = PhaseMemory(ps)
    mem.begin("train"); ...; mem.end("train")       # policy/colocation.py's phase contexts call these
    step_metrics.add(mem.take(), MAX)               # reduced with the step's other maxima (monitor/step.py)
Design notes: docs/design/monitor.md
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
import torch

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["PhaseMemory", "PHASES"]

PHASES = ("rollout", "train", "sync")
_GIB = float(1 << 30)


class PhaseMemory:
    """Memory figures of each phase of one step on this rank, until :meth:`take` hands them over."""

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
            v[f"mem/{phase}/allocated_GiB"] = torch.cuda.memory_allocated(self.device) / _GIB
            v[f"mem/{phase}/reserved_GiB"] = torch.cuda.memory_reserved(self.device) / _GIB
            v[f"mem/{phase}/peak_GiB"] = torch.cuda.max_memory_allocated(self.device) / _GIB
        v[f"mem/{phase}/host_rss_GiB"] = self._process.memory_info().rss / _GIB
        if offloaded_bytes is not None:
            v["mem/offloaded_GiB"] = offloaded_bytes / _GIB

    def take(self) -> dict[str, float]:
        """This rank's figures since the last call (then forgotten): to reduce as the max over all ranks."""
        values, self.values = self.values, {}
        return values
