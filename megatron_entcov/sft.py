"""Supervised warm start (teacher forcing on reference answers) with the same model, pipeline and checkpoints.

RL from a random tiny model never sees a reward; a short SFT on the task's reference answers brings it to
partial accuracy, after which RL has signal (and entropy to lose). The loss is the token-mean negative
log-likelihood of the answer tokens (answer + end-of-sequence; the reference chain of thought instead of the
answer where the data source has one, PromptItem.sft_target), over the global batch.

Example:
    result = run_sft(cfg, ps)          # writes <run_dir>/sft/checkpoints/step_XXXXXX
    cfg.checkpoint.load = result["checkpoint"]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from megatron_entcov.config import RunConfig, dump_config
from megatron_entcov.distributed import collectives
from megatron_entcov.distributed.parallel import ParallelState
from megatron_entcov.monitor.dashboard import config_markdown, source_markdown
from megatron_entcov.monitor.metrics import MetricsLogger, reduce_sum_metrics
from megatron_entcov.policy.actor import Actor
from megatron_entcov.policy.batch import TrainBatch, rows_from_samples
from megatron_entcov.rollout.types import Sample, SamplingParams
from megatron_entcov.run.checkpoint import Checkpointer
from megatron_entcov.tasks import score
from megatron_entcov.tasks.prompts import PromptDataset, PromptLoader
from megatron_entcov.tasks.tokenizer import load_tokenizer
from megatron_entcov.weights.sync import WeightSync

logger = logging.getLogger(__name__)

__all__ = ["run_sft"]


def _sft_config(cfg: RunConfig) -> RunConfig:
    """The optimizer settings of SFT: Adam at sft.lr with warm-up and sft.lr_decay_style, one mini-batch per step."""
    s = cfg.sft
    optim = dataclasses.replace(cfg.optim, optimizer="adam", lr=s.lr, min_lr=0.0, lr_warmup_steps=s.warmup_steps,
                                lr_decay_style=s.lr_decay_style, num_mini_batches=1)
    return dataclasses.replace(cfg, optim=optim, steps=max(s.steps, 1))


def _answer_samples(items, tokenizer) -> list[Sample]:
    eos = tokenizer.eos_token_id
    out = []
    for i, item in enumerate(items):
        target = item.sft_target if item.sft_target is not None else str(item.answer)
        answer = tokenizer.encode(target, add_special_tokens=False) + [eos]
        out.append(Sample(prompt_ids=list(item.prompt_ids), response_ids=answer, rollout_logprobs=[0.0] * len(answer),
                          finish_reason="stop", weight_version=0, index=i))
    return out


def run_sft(cfg: RunConfig, ps: ParallelState, *, print_fn=print) -> dict:
    """Train ``cfg.sft.steps`` steps of SFT, save a checkpoint, report greedy accuracy. Collective."""
    s = cfg.sft
    if s.steps == 0:
        raise ValueError("sft.steps=0: nothing to train; set sft.steps > 0")
    if s.batch_size % ps.dp_size or (s.batch_size // ps.dp_size) % cfg.optim.micro_batch_size:
        raise ValueError(f"sft.batch_size={s.batch_size} must split over data_parallel_size={ps.dp_size} ranks "
                         f"into micro-batches of optim.micro_batch_size={cfg.optim.micro_batch_size}")
    run_dir = Path(cfg.run_dir) / "sft"
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    dataset = PromptDataset.from_config(cfg.data, tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                        seed=cfg.seed)  # before the model: a bad data file fails at once
    actor = Actor(_sft_config(cfg), ps, temperature=1.0)
    # Fail before training, not after it, when the held-out split cannot give sft.eval_size prompts.
    eval_items = dataset.held_out(s.eval_size) if s.eval_size else None
    loader = PromptLoader(dataset, batch_size=s.batch_size, dp_rank=ps.dp_rank, dp_size=ps.dp_size,
                          seed=cfg.seed + 1, shuffle=True)
    metrics = MetricsLogger(run_dir, ps, enabled=cfg.metrics.tensorboard, log_interval=max(s.steps // 10, 1),
                            print_fn=print_fn)
    if ps.is_rank0:
        dump_config(cfg, run_dir / "resolved_config.yaml")
    if metrics.writes:
        metrics.text(0, "run/config", config_markdown(cfg))
        metrics.text(0, "run/source", source_markdown(ps.world_size))
    t0 = time.monotonic()
    for step in range(1, s.steps + 1):
        samples = _answer_samples(loader.next_batch(), tokenizer)
        batch = rows_from_samples(samples, torch.zeros(len(samples)), pad_id=tokenizer.pad_token_id,
                                  sample_ids=list(range(len(samples))), key_stride=10**6, multiple_of=ps.tp_size,
                                  device=ps.device)
        result = actor.train_step(batch, _nll_loss_fn(_global_count(batch, ps)), label=f"sft step {step}")
        totals = reduce_sum_metrics(result.metrics if ps.owns_results else {}, ps)
        totals["sft/grad_norm"] = result.grad_norm
        totals["sft/lr"] = actor.lr
        metrics.log(step, totals)
    train_time = time.monotonic() - t0
    ckpt = Checkpointer(run_dir / "checkpoints", ps, keep_last=1)
    path = ckpt.save(s.steps, actor.chunks, trainer_state={"step": s.steps, "kind": "sft"})
    accuracy = _greedy_accuracy(cfg, ps, actor.chunks, tokenizer, eval_items) if eval_items else None
    metrics.close()
    return {"checkpoint": str(path), "accuracy": accuracy, "loss": totals.get("sft/loss"), "time_s": train_time}


def _global_count(batch: TrainBatch, ps: ParallelState) -> torch.Tensor:
    """Answer tokens of the step over every data-parallel replica (the loss denominator)."""
    count = batch.loss_mask.sum().float().reshape(1)
    return collectives.all_reduce(count, group=ps.dp_group)


def _nll_loss_fn(count: torch.Tensor):
    """Token-mean negative log-likelihood of the answer tokens; each micro-batch returns its share."""

    def loss_fn(mb, logprobs, entropy):
        nll = -(logprobs * mb.loss_mask.float()).sum() / count
        return nll, {"sft/loss": float(nll.detach())}
    return loss_fn


def _greedy_accuracy(cfg: RunConfig, ps: ParallelState, chunks, tokenizer, items) -> float:
    """Greedy accuracy on the held-out prompts (the data set's held-out split: never trained on), via the
    embedded engine."""
    from megatron_entcov.rollout.local import LocalEngine

    is_generator = ps.rank == 0      # one engine for the whole run: rank 0 scores the held-out prompts
    engine = LocalEngine(cfg.model, seed=cfg.seed, device=ps.device) if is_generator else None
    WeightSync(chunks, cfg.model, ps, bucket_bytes=int(cfg.weight_sync.bucket_mb * 2**20)).push(engine, 1)
    acc = torch.zeros(1, dtype=torch.float64)
    if is_generator:
        params = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=cfg.sampling.max_new_tokens,
                                stop_token_ids=(tokenizer.eos_token_id,), seed=0)
        outs = engine.generate([it.prompt_ids for it in items], params)
        texts = tokenizer.batch_decode([o.response_ids for o in outs], skip_special_tokens=True)
        rewards, _ = score(cfg.data.reward, texts, [it.answer for it in items], timeout_s=cfg.data.reward_timeout_s)
        acc[0] = sum(r >= 1.0 for r in rewards) / len(rewards)
        engine.close()
    # Rank 0 scored; a MAX over zeros elsewhere is its value on every rank.
    return float(collectives.reduce_values(acc, op="max"))
