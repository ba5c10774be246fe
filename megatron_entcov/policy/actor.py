"""The Actor: the Megatron policy of one run and the two things done with it, forward and one optimizer step.

Shared by RL (trainer.py) and SFT (sft.py), so building the model, its DDP wrapping, optimizer and schedule,
the micro-batch split, the pipeline schedule, and the skip of a non-finite update exist once. Losses stay
with their callers: a ``loss_fn(micro_batch, logprobs, entropy) -> (loss, metrics)`` gets the log-probs and
entropies of the micro-batch's labels (temperature and vocabulary padding already applied, policy/forward.py)
and returns its share of the caller's global loss (normalised by the caller's global denominator).

Example:
    actor = Actor(cfg, ps, temperature=cfg.sampling.temperature)
    logprobs, entropy = actor.logprobs(batch)                      # no grad; None off the last stage
    result = actor.train_step(mini_batch, loss_fn)                 # one optimizer step (or a reported skip)
    result.applied, result.grad_norm, result.metrics               # metrics summed over micro-batches
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from megatron_entcov.config.hf import check_model_matches_hf
from megatron_entcov.policy.batch import TrainBatch
from megatron_entcov.policy.forward import PolicyForward
from megatron_entcov.policy.model import build_model, sequence_extent
from megatron_entcov.policy.moe import aux_loss_metrics
from megatron_entcov.policy.optimizer import build_optimizer, optimizer_step, wrap_ddp, zero_grads
from megatron_entcov.policy.packing import MicroBatch, micro_batches
from megatron_entcov.policy.pipeline import run_microbatches
from megatron_entcov.policy.routing_replay import RoutingReplay, rollout_routing

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["Actor", "StepResult", "LossFn", "TrainingDivergedError"]

LossFn = Callable[[MicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
"""``loss_fn(micro_batch, logprobs, entropy) -> (loss scalar, metrics of detached scalars)``, logprobs and
entropy in the micro-batch's layout ([b, T] row slice, or [1, L] packed row). ``micro_batch``
(policy.packing.MicroBatch) holds the per-token tensors in that layout, ``rows`` (the mini-batch rows it holds)
and ``view`` (maps a mini-batch tensor [N, T], e.g. a token selection, into that layout)."""


class TrainingDivergedError(RuntimeError):
    """``optim.max_consecutive_skipped`` optimizer steps in a row were skipped (raised on every rank alike)."""


@dataclass
class StepResult:
    """One optimizer step of the Actor."""

    applied: bool
    """False when the global gradient norm was not finite: nothing was applied, the gradients were dropped."""
    grad_norm: float
    """Global gradient norm before clipping (the same on every rank)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The loss function's metrics summed over this rank's micro-batches (last pipeline stage; {} elsewhere)."""


class Actor:
    """Model chunks (Megatron DDP), optimizer and learning-rate schedule of one run. All methods are collective
    over the model-parallel group (and the data-parallel group for ``train_step``)."""

    def __init__(self, cfg: "RunConfig", ps: "ParallelState", *, temperature: float, load_weights: bool = False):
        """
        Args:
            cfg: the run config (model, parallel layout, ``optim``; SFT passes its own optimizer settings).
            ps: the parallel state.
            temperature: the sampling temperature the log-probs are taken at (1.0 for SFT).
            load_weights: the caller loads every weight next (checkpoint, Hugging Face): skip the random
                initialisation (policy.model.build_model) and call ``policy.model.check_loaded`` after loading.
        """
        self.cfg, self.ps = cfg, ps
        self.micro_batch_size = cfg.optim.micro_batch_size
        self.max_tokens = cfg.optim.max_tokens_per_micro_batch
        """Token budget of a packed micro-batch; 0 = row micro-batches of micro_batch_size (policy/packing.py)."""
        check_model_matches_hf(cfg.model)            # a model.hf_dir run builds config.json's architecture
        self.chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, ps, load_weights=load_weights,
                                           **sequence_extent(cfg)), cfg)
        self.optimizer, self.scheduler = build_optimizer(self.chunks, cfg)
        self.policy = PolicyForward(self.chunks, cfg.model, ps, temperature=temperature,
                                    use_compile=cfg.loss.compile_logprob_kernels)
        self.optimizer_steps = 0
        """Applied optimizer steps (the schedules' step)."""
        self.skipped_steps = 0
        """Updates skipped because the gradient norm was not finite."""
        self.consecutive_skipped = 0
        """Updates skipped since the last applied one; at ``optim.max_consecutive_skipped`` train_step raises."""
        self.routing_replay = RoutingReplay(self.chunks) if cfg.model.moe_routing_replay else None
        """model.moe_routing_replay: the step's recorded expert choices (policy/routing_replay.py)."""
        self._replay_part: int | None = None

    def logprobs(self, batch: TrainBatch, micro_batch_size: int | None = None, *, parts: int = 1,
                 record_routing: bool = False):
        """Forward only: (logprobs, entropy) [N, T] float32 of ``batch.labels`` on the last pipeline stage,
        (None, None) elsewhere. ``parts``: the batch's optimizer mini-batches, packed as their training steps
        will pack them (policy/packing.py). ``record_routing``: the step's old log-probs; with
        model.moe_routing_replay its expert choices are recorded for the mini-batches' forwards. Inside
        :meth:`use_recorded_routing` a forward over that mini-batch routes by the recorded choices."""
        mbs = micro_batch_size or self.micro_batch_size
        context = nullcontext()
        if self.routing_replay is not None and record_routing:
            counts = [len(micro_batches(mini, micro_batch_size=mbs, cp_size=self.ps.cp_size, cp_rank=self.ps.cp_rank,
                                        **self._packing())) for mini in batch.split(parts)]
            context = self.routing_replay.recording(counts, rollout=self._rollout_routing(batch, mbs, parts))
        elif self.routing_replay is not None and self._replay_part is not None:
            context = self.routing_replay.replaying(self._replay_part)
        with context:
            return self.policy.forward(batch, mbs, parts=parts, **self._packing())

    def _rollout_routing(self, batch: TrainBatch, mbs: int, parts: int) -> list[torch.Tensor] | None:
        """model.moe_routing_source=rollout: the rollout's experts per micro-batch of the old-log-prob forward, as
        its routers see the tokens (policy/routing_replay.py); None for the old_logprob source."""
        if self.cfg.model.moe_routing_source != "rollout":
            return None
        if batch.routed_experts is None:
            raise ValueError("model.moe_routing_source=rollout: the step's samples carry no routing "
                             "(Sample.routed_experts); the SGLang engine asks for it (rollout.engine=sglang, servers "
                             "with --enable-return-routed-experts), or set model.moe_routing_source=old_logprob")
        micro = micro_batches(batch, micro_batch_size=mbs, parts=parts, **self._packing())
        return rollout_routing(micro, batch.routed_experts, self.routing_replay.layer_numbers, tp_rank=self.ps.tp_rank,
                               tp_size=self.ps.tp_size, sequence_parallel=self.cfg.parallel.sequence_parallel)

    def use_recorded_routing(self, part: int | None) -> None:
        """With model.moe_routing_replay: the forwards that follow (``logprobs``, ``train_step``) are over
        mini-batch ``part`` of the recorded step and route by its recorded experts; None = the router's own
        routing again. Without replay, nothing."""
        self._replay_part = part

    def _packing(self) -> dict:
        """How policy/packing.py builds this actor's micro-batches: the token budget, the padding multiple of a
        packed row (the tensor-parallel size, for sequence parallelism) and the multiple of the micro-batch
        count and one row length (the interleaved schedule)."""
        interleaved = len(self.chunks) > 1
        return {"max_tokens": self.max_tokens, "multiple_of": self.ps.tp_size,
                "count_multiple": self.ps.pp_size if interleaved else 1, "uniform": interleaved}

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, *, label: str = "") -> StepResult:
        """Forward and backward over ``batch`` in micro-batches (``micro_batch_size`` rows, or packed rows of
        ``optim.max_tokens_per_micro_batch`` tokens), then one optimizer
        step, unless the global gradient norm is not finite: then nothing is applied, the gradients are
        dropped, a warning names ``label``, and ``skipped_steps`` counts it (every rank decides alike).

        Raises:
            TrainingDivergedError: this was the ``optim.max_consecutive_skipped``-th skip in a row (on every
                rank, since the decision is global), so the caller stops before saving anything of this step.
        """
        mbs = self.micro_batch_size
        sums: dict = {}

        def scored(mb: MicroBatch, logits):
            logprobs, entropy = self.policy.token_stats(logits, mb.labels)
            loss, metrics = loss_fn(mb, logprobs, entropy)
            for key, value in metrics.items():       # summed as returned (detached tensors: no host sync)
                sums[key] = sums.get(key, 0.0) + value
            return loss, {}

        micro = micro_batches(batch, micro_batch_size=mbs, cp_size=self.ps.cp_size, cp_rank=self.ps.cp_rank,
                              **self._packing())
        zero_grads(self.chunks, self.optimizer)
        replay = self.routing_replay if self._replay_part is not None else None
        with nullcontext() if replay is None else replay.replaying(self._replay_part):
            if replay is not None:
                replay.changed, replay.routed = 0, 0
            run_microbatches(self.chunks, micro, scored, ps=self.ps, forward_only=False)
        sums = self._sum_over_cp(sums)
        if replay is not None:
            sums.update(self._routing_changed_share(replay))
        sums.update(aux_loss_metrics(self.cfg.model, self.ps, len(micro)))      # train/moe_aux_loss when on
        applied, grad_norm = optimizer_step(self.optimizer)
        if applied:
            self.scheduler.step(1)
            self.optimizer_steps += 1
            self.consecutive_skipped = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skipped += 1
            logger.warning("%s: gradient norm %s is not finite; update skipped", label or "train step", grad_norm)
            zero_grads(self.chunks, self.optimizer)
            limit = self.cfg.optim.max_consecutive_skipped
            if limit and self.consecutive_skipped >= limit:
                raise TrainingDivergedError(
                    f"{label or 'train step'}: {self.consecutive_skipped} optimizer steps in a row were skipped "
                    f"(gradient norm {grad_norm}: the loss or the gradients are not finite); stopping at "
                    f"optim.max_consecutive_skipped={limit} before anything of this step is saved. Resume from the "
                    "newest checkpoint after the cause is fixed (e.g. a lower optim.lr), or raise "
                    "optim.max_consecutive_skipped (0 = never stop)")
        return StepResult(applied=applied, grad_norm=grad_norm, metrics={k: float(v) for k, v in sums.items()})

    def _sum_over_cp(self, sums: dict) -> dict:
        """The loss metrics of this rank's tokens summed over the context-parallel group (collective over it), so
        the rank that owns the replica's results (cp_rank 0) holds the replica's: each rank scored its own tokens,
        and the losses return shares of global values."""
        if self.ps.cp_size == 1 or not sums:
            return sums
        from megatron_entcov.distributed.collectives import all_reduce

        keys = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.ps.device) for k in keys])
        total = all_reduce(values, group=self.ps.cp_group)
        return dict(zip(keys, total.unbind()))

    def _routing_changed_share(self, replay: RoutingReplay) -> dict[str, float]:
        """``moe/routing_changed_share``: of the (token, MoE layer) pairs the training forward routed over every
        replica, the share whose router chose other experts than the old policy did (replayed anyway), as this
        replica's share on the rank that owns its results (collective over the model- and data-parallel groups)."""
        from megatron_entcov.distributed.collectives import reduce_values

        counts = reduce_values([float(replay.changed), float(replay.routed)], group=self.ps.mp_group)
        total = float(reduce_values([float(counts[1])], group=self.ps.dp_group)[0])
        return {"moe/routing_changed_share": float(counts[0]) / max(total, 1.0)} if self.ps.owns_results else {}

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return float(self.optimizer.param_groups[0]["lr"])
