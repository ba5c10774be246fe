"""The RL loop (GRPO-style RLVR with Clip-Cov / KL-Cov entropy control) on a Megatron-Core policy.

One step (arXiv 2505.22617, the released recipe): (1) experience: prompts, n responses each from the rollout
engine, verifier rewards, group advantages (experience.py); (2) old log-probs and entropy under the current
weights; (3) per optimizer mini-batch: Clip-Cov / KL-Cov token selection from the global covariance, the policy
loss, one optimizer step (policy/actor.py); (4) the wait for the next step's prefetched rollouts (rollout.overlap),
the weight sync, the metrics; then the online entropy-law fit and a checkpoint. This module orchestrates: loss
math is in losses/ and ops/, the GPU hand-over to colocated servers in policy/colocation.py, metric reductions
and timings in monitor/step.py.

Example:
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    Trainer(cfg, ps).train()
Design notes: docs/design/trainer.md
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from megatron_entcov.config import RunConfig, dump_config
from megatron_entcov.distributed.parallel import ParallelState, build_rollout_group, fail_together
from megatron_entcov.entropy_law import OnlineEntropyLaw
from megatron_entcov.evaluation import Evaluator
from megatron_entcov.experience import (
    Experience,
    agree_loader_cursor,
    broadcast_experience,
    collect_experience,
    dp_gather,
    shard_experience,
    to_train_batch,
)
from megatron_entcov.losses.adaptive_entropy import AdaptiveEntropyCoef
from megatron_entcov.losses.policy import TokenSelection, compute_token_selection, policy_loss, warn_if_kl_cov_inert
from megatron_entcov.losses.schedules import annealed_coefficients
from megatron_entcov.monitor.dashboard import config_markdown, entropy_control_layout, source_markdown
from megatron_entcov.monitor.entropy_classes import chosen_tokens, entropy_change_by_class, predicted_by_class
from megatron_entcov.monitor.exact_entropy_change import exact_first_order_change
from megatron_entcov.monitor.histograms import TokenHistograms
from megatron_entcov.monitor.law_report import law_snapshot
from megatron_entcov.monitor.memory import PhaseMemory
from megatron_entcov.monitor.metrics import MetricsLogger, Progress
from megatron_entcov.monitor.server_metrics import server_throughput
from megatron_entcov.monitor.step import EXACT, LOCAL, MAX, RANK0, SUM, StepMetrics
from megatron_entcov.policy.actor import Actor
from megatron_entcov.policy.batch import TrainBatch
from megatron_entcov.policy.colocation import Colocation
from megatron_entcov.policy.model import check_loaded
from megatron_entcov.rollout import build_engine
from megatron_entcov.rollout.prefetch import RolloutPrefetch, staleness_sums
from megatron_entcov.run.checkpoint import Checkpointer, CheckpointError, load_model, resolve_model_dir
from megatron_entcov.run.run_dir import RunDir
from megatron_entcov.run.stop import agree_stop, wait_or_stop
from megatron_entcov.tasks.prompts import PromptDataset, PromptLoader
from megatron_entcov.tasks.tokenizer import load_tokenizer
from megatron_entcov.weights.probe import verify_sync
from megatron_entcov.weights.shards import load_hf_weights
from megatron_entcov.weights.sync import WeightSync

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]


class Trainer:
    """Builds every component from a RunConfig and runs the RL loop. All methods are collective."""

    def __init__(self, cfg: RunConfig, ps: ParallelState, *, engine=None, run: RunDir | None = None):
        """``run``: the run directory already opened by the caller (the quickstart opens it before its SFT
        warm start); None = open (lock, identity) ``cfg.run_dir`` here and release it in :meth:`close`."""
        self.cfg, self.ps = cfg, ps
        self.run_dir = Path(cfg.run_dir)
        self.engine = engine
        # Ownership first, before anything is written: refuses another run's directory, or one in use.
        self._owns_run = run is None
        self.run = run if run is not None else RunDir.open(self.run_dir, ps, resume=cfg.checkpoint.resume)
        try:
            self._build(engine)
        except BaseException:
            if self._owns_run:  # a new run that failed to start gives its directory back (no checkpoint yet)
                self.run.close(failed_to_start=True)
            raise

    def _build(self, engine) -> None:
        cfg, ps = self.cfg, self.ps
        if ps.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "resolved_config.yaml")
        warn_if_kl_cov_inert(cfg.loss, cfg.optim.num_mini_batches)
        self.tokenizer = load_tokenizer(cfg.model.hf_dir)
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer "
                             f"({len(self.tokenizer)} tokens); set model.vocab_size >= {len(self.tokenizer)}")
        # The data first: a bad file fails before a model is built.
        dataset = PromptDataset.from_config(cfg.data, self.tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                            seed=cfg.seed)
        self.actor = Actor(cfg, ps, temperature=cfg.sampling.temperature,
                           load_weights=self._weights_source() != "random")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", ps, keep_last=cfg.checkpoint.keep_last,
                                         run_id=self.run.run_id)
        self.loader = PromptLoader(dataset, batch_size=cfg.rollout.prompts_per_step, dp_rank=ps.dp_rank,
                                   dp_size=ps.dp_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.engine = engine
        with fail_together("starting the rollout engine"):
            if ps.is_generator and self.engine is None:
                self.engine = build_engine(cfg, dp_rank=ps.dp_rank, dp_size=ps.dp_size, device=ps.device,
                                           waiter=wait_or_stop)     # a stop signal ends its waits for servers
        self.weight_sync = WeightSync(self.actor.chunks, cfg.model, ps,
                                      bucket_bytes=int(cfg.weight_sync.bucket_mb * 2**20))
        self.metrics = MetricsLogger(self.run_dir, ps, enabled=cfg.metrics.tensorboard,
                                     log_interval=cfg.metrics.log_interval)
        self.evaluator = Evaluator(cfg, ps, self.tokenizer, dataset) if cfg.eval.interval else None
        self.law = OnlineEntropyLaw(min_points=cfg.metrics.law_fit_min_points)
        self.entropy_control = AdaptiveEntropyCoef.from_config(cfg.loss)
        """loss.target_entropy > 0: the adaptive entropy coefficient c_k (losses/adaptive_entropy.py)."""
        self.law_on_eval = cfg.metrics.law_reward == "eval" or (cfg.metrics.law_reward == "auto"
                                                                and self.evaluator is not None)
        self.step_histograms: dict = {}
        """The last step's sampled token values (rank 0; monitor/histograms.py), written beside its scalars."""
        self.memory = PhaseMemory(ps)
        """The step's memory figures per phase (monitor/memory.py), taken by the colocation's phase contexts."""
        self.colocation = Colocation.from_config(cfg, self.actor.chunks, self.actor.optimizer, memory=self.memory)
        """Who holds the GPU in each phase when colocated servers share it (policy/colocation.py)."""
        self.step = 0
        self.weight_version = 0
        overlap = cfg.rollout.overlap
        # Collective on every rank (new_group), in the same place of the build on all of them.
        self.rollout_group = build_rollout_group(ps) if overlap else None
        self.prefetch = RolloutPrefetch() if overlap else None
        """rollout.overlap: the background rollout of the next step (generating ranks; rollout/prefetch.py)."""
        self._prefetched: Experience | None = None
        """The next step's experience (this replica's rows), generated while the last step trained."""
        self._loader_state: dict | None = None
        """rollout.overlap: the loader as of the experience the current step trains on, before the prefetch drew
        the next step's prompts; what a checkpoint stores, so that a resume regenerates those prompts."""
        if overlap and cfg.loss.tis_cap == 0 and ps.is_rank0:
            logger.warning("rollout.overlap=true trains on rollouts one weight version old without importance "
                           "correction; set loss.tis_cap (e.g. 2.0)")
        self._load_initial_state()

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        """Rollouts, old log-probs, one optimizer step per mini-batch, weight sync; returns the step's metrics."""
        cfg, num_mini = self.cfg, self.cfg.optim.num_mini_batches
        m, histograms = StepMetrics(self.ps, num_mini_batches=num_mini), self._token_histograms()
        with m.timed("perf/step_time_s"):
            batch, exp = self._experience_batch()
            version = self.weight_version            # the trainer's weights at train time (staleness)
            with m.timed("perf/train_time_s"), self.colocation.train():
                # None off the last stage; packed as each mini-batch's training step will pack it.
                batch.old_logprobs, batch.old_entropy = self.actor.logprobs(batch, parts=num_mini, record_routing=True)
                self._batch_metrics(m, batch, exp)
                before = self._exact_change_logits(batch) if self._exact_entropy_change else None
                applied = self._updates(m, batch, histograms)
                if cfg.metrics.measure_entropy_change and applied:
                    self._measured_entropy_change(m, batch, before)
            self._wait_for_prefetch(m)
            with m.timed("perf/sync_time_s"), self.colocation.sync():
                if applied:      # a step whose every update was skipped left the weights as the engine has them
                    self.weight_version += 1
                if applied or self.colocation.sync_every_step:   # unless colocated servers dropped theirs
                    self._sync_weights(m)
        self._step_metrics(m, exp, version, histograms)
        return m.reduce()

    def _token_histograms(self) -> TokenHistograms:
        """The step's sample of per-token covariance and entropy for the TensorBoard histograms."""
        cfg = self.cfg
        return TokenHistograms(cfg.metrics.histogram_tokens if cfg.metrics.tensorboard else 0,
                               num_mini_batches=cfg.optim.num_mini_batches, seed=cfg.seed, step=self.step + 1,
                               ps=self.ps, sample_chosen=cfg.loss.name != "ppo")

    def _experience_batch(self) -> tuple[TrainBatch, Experience]:
        """This replica's rows of the step's global experience as training rows, on every rank of its
        model-parallel group. Colocated servers: the trainer's state is on the host meanwhile."""
        with self.colocation.rollout():
            exp, self._prefetched = self._prefetched, None
            with fail_together(f"step {self.step + 1} rollouts"):
                if self.ps.is_generator and exp is None:   # the generating ranks agree: all prefetched, or none
                    exp = self._rollouts(self.step)
            exp = broadcast_experience(exp, self.ps)
            agree_loader_cursor(self.loader)
            if self.prefetch is not None:
                self._loader_state = self.loader.state_dict()      # before the prefetch draws the next prompts
                self._start_prefetch()
        return to_train_batch(exp, self.ps, pad_id=self.tokenizer.pad_token_id), exp

    def _start_prefetch(self) -> None:
        """rollout.overlap: start generating the next step's experience in the background (the generating ranks;
        not after the last step). Its gathers use the rollout group, never a group the training uses."""
        if self.ps.is_generator and self.step + 1 < self.cfg.steps:
            step = self.step + 1
            self.prefetch.start(lambda: self._rollouts(step, group=self.rollout_group), step=step)

    def _rollouts(self, step: int, group=None) -> Experience:
        """Generate and score step ``step``'s global batch (0-based: its sampling seeds) with the other replicas
        (the generating ranks only; gathers over ``group``, None = their data-parallel group), with per-server
        throughput; returns this replica's rows of it."""
        ps = self.ps
        with self.colocation.generating(self.engine):    # colocated servers: the trainer gets their memory after
            before = self.engine.server_stats()
            exp = collect_experience(self.cfg, self.engine, self.tokenizer, self.loader, step=step,
                                     dp_rank=ps.dp_rank, dp_size=ps.dp_size, gather=dp_gather(ps, group))
            exp.replica_stats.update(server_throughput(before, self.engine.server_stats(),
                                                       exp.replica_stats["perf/replica_rollout_time(s)"],
                                                       ps.dp_rank, ps.dp_size))
        return shard_experience(exp, num_mini_batches=self.cfg.optim.num_mini_batches, dp_rank=ps.dp_rank,
                                dp_size=ps.dp_size)

    def _updates(self, m: StepMetrics, batch: TrainBatch, histograms: TokenHistograms) -> int:
        """One optimizer step per mini-batch of ``batch``; returns how many were applied."""
        num_mini = self.cfg.optim.num_mini_batches
        progress = Progress(f"step {self.step + 1} train", num_mini, enabled=self.ps.is_rank0)
        applied, self._chosen = 0, []      # each mini-batch's chosen tokens, for the per-class entropy change
        for index, mini in enumerate(batch.split(num_mini)):
            applied += self._update(m, mini, index, histograms)
            progress.update()
        progress.close()
        return applied

    def _update(self, m: StepMetrics, mini: TrainBatch, index: int, histograms: TokenHistograms) -> bool:
        """The mini-batch's Clip-Cov / KL-Cov tokens (and its token sample for the histograms), then one optimizer
        step on it; returns whether the step was applied (a finite gradient norm)."""
        coefs = annealed_coefficients(self.cfg.loss, self.actor.optimizer_steps)
        # Exact coefficients (the same on every rank), replacing the loss's own coef/* token shares, which carry
        # float noise a constant should not show.
        m.add({f"coef/{name}": value for name, value in coefs.items()}, EXACT, mini_batch=True)
        self.actor.use_recorded_routing(index)      # model.moe_routing_replay: pi_old's experts for this mini-batch
        with m.timed("perf/selection_time_s"):
            selection = self._token_selection(mini, index)
        if selection is not None:
            self._chosen.append(chosen_tokens(self.cfg.loss, selection))
        if selection is not None and histograms.enabled:        # the last pipeline stage
            with m.timed("perf/histogram_time_s"):
                histograms.add(mini, selection)
        result = self.actor.train_step(mini, self._policy_loss_fn(selection),
                                       label=f"step {self.step + 1} mini-batch {index}")
        self.actor.use_recorded_routing(None)
        if self.ps.owns_results:               # losses return shares of the mini-batch value
            m.add(result.metrics, SUM, mini_batch=True)
        if self.entropy_control.enabled and result.applied:   # c_{k+1} from e_k, on every rank alike
            self.entropy_control.update(None if selection is None else selection.mean_entropy, group=self.ps.pp_group)
        norm = result.grad_norm if math.isfinite(result.grad_norm) else 0.0
        m.add({"train/grad_norm": norm}, RANK0, mini_batch=True)
        m.add({"train/skipped_updates": 0.0 if result.applied else 1.0}, RANK0)
        return result.applied

    def _wait_for_prefetch(self, m: StepMetrics) -> None:
        """rollout.overlap: the engine's weights must not change under the next step's generation: wait for it
        before the sync."""
        if self.prefetch is None:
            return
        with m.timed("perf/overlap_wait(s)"), \
                fail_together(f"step {self.step + 2} rollouts (generated while step {self.step + 1} trained)"):
            if self.prefetch.pending:
                self._prefetched = self.prefetch.wait()

    def _token_selection(self, mini: TrainBatch, index: int) -> TokenSelection | None:
        """Clip-Cov / KL-Cov tokens of a mini-batch, from the global covariance (on the last stage; None
        elsewhere). Later mini-batches see updated weights: the paper's covariance uses the current policy."""
        cfg = self.cfg
        current = mini.old_logprobs
        # PPO chooses no token: its cov/* metrics use the old log-probs and cost no forward.
        current, entropy = mini.old_logprobs, mini.old_entropy
        if index > 0 and cfg.loss.selection_logprobs == "current" and (cfg.loss.name != "ppo"
                                                                        or cfg.loss.target_entropy > 0):
            current, entropy = self.actor.logprobs(mini)
        if not self.ps.is_last_stage:
            return None
        return compute_token_selection(cfg.loss, current, mini.old_logprobs, mini.advantages, mini.loss_mask,
                                       token_keys=mini.token_keys, group=self.ps.dp_group,
                                       step=self.actor.optimizer_steps, seed=cfg.seed, entropy=entropy,
                                       adaptive_entropy_coef=self.entropy_control.coef)

    def _policy_loss_fn(self, selection: TokenSelection | None):
        """The mini-batch's loss for Actor.train_step: policy_loss of each micro-batch (a policy.packing.MicroBatch)
        with its part of the mini-batch's ``selection`` (None off the last stage, where no loss runs)."""
        loss_cfg, step = self.cfg.loss, self.actor.optimizer_steps

        def loss_fn(mb, logprobs, entropy):
            return policy_loss(loss_cfg, logprobs, mb.old_logprobs, mb.advantages, mb.loss_mask, entropy=entropy,
                               selection=selection.view(mb.view), step=step, rollout_logprobs=mb.rollout_logprobs,
                               segment_ids=mb.segment_ids)
        return loss_fn

    # ---------------------------------------------------------------- metrics
    def _batch_metrics(self, m: StepMetrics, batch: TrainBatch, exp: Experience) -> None:
        """The step's generation statistics and the token means of its old log-probs (collective)."""
        ps = self.ps
        m.add(exp.stats, RANK0)          # global statistics, the same on every generating rank: counted once
        if ps.is_generator:              # server counters: totals over replicas, or keyed by replica (dp > 1)
            m.add({k: v for k, v in exp.replica_stats.items() if k != "perf/replica_rollout_time(s)"}, SUM)
        tokens = m.token_mean(batch.loss_mask)
        if ps.owns_results:
            m.add({"entropy/mean": tokens.share(batch.old_entropy),
                   "rollout/logprob_gap": tokens.share((batch.rollout_logprobs - batch.old_logprobs).abs()),
                   "perf/tokens": tokens.local_count}, SUM)

    @property
    def _exact_entropy_change(self) -> bool:
        """metrics.exact_entropy_change_max_vocab: the padded vocabulary is small enough for the exact change."""
        limit = self.cfg.metrics.exact_entropy_change_max_vocab
        return self.cfg.metrics.measure_entropy_change and \
            0 < self.cfg.model.padded_vocab_size(self.ps.tp_size) <= limit

    def _exact_change_logits(self, batch: TrainBatch) -> torch.Tensor | None:
        """The full logits of the measured change's rows (None off the last stage; collective)."""
        rows = _subset_rows(batch.num_rows, self.cfg.metrics.entropy_change_samples, self.ps.dp_size,
                            self.actor.micro_batch_size)
        return self.actor.policy.full_logits(batch.rows(slice(0, rows)), min(rows, self.actor.micro_batch_size))

    def _measured_entropy_change(self, m: StepMetrics, batch: TrainBatch, before: torch.Tensor | None) -> None:
        """Entropy change of the step's tokens (or the first metrics.entropy_change_samples of them, shared over
        the replicas) under the updated weights: one extra forward over those rows; with ``before`` (their full
        logits before the step, small vocabularies) also the exact first-order change (a second forward)."""
        rows = _subset_rows(batch.num_rows, self.cfg.metrics.entropy_change_samples, self.ps.dp_size,
                            self.actor.micro_batch_size)
        subset = batch.rows(slice(0, rows))
        new_logprobs, new_entropy = self.actor.logprobs(subset, min(rows, self.actor.micro_batch_size))
        tokens = m.token_mean(subset.loss_mask)
        if self.ps.is_last_stage:           # split by token class (monitor/entropy_classes.py; collective over dp)
            by_class = entropy_change_by_class(self.cfg.loss, subset.loss_mask, subset.old_logprobs, new_logprobs,
                                               subset.old_entropy, new_entropy, subset.advantages,
                                               torch.cat(self._chosen)[:rows], group=self.ps.dp_group)
        if self.ps.owns_results:
            m.add({"entropy/delta_measured": tokens.share(new_entropy - subset.old_entropy), **by_class}, SUM)
        if self._exact_entropy_change:      # the same tokens' full logits after the step (collective)
            after = self._exact_change_logits(batch)
            if self.ps.owns_results:
                first_order = exact_first_order_change(before, after, subset.loss_mask)
                m.add({"entropy/delta_first_order": tokens.share(first_order)}, SUM)
            m.derive("entropy/delta_higher_order",      # the remainder beyond first order, on the same tokens
                     lambda v: v["entropy/delta_measured"] - v["entropy/delta_first_order"])

    def _step_metrics(self, m: StepMetrics, exp: Experience, version: int, histograms: TokenHistograms) -> None:
        """The step's end: its token sample gathered on rank 0 (collective), the staleness of its rollouts, the
        phases' memory, the learning rate and weight version, and the rates of its times."""
        self.step_histograms = {}
        if histograms.enabled:
            with m.timed("perf/histogram_time_s"):
                self.step_histograms = histograms.gather()
        if self.prefetch is not None:   # the trainer's weight version at train time minus each sample's
            total, count, most = staleness_sums(version, [s.weight_version for s in exp.samples]) \
                if self.ps.is_generator else (0.0, 0.0, float("-inf"))    # each replica's generating rank
            m.ratio("rollout/staleness", total, count, floor=1.0)       # the mean over the global batch
            m.add({"rollout/staleness_max": most}, MAX)
        m.add(self.memory.take(), MAX)
        m.add({"train/lr": self.actor.lr, "train/weight_version": float(self.weight_version)}, EXACT)
        m.derive("perf/selection_frac", lambda v: v["perf/selection_time_s"] / max(v["perf/step_time_s"], 1e-9))
        m.derive("perf/tokens_per_s", lambda v: v.get("perf/tokens", 0.0) / max(v["perf/step_time_s"], 1e-9))

    # ---------------------------------------------------------------- weights and state
    def _sync_weights(self, m: StepMetrics) -> None:
        """Push the weights to the engine (colocated servers take the GPU back around it), then verify the sync
        (weights/probe.py) when weight_sync.verify is 'probe'; the sync/* figures go into ``m``."""
        engine = self.engine if self.ps.is_generator else None
        with self.colocation.push(engine) as prepare, m.timed("sync/time(s)"):
            nbytes = self.weight_sync.push(engine, self.weight_version, prepare=prepare)
        m.add({"sync/bytes": float(nbytes)}, LOCAL)
        m.derive("sync/GBps", lambda v: v["sync/bytes"] / max(v["sync/time(s)"], 1e-9) / 1e9)
        m.derive("sync/step_frac", lambda v: v["sync/time(s)"] / max(v.get("perf/step_time_s", 0.0), 1e-9))
        if self.cfg.weight_sync.verify == "probe":
            with m.timed("sync/probe_time(s)"):
                m.add(verify_sync(engine, self.actor.policy, self.ps, self.cfg, version=self.weight_version,
                                  vocab_limit=min(len(self.tokenizer), self.cfg.model.vocab_size)), LOCAL)

    def _weights_source(self) -> str:
        """Where the initial weights come from: 'resume' (this run's checkpoint), 'checkpoint' (checkpoint.load),
        'hf' (model.hf_dir's safetensors) or 'random'. Decides the build (no random init when loading) and
        :meth:`_load_initial_state`."""
        ck = self.cfg.checkpoint
        if ck.resume:
            return "resume"
        if ck.load:
            return "checkpoint"
        return "hf" if self.cfg.model.hf_dir else "random"

    def _load_initial_state(self) -> None:
        ck, actor = self.cfg.checkpoint, self.actor
        # RunDir.open refused a resume without a complete checkpoint; load_latest falls back past broken steps.
        loaded = self.checkpointer.load_latest(actor.chunks, optimizer=actor.optimizer) if ck.resume else None
        if ck.resume and loaded is None:
            raise CheckpointError(f"checkpoint.resume=true but {str(self.checkpointer.root)!r} holds no complete "
                                  "checkpoint of this run; drop --resume to start a new run")
        if loaded is not None:
            latest, state = loaded
            self.step = state["step"]
            actor.optimizer_steps = state["optimizer_steps"]
            actor.skipped_steps = state.get("skipped_steps", 0)
            self.weight_version = state["weight_version"]
            self.loader.load_state_dict(state["loader"])
            actor.scheduler.load_state_dict(state["scheduler"])
            self.law.load_state_dict(state["law"])
            if "entropy_control" in state:
                self.entropy_control.load_state_dict(state["entropy_control"])
            if self.step >= self.cfg.steps:  # else the loop would not run and report no metrics at all
                raise ValueError(f"steps={self.cfg.steps} but run {self.run.run_id} in {str(self.run_dir)!r} is "
                                 f"already at step {self.step} ({latest.name}): nothing to train; continue it "
                                 f"with --set steps=<more than {self.step}>, or start a new run with --set "
                                 "name=<new name>")
            if self.ps.is_rank0:
                logger.info("resumed from %s at step %d", latest, self.step)
        elif ck.load:
            model_dir, _ = resolve_model_dir(ck.load, field="checkpoint.load")
            load_model(actor.chunks, model_dir)
        elif self.cfg.model.hf_dir:
            load_hf_weights(actor.chunks, self.cfg.model, self.cfg.model.hf_dir, self.ps)
        if self._weights_source() != "random":
            check_loaded(actor.chunks, {"resume": "the resumed checkpoint", "checkpoint": "checkpoint.load",
                                        "hf": "model.hf_dir"}[self._weights_source()])
        if loaded is None and (ck.load or self.cfg.model.hf_dir):
            # bf16 training keeps fp32 main copies inside the optimizer (distributed or not), built from the
            # random init: refresh them, or the first step would write the random weights back.
            actor.optimizer.reload_model_params()
        self._sync_weights(StepMetrics(self.ps))        # the initial sync's figures are not logged

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer_steps": self.actor.optimizer_steps,
            "skipped_steps": self.actor.skipped_steps,
            "weight_version": self.weight_version,
            "loader": self.loader.state_dict() if self._loader_state is None else self._loader_state,
            "scheduler": self.actor.scheduler.state_dict(),
            "law": self.law.state_dict(),
            "entropy_control": self.entropy_control.state_dict(),
        }

    # ---------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        """Run the steps left; returns the last step's metrics. Before every step the ranks agree on stop
        requests (``stop.agree_stop``: a signal, see run/stop.py): on one, the loop checkpoints the
        last completed step (whatever ``checkpoint.save_interval`` says; nothing when it is already saved or no
        step ran) and returns early with ``self.stop_signal`` set to the signal number (0 otherwise)."""
        cfg = self.cfg
        last: dict[str, float] = {}
        self.stop_signal = 0
        saved_step = self.step                      # the loaded checkpoint, or the initial weights
        self._write_run_info()
        drawn_step = -1
        while self.step < cfg.steps:
            self.stop_signal = agree_stop(self.ps)
            if self.stop_signal:
                if self.step != saved_step:
                    self._save()
                logger.info("stopped by signal %d after step %d of %d", self.stop_signal, self.step, cfg.steps)
                break
            if self.step == 0 and self.evaluator is not None:     # the starting weights, as step 0
                self.metrics.log(0, self._evaluate({}))
            last = self.train_step()
            self.step += 1
            if self.evaluator is not None and self.evaluator.due(self.step):
                last = self._evaluate(last)
            else:
                last.update(self._law_update(last))
            self.metrics.log(self.step, last)
            self.metrics.histograms(self.step, self.step_histograms)
            if cfg.metrics.law_image_interval and (self.step % cfg.metrics.law_image_interval == 0
                                                   or self.step == cfg.steps):
                drawn_step = self._draw_law()
            if (cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0) \
                    or self.step == cfg.steps:
                self._save()
                saved_step = self.step
        if cfg.metrics.law_image_interval and drawn_step != self.step:    # stopped early: the law as it ended
            self._draw_law()
        self.metrics.close()
        return last

    def _save(self) -> None:
        """Checkpoint the current step (colocated servers give back their KV cache meanwhile)."""
        with self.colocation.checkpoint(self.engine if self.ps.is_generator else None):
            self.checkpointer.save(self.step, self.actor.chunks, optimizer=self.actor.optimizer,
                                   trainer_state=self._trainer_state())

    def _write_run_info(self) -> None:
        """The dashboard layout, the resolved config and the code revision, at the step the run (re)starts."""
        if self.metrics.writes:
            self.metrics.layout(entropy_control_layout())
            self.metrics.text(self.step, "run/config", config_markdown(self.cfg))
            self.metrics.text(self.step, "run/source", source_markdown(self.ps.world_size))

    def _draw_law(self) -> int:
        """The law's points so far with its fit and ceiling as the image law/fit at this step (rank 0)."""
        if self.metrics.writes and self.law.points:
            h, r = zip(*self.law.points)
            self.metrics.image(self.step, "law/fit", law_snapshot(
                h, r, self.law.point_steps, min_points=self.law.min_points, step=self.step,
                source="eval" if self.law_on_eval else "train"))
        return self.step

    def _evaluate(self, metrics: dict[str, float]) -> dict[str, float]:
        """Held-out evaluation of the weights the engine holds (after this step's sync), merged into the step's
        metrics with the law update."""
        metrics = {**metrics, **self.evaluator.run(self.engine, self.actor)}
        metrics.update(self._law_update(metrics))
        return metrics

    def _law_update(self, m: dict[str, float]) -> dict[str, float]:
        """One step of the online entropy law: (H, R) = (eval/entropy, eval/accuracy) on evaluation steps when
        the law fits held-out accuracy (both measured on the same weights and prompts), else (entropy/mean,
        reward/mean_all) of the step's rollouts; plus the measured-vs-predicted entropy change."""
        if self.law_on_eval:
            h, r = m.get("eval/entropy"), m.get("eval/accuracy")
        else:
            h, r = m.get("entropy/mean"), m.get("reward/mean_all")
        out = self.law.update(h, r, m.get("entropy/delta_measured"), m.get("cov/mean"), step=self.step)
        if "entropy/delta_predicted" in out and "entropy/delta_first_order" in m:   # the estimate's own error
            out["entropy/delta_predicted_error"] = out["entropy/delta_predicted"] - m["entropy/delta_first_order"]
        return {**out, **predicted_by_class(m, out.get("entropy/delta_slope"))}

    def close(self) -> None:
        """Stop the rollout engine (and a background rollout still running: a step that raised while it
        generated) and release the run directory (when this Trainer opened it)."""
        try:
            if self.engine is not None:
                self.engine.close()            # first: a generation in flight ends with its engine
            if getattr(self, "prefetch", None) is not None:
                self.prefetch.close(timeout=30.0)
        finally:
            if self._owns_run:
                self.run.close()


def _subset_rows(num_rows: int, samples: int, dp_size: int, micro_batch_size: int) -> int:
    """Rows of each replica that a metric measured on ``samples`` of the step's samples (0 = all) uses: the
    replica's share, rounded up to whole micro-batches."""
    if not samples:
        return num_rows
    share = -(-samples // dp_size)
    if share >= micro_batch_size:
        share = -(-share // micro_batch_size) * micro_batch_size
    return min(num_rows, share)

