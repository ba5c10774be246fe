"""Each rank role's bytes in each phase of an RL step, its peak, and whether it fits its GPU.

A role is a pipeline stage, split where its ranks differ: the generating rank (tp_rank 0 of stage 0: it gathers
the weight-sync buckets and runs the embedded engine) and the ranks whose GPU a colocated server shares. The
phases follow the trainer (trainer.py) and the GPU hand-over of policy/colocation.py:

- ``rollout``: the engine generates. With ``rollout.sglang.release_memory`` the trainer's weights, gradient
  buffers and optimizer state are in host memory (policy/offload.py); otherwise they stay.
- ``old_logprob``: the forward-only pass over the batch: the trainer's state and one micro-batch's transient
  forward memory (plan/activations.py ``forward_bytes``).
- ``train``: forward and backward: the state and the pipeline's kept activations (``train_bytes``).
- ``sync``: the weight push: the weights and the sync's buckets (gradients and optimizer state offloaded when
  colocated) and the servers' weights.
- ``checkpoint``: weights and optimizer state (gradients freed when colocated); the servers keep their weights.

Every phase adds ``hardware.runtime_reserve_gib`` per rank. Design notes: docs/design/plan.md
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_entcov.config import RunConfig
from megatron_entcov.config.dtypes import torch_dtype
from megatron_entcov.plan.activations import Activations
from megatron_entcov.plan.servers import EngineUsage
from megatron_entcov.plan.states import RankState

__all__ = ["PHASES", "RankPlan", "plan_role", "largest_full_tensor_bytes"]

PHASES = ("rollout", "old_logprob", "train", "sync", "checkpoint")
GIB = 1 << 30


@dataclass(frozen=True)
class RankPlan:
    """One rank role's plan: its state, what each phase holds, the peak."""

    stage: int
    role: str
    """'generating rank', 'server GPU', 'generating rank + server GPU' or 'other ranks' of the stage."""
    ranks: int
    """How many ranks of the job have this role."""
    state: RankState
    activations_bytes: int
    """The training pass's kept activations (what the train phase adds to the state)."""
    servers_bytes: int
    """The most the rollout engine keeps on this GPU in any phase."""
    phases: dict[str, int] = field(default_factory=dict)
    """Bytes held in each phase (reserve included)."""
    gpu_memory_bytes: int = 0
    host_offload_bytes: int = 0
    """Pinned host memory this rank's offload keeps (colocated servers that release memory)."""

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_bytes


def largest_full_tensor_bytes(cfg: RunConfig) -> int:
    """The largest whole (unsharded) Hugging Face tensor the weight sync gathers: the padded embedding or output
    layer, or the fused gate/up projection."""
    m = cfg.model
    tp = cfg.parallel.tensor_model_parallel_size
    itemsize = torch_dtype(m.params_dtype, field="model.params_dtype").itemsize
    return max(m.padded_vocab_size(tp) * m.hidden_size, 2 * m.ffn_hidden_size * m.hidden_size) * itemsize


def plan_role(cfg: RunConfig, state: RankState, acts: Activations, engine: EngineUsage, *, role: str, ranks: int,
              generator: bool, hosts_server: bool, gpu_memory_bytes: int) -> RankPlan:
    """The phases of one role (see the module docstring)."""
    released = engine.where == "colocated servers" and cfg.rollout.sglang.release_memory
    reserve = int(cfg.hardware.runtime_reserve_gib * GIB)
    w, g, o = state.weights_bytes, state.grads_bytes, state.optimizer_bytes
    full = w + g + o
    # The generating rank receives one bucket plus one whole tensor at a time; tp_rank 0 of a later stage gathers
    # whole tensors and queues up to a bucket of sends to it (counted for every rank of those stages); the other
    # ranks send their shards.
    largest = largest_full_tensor_bytes(cfg)
    if generator or state.stage > 0:
        sync_buffers = int(cfg.weight_sync.bucket_mb * (1 << 20)) + largest
    else:
        sync_buffers = largest // cfg.parallel.tensor_model_parallel_size
    on_gpu = hosts_server or (generator and engine.where == "embedded engine")
    server = {phase: engine.phase_bytes(phase) if on_gpu else 0 for phase in PHASES}
    phases = {
        "rollout": (0 if released else full) + server["rollout"],
        "old_logprob": full + acts.forward_bytes + server["old_logprob"],
        "train": full + acts.train_bytes + server["train"],
        "sync": (w if released else full) + sync_buffers + server["sync"],
        "checkpoint": (w + o if released else full) + server["checkpoint"],
    }
    phases = {k: v + reserve for k, v in phases.items()}
    return RankPlan(stage=state.stage, role=role, ranks=ranks, state=state, activations_bytes=acts.train_bytes,
                    servers_bytes=max(server.values()), phases=phases, gpu_memory_bytes=gpu_memory_bytes,
                    host_offload_bytes=full if released else 0)
