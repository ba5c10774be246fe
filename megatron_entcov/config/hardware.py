"""The ``hardware`` section of the run config: the machines a config is written for, what the planner
(``megatron-entcov plan``, megatron_entcov/plan/) checks it against, and what the trainer does when its start-up
plan says a phase cannot fit.

Design notes: docs/design/plan.md
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_entcov.config.checks import check_choices, check_positive

__all__ = ["HardwareConfig"]


@dataclass(kw_only=True)
class HardwareConfig:
    """The GPUs a config is meant for. ``megatron-entcov plan`` plans for these (its flags override them); the
    trainer plans for the world it was launched with and the memory of the GPU it sees."""

    accelerator: Literal["gpu", "cpu"] = "gpu"
    """What the ranks run on. 'cpu' (the CPU configs): the plan reads gpu_memory_gib as each process's share of
    the host's memory, plans Megatron's local attention, and counts SGLang servers as host processes of their own."""
    nodes: int = 1
    """Nodes of the job."""
    gpus_per_node: int = 8
    """GPUs per node, one trainer rank each."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (H100 80GB: 79.6 as torch reports it; the plan compares against this)."""
    runtime_reserve_gib: float = 2.0
    """GPU memory per trainer rank the plan sets aside beyond the tensors it counts: the CUDA context, NCCL's
    communicator buffers, the caching allocator's fragmentation (an allowance, not a measurement)."""
    fit_check: Literal["error", "warn", "off"] = "error"
    """What ``train`` does on a GPU machine when its start-up plan says a phase cannot fit: 'error' stops before
    anything is built, printing the plan's table; 'warn' logs the table and goes on; 'off' skips the plan."""

    def __post_init__(self) -> None:
        check_choices(self, "hardware")
        check_positive("hardware.nodes", self.nodes)
        check_positive("hardware.gpus_per_node", self.gpus_per_node)
        check_positive("hardware.gpu_memory_gib", self.gpu_memory_gib)
        check_positive("hardware.runtime_reserve_gib", self.runtime_reserve_gib, allow_zero=True)

    @property
    def world_size(self) -> int:
        """Trainer ranks: nodes x gpus_per_node."""
        return self.nodes * self.gpus_per_node
