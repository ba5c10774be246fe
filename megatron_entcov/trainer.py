"""The RL loop (GRPO-style RLVR with Clip-Cov / KL-Cov entropy control) on a Megatron-Core policy.

One step, as the paper's released recipe (arXiv 2505.22617; reference section 6):
  1. experience: a batch of prompts, n responses each from the rollout engine, verifier rewards, group
     advantages, optional dynamic sampling (experience.py);
  2. old log-probs and entropy of the sampled tokens under the current weights (forward only);
  3. for each optimizer mini-batch: token selection from the global covariance (losses/policy.py), the
     policy loss over micro-batches through the pipeline schedule, one optimizer step (skipped, and
     reported, when the gradient norm is not finite; policy/actor.py);
  4. weight sync to the rollout engine, metrics (scalars; token histograms; the law image every
     metrics.law_image_interval steps), the online entropy-law fit, a checkpoint.
With rollout.overlap, the next step's experience (1) is generated in a background thread while this step's
optimizer steps (2-3) run, with the weights from before their update; the sync (4) waits for it (overlap.py).
No loss math lives here: it is in losses/ and ops/. Model, optimizer and train step are the Actor's.

Example:
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    Trainer(cfg, ps).train()
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from megatron_entcov.distributed import collectives
from megatron_entcov.run.checkpoint import CheckpointError, Checkpointer, load_model, resolve_model_dir
from megatron_entcov.config import RunConfig, dump_config
from megatron_entcov.monitor.dashboard import config_markdown, entropy_control_layout, source_markdown
from megatron_entcov.tasks.prompts import PromptDataset, PromptLoader
from megatron_entcov.entropy_law import OnlineEntropyLaw
from megatron_entcov.evaluation import Evaluator
from megatron_entcov.experience import (Experience, agree_loader_cursor, broadcast_experience, collect_experience,
                                        dp_gather, shard_experience, to_train_batch)
from megatron_entcov.monitor.law_report import law_snapshot
from megatron_entcov.losses.policy import TokenSelection, compute_token_selection, policy_loss, warn_if_kl_cov_inert
from megatron_entcov.losses.schedules import annealed_coefficients
from megatron_entcov.monitor.metrics import MetricsLogger, Progress, reduce_sum_metrics
from megatron_entcov.rollout.prefetch import RolloutPrefetch, staleness_sums
from megatron_entcov.distributed.parallel import ParallelState, build_rollout_group, fail_together
from megatron_entcov.policy.actor import Actor, StepResult
from megatron_entcov.policy.batch import TrainBatch
from megatron_entcov.rollout import build_engine
from megatron_entcov.monitor.server_metrics import server_throughput
from megatron_entcov.run.run_dir import RunDir
from megatron_entcov.run.stop import agree_stop
from megatron_entcov.monitor.histograms import TokenHistograms
from megatron_entcov.tasks.tokenizer import load_tokenizer
from megatron_entcov.weights.probe import verify_sync
from megatron_entcov.weights.sync import WeightSync
from megatron_entcov.monitor.memory import PhaseMemory
from megatron_entcov.policy.model import check_loaded
from megatron_entcov.policy.offload import TrainerOffload
from megatron_entcov.weights.shards import load_hf_weights

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
        self.actor = Actor(cfg, ps, temperature=cfg.sampling.temperature, load_weights=self._weights_source() != "random")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", ps, keep_last=cfg.checkpoint.keep_last,
                                         run_id=self.run.run_id)
        dataset = PromptDataset.from_config(cfg.data, self.tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                            seed=cfg.seed)
        self.loader = PromptLoader(dataset, batch_size=cfg.rollout.prompts_per_step, dp_rank=ps.dp_rank,
                                   dp_size=ps.dp_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.engine = engine
        with fail_together("starting the rollout engine"):
            if ps.is_generator and self.engine is None:
                self.engine = build_engine(cfg, dp_rank=ps.dp_rank, dp_size=ps.dp_size, device=ps.device)
        self.weight_sync = WeightSync(self.actor.chunks, cfg.model, ps,
                                      bucket_bytes=int(cfg.weight_sync.bucket_mb * 2**20))
        self.metrics = MetricsLogger(self.run_dir, ps, enabled=cfg.metrics.tensorboard,
                                     log_interval=cfg.metrics.log_interval)
        self.evaluator = Evaluator(cfg, ps, self.tokenizer, dataset) if cfg.eval.interval else None
        self.law = OnlineEntropyLaw(min_points=cfg.metrics.law_fit_min_points)
        self.law_on_eval = cfg.metrics.law_reward == "eval" or (cfg.metrics.law_reward == "auto"
                                                                and self.evaluator is not None)
        self.step_histograms: dict = {}
        """The last step's sampled token values (rank 0; token_histograms.py), written beside its scalars."""
        self.offload = TrainerOffload(self.actor.chunks, self.actor.optimizer,
                                      enabled=cfg.rollout.sglang.release_memory)
        """Colocated servers: the trainer's state goes to the host while they hold the GPU (policy/offload.py)."""
        self.memory = PhaseMemory(ps)
        self.step = 0
        self.weight_version = 0
        overlap = cfg.rollout.overlap
        # Collective on every rank (new_group), in the same place of the build on all of them.
        self.rollout_group = build_rollout_group(ps) if overlap else None
        self.prefetch = RolloutPrefetch() if overlap else None
        """rollout.overlap: the background rollout of the next step (generating ranks; overlap.py)."""
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
        cfg, ps = self.cfg, self.ps
        clock = {"start": time.monotonic()}
        batch, exp = self._experience_batch()
        version = self.weight_version            # the trainer's weights at train time (staleness)
        clock["train"] = time.monotonic()
        self.memory.begin("train")
        # None off the last stage; packed as each mini-batch's training step will pack it.
        batch.old_logprobs, batch.old_entropy = self.actor.logprobs(batch, parts=cfg.optim.num_mini_batches)
        tokens = _TokenMean(batch.loss_mask, self.ps)
        local = self._batch_metrics(batch, exp, tokens)
        num_mini = cfg.optim.num_mini_batches
        progress = Progress(f"step {self.step + 1} train", num_mini, enabled=ps.is_rank0)
        applied = 0
        selection_time = histogram_time = 0.0
        coefs: dict[str, float] = {}
        histograms = TokenHistograms(cfg.metrics.histogram_tokens if cfg.metrics.tensorboard else 0,
                                     num_mini_batches=num_mini, seed=cfg.seed,
                                     step=self.step + 1, ps=ps, sample_chosen=cfg.loss.name != "ppo")
        for index, mini in enumerate(batch.split(num_mini)):
            for name, value in annealed_coefficients(cfg.loss, self.actor.optimizer_steps).items():
                coefs[f"coef/{name}"] = coefs.get(f"coef/{name}", 0.0) + value / num_mini
            t0 = time.monotonic()
            selection = self._token_selection(mini, index)
            t1 = time.monotonic()
            selection_time += t1 - t0
            if selection is not None:                     # the last pipeline stage
                histograms.add(mini, selection)
                histogram_time += time.monotonic() - t1
            result = self.actor.train_step(mini, self._policy_loss_fn(selection),
                                           label=f"step {self.step + 1} mini-batch {index}")
            applied += result.applied
            self._add_update_metrics(local, result, num_mini)
            progress.update()
        progress.close()
        if cfg.metrics.measure_entropy_change and applied:
            local.update(self._measured_entropy_change(batch))
        self.memory.end("train")
        clock["wait"] = time.monotonic()
        if self.prefetch is not None:
            # The engine's weights must not change under the next step's generation: wait, then sync.
            with fail_together(f"step {self.step + 2} rollouts (generated while step {self.step + 1} trained)"):
                if self.prefetch.pending:
                    self._prefetched = self.prefetch.wait()
        clock["sync"] = time.monotonic()
        self.memory.begin("sync")
        sync_stats: dict[str, float] = {}
        if applied:          # a step whose every update was skipped left the weights as the engine has them
            self.weight_version += 1
            sync_stats = self._sync_weights()
        elif cfg.rollout.sglang.release_memory:
            sync_stats = self._sync_weights()     # unless colocated servers dropped theirs after generating
        self.memory.end("sync")
        clock["end"] = time.monotonic()
        t0 = time.monotonic()
        self.step_histograms = histograms.gather()
        histogram_time += time.monotonic() - t0
        totals = reduce_sum_metrics(local, ps)
        if self.prefetch is not None:
            totals.update(self._staleness_metrics(exp, version))
            totals["perf/overlap_wait(s)"] = clock["sync"] - clock["wait"]
        # Exact coefficients (the mean of the mini-batches' annealed values, the same on every rank); the loss's
        # own coef/* are sums of per-token shares, which carry float noise a constant should not show.
        totals.update(coefs)
        totals.update(sync_stats)
        totals.update(self.memory.collect())
        totals.update(self._step_metrics(clock, totals.get("perf/tokens", 0.0), selection_time))
        if histograms.enabled:
            totals["perf/histogram_time(s)"] = histogram_time
        return totals

    def _experience_batch(self) -> tuple[TrainBatch, Experience]:
        """This replica's rows of the step's global experience as training rows, on every rank of its
        model-parallel group. Colocated servers: the trainer's state is on the host meanwhile."""
        self.memory.begin("rollout")
        self._make_room(weights=True)
        exp, self._prefetched = self._prefetched, None
        with fail_together(f"step {self.step + 1} rollouts"):
            if self.ps.is_generator and exp is None:   # the generating ranks agree: all prefetched, or none
                exp = self._rollouts(self.step)
        exp = broadcast_experience(exp, self.ps)
        agree_loader_cursor(self.loader)
        if self.prefetch is not None:
            self._loader_state = self.loader.state_dict()      # before the prefetch draws the next prompts
            self._start_prefetch()
        self.memory.end("rollout", offloaded_bytes=self.offload.host_bytes if self.offload.enabled else None)
        self.offload.reload()                  # the servers released their memory at the end of _rollouts
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
        before = self.engine.server_stats()
        exp = collect_experience(self.cfg, self.engine, self.tokenizer, self.loader, step=step,
                                 dp_rank=ps.dp_rank, dp_size=ps.dp_size, gather=dp_gather(ps, group))
        exp.replica_stats.update(server_throughput(before, self.engine.server_stats(),
                                                   exp.replica_stats["perf/replica_rollout_time(s)"],
                                                   ps.dp_rank, ps.dp_size))
        if self.cfg.rollout.sglang.release_memory:    # colocated GPU servers: the trainer gets their memory
            self.engine.release_memory()
        return shard_experience(exp, num_mini_batches=self.cfg.optim.num_mini_batches, dp_rank=ps.dp_rank,
                                dp_size=ps.dp_size)

    def _token_selection(self, mini: TrainBatch, index: int) -> TokenSelection | None:
        """Clip-Cov / KL-Cov tokens of a mini-batch, from the global covariance (on the last stage; None
        elsewhere). Later mini-batches see updated weights: the paper's covariance uses the current policy."""
        cfg = self.cfg
        current = mini.old_logprobs
        # PPO chooses no token: its cov/* metrics use the old log-probs and cost no forward.
        if index > 0 and cfg.loss.selection_logprobs == "current" and cfg.loss.name != "ppo":
            current, _ = self.actor.logprobs(mini)
        if not self.ps.is_last_stage:
            return None
        return compute_token_selection(cfg.loss, current, mini.old_logprobs, mini.advantages, mini.loss_mask,
                                       token_keys=mini.token_keys, group=self.ps.dp_group,
                                       step=self.actor.optimizer_steps, seed=cfg.seed)

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
    def _batch_metrics(self, batch: TrainBatch, exp: Experience, tokens: "_TokenMean") -> dict[str, float]:
        """This rank's shares of the step's generation and token statistics (summed over ranks later)."""
        ps = self.ps
        local: dict[str, float] = {}
        if ps.is_rank0:                  # global statistics, the same on every generating rank: counted once
            local.update(exp.stats)
        if ps.is_generator:              # server counters: totals over replicas, or keyed by replica (dp > 1)
            local.update({k: v for k, v in exp.replica_stats.items() if k != "perf/replica_rollout_time(s)"})
        if ps.owns_results:
            local["entropy/mean"] = tokens.share(batch.old_entropy)
            local["rollout/logprob_gap"] = tokens.share((batch.rollout_logprobs - batch.old_logprobs).abs())
            local["perf/tokens"] = tokens.local_count
        return local

    def _staleness_metrics(self, exp: Experience, version: int) -> dict[str, float]:
        """rollout/staleness (mean over the step's global batch) and rollout/staleness_max: the trainer's weight
        version at train time minus each sample's (collective; each replica's generating rank counts its rows)."""
        total, count, most = staleness_sums(version, [s.weight_version for s in exp.samples]) \
            if self.ps.is_generator else (0.0, 0.0, float("-inf"))
        total, count = collectives.reduce_values([total, count]).tolist()
        most = float(collectives.reduce_values([most], op="max"))
        return {"rollout/staleness": total / max(count, 1.0), "rollout/staleness_max": most}

    def _add_update_metrics(self, local: dict[str, float], result: StepResult, num_mini: int) -> None:
        """Losses return shares of the mini-batch value: average the mini-batches."""
        if self.ps.owns_results:
            for k, v in result.metrics.items():
                local[k] = local.get(k, 0.0) + v / num_mini
        if self.ps.is_rank0:
            norm = result.grad_norm if math.isfinite(result.grad_norm) else 0.0
            local["train/grad_norm"] = local.get("train/grad_norm", 0.0) + norm / num_mini
            local["train/skipped_updates"] = local.get("train/skipped_updates", 0.0) + (0.0 if result.applied else 1.0)

    def _measured_entropy_change(self, batch: TrainBatch) -> dict[str, float]:
        """Entropy change of the step's tokens (or the first metrics.entropy_change_samples of them, shared over
        the replicas) under the updated weights: one extra forward over those rows."""
        rows = _subset_rows(batch.num_rows, self.cfg.metrics.entropy_change_samples, self.ps.dp_size,
                            self.actor.micro_batch_size)
        subset = batch.rows(slice(0, rows))
        _, new_entropy = self.actor.logprobs(subset, min(rows, self.actor.micro_batch_size))
        tokens = _TokenMean(subset.loss_mask, self.ps)
        if not self.ps.owns_results:
            return {}
        return {"entropy/delta_measured": tokens.share(new_entropy - subset.old_entropy)}

    def _step_metrics(self, clock: dict[str, float], tokens: float, selection_time: float) -> dict[str, float]:
        step_time = clock["end"] - clock["start"]
        return {"train/lr": self.actor.lr,
                "perf/selection_time(s)": selection_time,
                "perf/selection_frac": selection_time / max(step_time, 1e-9),
                "perf/train_time(s)": clock["wait"] - clock["train"],
                "perf/sync_time(s)": clock["end"] - clock["sync"],
                "perf/step_time(s)": step_time,
                "perf/tokens_per_s": tokens / max(step_time, 1e-9),
                "train/weight_version": float(self.weight_version)}

    # ---------------------------------------------------------------- weights and state
    def _sync_weights(self) -> dict[str, float]:
        """Push the weights to the engine (colocated servers get their weight memory back first and their
        KV cache after), then verify the sync (weights/probe.py) when weight_sync.verify is 'probe'."""
        engine = self.engine if self.ps.is_generator else None
        release = self.cfg.rollout.sglang.release_memory
        self._make_room(weights=False)        # colocated: gradients and optimizer state leave before servers resume
        t0 = time.monotonic()
        nbytes = self.weight_sync.push(engine, self.weight_version,
                                       prepare=(lambda: engine.resume_memory(["weights"])) if release else None)
        dt = time.monotonic() - t0
        if release:                                   # same on every rank: no collective when off
            self._make_room(weights=False)            # the sync's buffers too, on every rank, before the KV cache
            with fail_together("resuming the servers' memory"):
                if engine is not None:
                    engine.resume_memory()
        stats = {"sync/time(s)": dt, "sync/bytes": float(nbytes), "sync/GBps": nbytes / max(dt, 1e-9) / 1e9}
        if self.cfg.weight_sync.verify == "probe":
            t1 = time.monotonic()
            stats.update(verify_sync(engine, self.actor.policy, self.ps, self.cfg, version=self.weight_version,
                                     vocab_limit=min(len(self.tokenizer), self.cfg.model.vocab_size)))
            stats["sync/probe_time(s)"] = time.monotonic() - t1
        return stats

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
        self._sync_weights()

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer_steps": self.actor.optimizer_steps,
            "skipped_steps": self.actor.skipped_steps,
            "weight_version": self.weight_version,
            "loader": self.loader.state_dict() if self._loader_state is None else self._loader_state,
            "scheduler": self.actor.scheduler.state_dict(),
            "law": self.law.state_dict(),
        }

    # ---------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        """Run the steps left; returns the last step's metrics. Before every step the ranks agree on stop
        requests (``stop.agree_stop``: a signal, see stop.py): on one, the loop checkpoints the
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
        """Checkpoint the current step. Colocated servers keep their (synced) weights but give back their KV
        cache and CUDA graphs while the optimizer state is on the device for the save."""
        colocated = self.offload.enabled
        engine = self.engine if self.ps.is_generator else None
        if colocated:
            with fail_together("releasing the servers' KV cache for a checkpoint"):
                if engine is not None:
                    engine.release_memory(["kv_cache", "cuda_graph"])
        try:
            self.offload.reload(parts=("optimizer", "weights"))      # the gradient buffers stay freed
            self.checkpointer.save(self.step, self.actor.chunks, optimizer=self.actor.optimizer,
                                   trainer_state=self._trainer_state())
        finally:
            if colocated:
                self._make_room(weights=False)
                with fail_together("resuming the servers' KV cache after a checkpoint"):
                    if engine is not None:
                        engine.resume_memory()

    def _make_room(self, *, weights: bool) -> None:
        """Colocated servers: offload the trainer's state (policy/offload.py), hand the cached blocks back to the
        driver, and wait for every rank to have done so before any server takes memory back (collective when
        offloading is on; nothing otherwise)."""
        if not self.offload.enabled:
            return
        self.offload.offload(weights=weights)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        collectives.barrier()

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
        return self.law.update(h, r, m.get("entropy/delta_measured"), m.get("cov/mean"), step=self.step)

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


class _TokenMean:
    """A token mean over the step's valid response tokens, as this rank's share: the sum over its own tokens
    divided by the count over the data-parallel group (collective at construction), so shares add up over
    the replicas to the global mean."""

    def __init__(self, loss_mask: torch.Tensor, ps: ParallelState):
        self.mask = loss_mask.float()
        self.local_count = float(self.mask.sum())
        self.global_count = float(collectives.reduce_values([self.local_count], group=ps.dp_group))

    def share(self, values: torch.Tensor) -> float:
        return float((values * self.mask).sum()) / max(self.global_count, 1.0)
