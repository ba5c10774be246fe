"""The RL loop (GRPO-style RLVR with Clip-Cov / KL-Cov entropy control) on a Megatron-Core policy.

One step, as the paper's released recipe (arXiv 2505.22617; reference section 6):
  1. experience: a batch of prompts, n responses each from the rollout engine, verifier rewards, group
     advantages, optional dynamic sampling (experience.py);
  2. old log-probs and entropy of the sampled tokens under the current weights (forward only);
  3. for each optimizer mini-batch: token selection from the global covariance (losses/policy.py), the
     policy loss over micro-batches through the pipeline schedule, one optimizer step (skipped, and
     reported, when the gradient norm is not finite);
  4. weight sync to the rollout engine, metrics, the online entropy-law fit, a checkpoint.
No loss math lives here: it is in losses/ and ops/.

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
import torch.distributed as dist

from megatron_entcov.policy.batch import TrainBatch, pack_samples
from megatron_entcov.checkpoint import Checkpointer, load_model, resolve_model_dir
from megatron_entcov.config import RunConfig, dump_config
from megatron_entcov.data import PromptDataset, PromptLoader
from megatron_entcov.entropy_law import OnlineEntropyLaw
from megatron_entcov.experience import (broadcast_experience, collect_experience, server_counters,
                                        server_throughput, summed_over_replicas)
from megatron_entcov.losses.policy import compute_token_selection, policy_loss, warn_if_kl_cov_inert
from megatron_entcov.metrics import MetricsLogger, Progress, reduce_sum_metrics
from megatron_entcov.policy.model import build_model
from megatron_entcov.policy.optimizer import build_optimizer, optimizer_step, wrap_ddp, zero_grads
from megatron_entcov.parallel import ParallelState, raise_together
from megatron_entcov.policy.pipeline import run_microbatches
from megatron_entcov.policy.forward import PolicyForward
from megatron_entcov.weights.probe import verify_sync
from megatron_entcov.tokenizer import load_tokenizer
from megatron_entcov.weights.sync import WeightSync

logger = logging.getLogger(__name__)

__all__ = ["Trainer"]


def _masked_share(values: torch.Tensor, mask: torch.Tensor, global_count: float) -> float:
    return float((values * mask).sum()) / max(global_count, 1.0)


class Trainer:
    """Builds every component from a RunConfig and runs the RL loop. All methods are collective."""

    def __init__(self, cfg: RunConfig, ps: ParallelState, *, engine=None):
        self.cfg, self.ps = cfg, ps
        self.run_dir = Path(cfg.run_dir)
        if ps.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "resolved_config.yaml")
        warn_if_kl_cov_inert(cfg.loss, cfg.optim.num_mini_batches)
        self.tokenizer = load_tokenizer(cfg.model.hf_dir)
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer "
                             f"({len(self.tokenizer)} tokens); set model.vocab_size >= {len(self.tokenizer)}")
        self.chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, ps), cfg)
        self.optimizer, self.scheduler = build_optimizer(self.chunks, cfg)
        self.policy = PolicyForward(self.chunks, cfg.model, ps, temperature=cfg.sampling.temperature,
                                    use_compile=cfg.loss.compile_logprob_kernels)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", ps, keep_last=cfg.checkpoint.keep_last)
        dataset = PromptDataset.from_config(cfg.data, self.tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                            seed=cfg.seed)
        self.loader = PromptLoader(dataset, batch_size=cfg.rollout.prompts_per_step, dp_rank=ps.dp_rank,
                                   dp_size=ps.dp_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
        # One generating rank per data-parallel replica: tp_rank 0 of the first stage.
        self.is_generator = ps.tp_rank == 0 and ps.pp_rank == 0
        self.engine = engine
        error = None
        if self.is_generator and self.engine is None:
            try:
                self.engine = _build_engine(cfg, ps)
            except Exception as err:                  # noqa: BLE001 - raised on every rank just below
                error = err
        raise_together(error, "starting the rollout engine")
        self.weight_sync = WeightSync(self.chunks, cfg.model, ps, bucket_bytes=int(cfg.rollout.sync_bucket_mb * 2**20))
        self.metrics = MetricsLogger(self.run_dir, ps, enabled=cfg.metrics.tensorboard,
                                     log_interval=cfg.metrics.log_interval)
        self.law = OnlineEntropyLaw(min_points=cfg.metrics.law_fit_min_points)
        self.step = 0
        self.optimizer_steps = 0
        self.skipped_steps = 0
        self.weight_version = 0
        self._load_initial_state()

    # ---------------------------------------------------------------- state
    def _load_initial_state(self) -> None:
        ck = self.cfg.checkpoint
        latest = self.checkpointer.find_latest() if ck.resume else None
        if latest is not None:
            state = self.checkpointer.load(latest, self.chunks, optimizer=self.optimizer)
            self.step = state["step"]
            self.optimizer_steps = state["optimizer_steps"]
            self.skipped_steps = state.get("skipped_steps", 0)
            self.weight_version = state["weight_version"]
            self.loader.load_state_dict(state["loader"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.law.load_state_dict(state["law"])
            if self.ps.is_rank0:
                logger.info("resumed from %s at step %d", latest, self.step)
        elif ck.load:
            model_dir, _ = resolve_model_dir(ck.load, field="checkpoint.load")
            load_model(self.chunks, model_dir)
        elif self.cfg.model.hf_dir:
            from megatron_entcov.weights.shards import load_hf_weights

            load_hf_weights(self.chunks, self.cfg.model, self.cfg.model.hf_dir, self.ps)
        self._sync_weights()

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "weight_version": self.weight_version,
            "loader": self.loader.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "law": self.law.state_dict(),
        }

    def _sync_weights(self) -> dict[str, float]:
        """Push the weights to the engine (colocated servers get their weight memory back first and their
        KV cache after), then verify the sync (sync_probe.py) when rollout.sync_verify is 'probe'."""
        engine = self.engine if self.is_generator else None
        release = self.cfg.rollout.release_memory and engine is not None
        t0 = time.monotonic()
        error = _attempt(engine.resume_memory, ["weights"]) if release else None
        nbytes = self.weight_sync.push(engine, self.weight_version, error=error)   # raises on every rank
        dt = time.monotonic() - t0
        if self.cfg.rollout.release_memory:           # same on every rank: no collective when off
            raise_together(_attempt(engine.resume_memory) if release else None, "resuming the servers' memory")
        stats = {"sync/time(s)": dt, "sync/bytes": float(nbytes), "sync/GBps": nbytes / max(dt, 1e-9) / 1e9}
        if self.cfg.rollout.sync_verify == "probe":
            t1 = time.monotonic()
            stats.update(verify_sync(engine, self.policy, self.ps, self.cfg, version=self.weight_version,
                                     vocab_limit=min(len(self.tokenizer), self.cfg.model.vocab_size)))
            stats["sync/probe_time(s)"] = time.monotonic() - t1
        return stats

    def _sync_loader_cursor(self) -> None:
        """Replicas may consume different numbers of prompt batches (dynamic sampling refills): move every
        loader to the furthest cursor so the checkpointed cursor is valid for all of them."""
        cursor = torch.tensor([self.loader.cursor], dtype=torch.long)
        if dist.is_initialized():
            dist.all_reduce(cursor, op=dist.ReduceOp.MAX)
        self.loader.cursor = int(cursor)

    # ---------------------------------------------------------------- one step
    def _experience_batch(self) -> tuple[TrainBatch, dict]:
        cfg, ps = self.cfg, self.ps
        exp, error = None, None
        if self.is_generator:
            try:
                before = server_counters(self.engine)
                exp = collect_experience(cfg, self.engine, self.tokenizer, self.loader, step=self.step,
                                         dp_rank=ps.dp_rank)
                exp.stats.update(server_throughput(before, server_counters(self.engine),
                                                   exp.stats["perf/rollout_time(s)"], ps.dp_rank, ps.dp_size))
                if cfg.rollout.release_memory:        # colocated GPU servers: the trainer gets their memory
                    self.engine.release_memory()
            except Exception as err:                  # noqa: BLE001 - raised on every rank just below
                error = err
        raise_together(error, f"step {self.step + 1} rollouts")
        exp = broadcast_experience(exp, ps)
        self._sync_loader_cursor()
        n_local = len(exp.samples)
        longest = torch.tensor([max(len(s.prompt_ids) + len(s.response_ids) for s in exp.samples)])
        if dist.is_initialized():
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        ids = [ps.dp_rank * n_local + i for i in range(n_local)]
        batch = pack_samples(exp.samples, exp.advantages, pad_id=self.tokenizer.pad_token_id, sample_ids=ids,
                             key_stride=int(longest) + ps.tp_size, multiple_of=ps.tp_size)
        return batch, exp.stats

    def _train_mini_batch(self, mini: TrainBatch, index: int, local: dict[str, float]) -> None:
        cfg, ps = self.cfg, self.ps
        mbs = cfg.optim.micro_batch_size
        selection = None
        if ps.is_last_stage:
            current = mini.old_logprobs
        # Later mini-batches see updated weights: the paper's covariance uses the current policy.
        if index > 0 and cfg.loss.selection_logprobs == "current":
            current, _ = self.policy.forward(mini, mbs)
        if ps.is_last_stage:
            selection = compute_token_selection(cfg.loss, current, mini.old_logprobs, mini.advantages,
                                                mini.loss_mask, token_keys=mini.token_keys, group=ps.dp_group,
                                                step=self.optimizer_steps, seed=cfg.seed)
        sums: dict[str, torch.Tensor] = {}

        def loss_fn(mb, logits):
            lp, ent = self.policy.token_stats(logits, mb["labels"])
            loss, metrics = policy_loss(cfg.loss, lp, mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
                                        entropy=ent, step=self.optimizer_steps,
                                        selection=selection.rows(mb["rows"]))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            return loss, {}

        parts = mini.num_rows // mbs
        micro = []
        for i, m in enumerate(mini.split(parts)):
            d = m.as_model_input()
            d["rows"] = slice(i * mbs, (i + 1) * mbs)
            micro.append(d)
        zero_grads(self.chunks, self.optimizer)
        run_microbatches(self.chunks, micro, loss_fn, ps=ps, forward_only=False)
        applied, grad_norm = optimizer_step(self.optimizer)
        if applied:
            self.scheduler.step(1)
            self.optimizer_steps += 1
        else:
            self.skipped_steps += 1
            logger.warning("step %d mini-batch %d: gradient norm %s is not finite; update skipped", self.step,
                           index, grad_norm)
            zero_grads(self.chunks, self.optimizer)
        nm = cfg.optim.num_mini_batches
        # Losses return shares of the mini-batch value; average the mini-batches.
        contribute = ps.is_last_stage and ps.tp_rank == 0
        for k, v in sums.items():
            if contribute:
                local[k] = local.get(k, 0.0) + float(v) / nm
        if ps.is_rank0:
            local["train/grad_norm"] = local.get("train/grad_norm", 0.0) + (grad_norm if math.isfinite(grad_norm)
                                                                          else 0.0) / nm
            local["train/skipped_updates"] = local.get("train/skipped_updates", 0.0) + (0.0 if applied else 1.0)

    def train_step(self) -> dict[str, float]:
        cfg, ps = self.cfg, self.ps
        t_step = time.monotonic()
        batch, exp_stats = self._experience_batch()
        t_train = time.monotonic()
        old_lp, old_ent = self.policy.forward(batch, cfg.optim.micro_batch_size)
        if ps.is_last_stage:
            batch.old_logprobs, batch.old_entropy = old_lp, old_ent
        local: dict[str, float] = {}
        # Generation statistics: one share per replica (replicas have equal batch sizes, so shares average).
        if self.is_generator:
            for k, v in exp_stats.items():
                local[k] = v if summed_over_replicas(k) else v / ps.dp_size
        token_owner = ps.is_last_stage and ps.tp_rank == 0
        mask = batch.loss_mask.float()
        counts = torch.tensor([mask.sum()])
        if dist.is_initialized():
            dist.all_reduce(counts, group=ps.dp_group)
        n_tok = float(counts)
        if token_owner:
            local["entropy/mean"] = _masked_share(old_ent, mask, n_tok)
            local["rollout/logprob_gap"] = _masked_share((batch.rollout_logprobs - old_lp).abs(), mask, n_tok)
            local["perf/tokens"] = float(mask.sum())
        progress = Progress(f"step {self.step + 1} train", cfg.optim.num_mini_batches, enabled=ps.is_rank0)
        for index, mini in enumerate(batch.split(cfg.optim.num_mini_batches)):
            self._train_mini_batch(mini, index, local)
            progress.update()
        progress.close()
        if cfg.metrics.measure_entropy_change:
            _, new_ent = self.policy.forward(batch, cfg.optim.micro_batch_size)
            if token_owner:
                local["entropy/delta_measured"] = _masked_share(new_ent - old_ent, mask, n_tok)
        t_sync = time.monotonic()
        self.weight_version += 1
        sync_stats = self._sync_weights()
        t_end = time.monotonic()
        totals = reduce_sum_metrics(local, ps)
        totals.update({k: v for k, v in sync_stats.items()})
        totals["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        totals["perf/train_time(s)"] = t_sync - t_train
        totals["perf/sync_time(s)"] = t_end - t_sync
        totals["perf/step_time(s)"] = t_end - t_step
        totals["perf/tokens_per_s"] = totals.get("perf/tokens", 0.0) / max(t_end - t_step, 1e-9)
        totals["train/weight_version"] = float(self.weight_version)
        totals.update(self.law.update(totals.get("entropy/mean"), totals.get("reward/mean"),
                                      totals.get("entropy/delta_measured"), totals.get("cov/mean")))
        return totals

    # ---------------------------------------------------------------- loop
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        while self.step < cfg.steps:
            last = self.train_step()
            self.step += 1
            self.metrics.log(self.step, last)
            if (cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0) \
                    or self.step == cfg.steps:
                self.checkpointer.save(self.step, self.chunks, optimizer=self.optimizer,
                                       trainer_state=self._trainer_state())
        self.metrics.close()
        return last

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _attempt(fn, *args) -> Exception | None:
    """Run ``fn(*args)``; return its exception instead of raising (for raise_together)."""
    try:
        fn(*args)
    except Exception as err:                          # noqa: BLE001 - the caller raises it on every rank
        return err
    return None


def _build_engine(cfg: RunConfig, ps: ParallelState):
    if cfg.rollout.engine == "local":
        from megatron_entcov.rollout.local import LocalEngine

        return LocalEngine(cfg.model, seed=cfg.seed)
    from megatron_entcov.rollout.sglang import SGLangEngine

    return SGLangEngine.from_config(cfg, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
