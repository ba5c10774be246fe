"""Log-probs and entropies of given tokens under the policy, from this rank's vocabulary shard of the logits.

Shared by RL (old log-probs, the loss) and SFT, so the two details that must match the rollout engine are
handled once: the sampling temperature divides the logits, and padded vocabulary columns get -inf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.distributed.collectives import all_gather
from megatron_entcov.ops.vocab_parallel import logprobs_and_entropy
from megatron_entcov.policy.batch import TrainBatch
from megatron_entcov.policy.packing import MicroBatch, cp_gather, micro_batches, scatter_rows
from megatron_entcov.policy.pipeline import run_microbatches

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["PolicyForward"]


class PolicyForward:
    """Log-probs and entropies of labels under the policy, through the pipeline schedule.

    Owns the two details every caller must get right: the sampling temperature is applied to the logits
    (the engine samples from softmax(z / T)), and padded vocabulary columns (rows added to reach a multiple
    of make_vocab_size_divisible_by * tp) are excluded from the softmax, as the engine's vocabulary has none.
    """

    def __init__(self, chunks, model_cfg: ModelConfig, ps: "ParallelState", *, temperature: float = 1.0,
                 use_compile: bool = False):
        self.chunks, self.ps, self.temperature, self.use_compile = chunks, ps, temperature, use_compile
        local = model_cfg.padded_vocab_size(ps.tp_size) // ps.tp_size
        self.pad_from = min(max(model_cfg.vocab_size - ps.tp_rank * local, 0), local)
        self.has_padding = self.pad_from < local
        self.vocab_size = model_cfg.vocab_size

    def token_stats(self, logits: torch.Tensor, labels: torch.Tensor):
        """logits [b, T, V/tp] -> (logprobs [b, T], entropy [b, T]) in float32, differentiable."""
        z = logits
        if self.temperature != 1.0:
            z = z / self.temperature  # a new buffer: the division's backward does not need its output
        if self.has_padding:
            if z is logits:
                z = z.clone()
            z[..., self.pad_from:] = float("-inf")
        # The gradient is written into the logits buffer (peak extra memory: one row chunk). Nothing else
        # reads these logits after this op (Megatron's output layer does not save its output); if something
        # did, autograd's version counter would raise rather than give a wrong gradient.
        return logprobs_and_entropy(z, labels, self.ps.tp_group, inplace_backward=True,
                                    use_compile=self.use_compile)

    def forward(self, batch: TrainBatch, micro_batch_size: int, *, max_tokens: int = 0, multiple_of: int = 1,
                count_multiple: int = 1, parts: int = 1,
                uniform: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Forward only over ``batch``: (logprobs, entropy) [N, T] on the last stage, else (None, None).

        Micro-batches of ``micro_batch_size`` rows, or with ``max_tokens`` > 0 packed rows of at most that many
        tokens (policy/packing.py; ``multiple_of``, ``count_multiple``, ``parts``, ``uniform`` as there); either
        way the result is in ``batch``'s row layout: under context parallelism every rank of the group gets every
        token's values (each rank computes its tokens'; they are all-gathered over the group)."""

        def collect(mb: MicroBatch, logits):
            lp, ent = self.token_stats(logits, mb.labels)
            both = cp_gather(mb, torch.stack([lp.detach(), ent.detach()], dim=-1), self.ps.cp_size, self.ps.cp_group)
            return lp.sum() * 0.0, {"logprobs": both[..., 0], "entropy": both[..., 1]}

        micro = micro_batches(batch, micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                              multiple_of=multiple_of, count_multiple=count_multiple, parts=parts,
                              uniform=uniform, cp_size=self.ps.cp_size, cp_rank=self.ps.cp_rank)
        with torch.no_grad():
            outs = run_microbatches(self.chunks, micro, collect, ps=self.ps, forward_only=True)
        if not self.ps.is_last_stage:
            return None, None
        return (scatter_rows(batch, micro, [o["logprobs"] for o in outs]),
                scatter_rows(batch, micro, [o["entropy"] for o in outs]))

    def full_logits(self, batch: TrainBatch, micro_batch_size: int) -> torch.Tensor | None:
        """Forward only over ``batch``: the full-vocabulary logits z / T [N, T, V] in float32 on the last stage
        (the tensor-parallel shards gathered, the padded columns dropped: the softmax the engine samples from),
        else None. For diagnostics on small vocabularies (it returns N x T x V floats); padded micro-batches of
        ``micro_batch_size`` rows, whatever the training's packing (the values do not depend on it); under context
        parallelism the ranks' tokens are all-gathered over the group."""

        def collect(mb: MicroBatch, logits):
            z = logits.float() / self.temperature
            if self.ps.tp_size > 1:
                shards = [torch.empty_like(z) for _ in range(self.ps.tp_size)]
                all_gather(shards, z.contiguous(), group=self.ps.tp_group)
                z = torch.cat(shards, dim=-1)
            z = cp_gather(mb, z[..., :self.vocab_size], self.ps.cp_size, self.ps.cp_group)
            return logits.sum() * 0.0, {"logits": z}

        micro = micro_batches(batch, micro_batch_size=micro_batch_size, multiple_of=self.ps.tp_size,
                              cp_size=self.ps.cp_size, cp_rank=self.ps.cp_rank)
        with torch.no_grad():
            outs = run_microbatches(self.chunks, micro, collect, ps=self.ps, forward_only=True)
        if not self.ps.is_last_stage:
            return None
        return torch.cat([o["logits"] for o in outs])[:, :batch.input_ids.shape[1]]   # less any cp padding
