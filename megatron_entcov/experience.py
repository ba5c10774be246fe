"""One step's experience: prompts -> responses -> rewards -> group advantages, with dynamic sampling.

Generation and scoring run on one rank per data-parallel replica (tp_rank 0 of the first pipeline stage,
which holds the rollout engine handle); the result is broadcast to the rest of its model-parallel group,
which needs the same tokens. Every replica draws its own share of the step's prompts from the loader.

Dynamic sampling (DAPO; reference section 6): a group whose n rewards are all equal has zero advantage
everywhere and carries no signal. With ``rollout.dynamic_sampling`` such groups are dropped and refilled
from new prompts, up to ``rollout.max_refill_rounds`` extra rounds; if groups are still missing after that,
degenerate groups fill the remaining slots (their advantages are zero, so they only dilute the token-mean
denominator) and the shortfall is reported as ``rollout/refill_shortfall``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_entcov.losses.advantages import compute_group_advantages
from megatron_entcov.policy.batch import TrainBatch, pack_samples
from megatron_entcov.rewards import score
from megatron_entcov.rollout.types import Sample, SamplingParams

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig
    from megatron_entcov.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["Experience", "collect_experience", "broadcast_experience", "agree_loader_cursor", "to_train_batch"]


@dataclass
class Experience:
    """A replica's share of one step: n consecutive samples per prompt."""

    samples: list[Sample]
    rewards: torch.Tensor
    """[N] float32."""
    advantages: torch.Tensor
    """[N] float32, one scalar per sample."""
    stats: dict[str, float] = field(default_factory=dict)
    """Per-replica statistics (means over this replica's samples, times in seconds)."""


def _score_round(cfg: "RunConfig", engine, tokenizer, prompts, params: SamplingParams):
    n = cfg.rollout.n_samples_per_prompt
    t0 = time.monotonic()
    samples = engine.generate([p.prompt_ids for p in prompts for _ in range(n)], params)
    t1 = time.monotonic()
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    answers = [p.answer for p in prompts for _ in range(n)]
    rewards, stats = score(cfg.data.reward, texts, answers, timeout_s=cfg.data.reward_timeout_s)
    return samples, torch.tensor(rewards, dtype=torch.float32), stats, t1 - t0, time.monotonic() - t1


def collect_experience(cfg: "RunConfig", engine, tokenizer, loader, *, step: int, dp_rank: int) -> Experience:
    """Generate and score this replica's prompts for ``step`` (runs on the generating rank only)."""
    n = cfg.rollout.n_samples_per_prompt
    base_seed = (cfg.seed * 1_000_003 + step * 1_009 + dp_rank) % 2**31
    want = None
    kept_samples: list[Sample] = []
    kept_rewards: list[torch.Tensor] = []
    spare_samples: list[Sample] = []
    spare_rewards: list[torch.Tensor] = []
    gen_time = reward_time = 0.0
    agg_stats: dict[str, float] = {}
    rounds = 1 + (cfg.rollout.max_refill_rounds if cfg.rollout.dynamic_sampling else 0)
    # The tokenizer's end-of-sequence token always ends a response.
    stop_ids = tuple(dict.fromkeys([*cfg.sampling.stop_token_ids, tokenizer.eos_token_id]))
    num_groups_seen = num_degenerate = 0
    for round_idx in range(rounds):
        prompts = loader.next_batch()
        if want is None:
            want = len(prompts)
        params = SamplingParams.from_config(cfg.sampling, seed=base_seed + 7919 * round_idx,
                                            stop_token_ids=stop_ids)
        samples, rewards, stats, tg, tr = _score_round(cfg, engine, tokenizer, prompts, params)
        gen_time += tg
        reward_time += tr
        for k, v in stats.items():
            agg_stats[k] = agg_stats.get(k, 0.0) + v * len(samples)
        groups = compute_group_advantages(rewards, group_size=n, estimator=cfg.loss.advantage_estimator,
                                          normalize_std=cfg.loss.advantage_norm_std)
        degenerate = groups.degenerate.tolist()
        num_groups_seen += len(degenerate)
        num_degenerate += sum(degenerate)
        for g, is_degenerate in enumerate(degenerate):
            block = slice(g * n, (g + 1) * n)
            if is_degenerate and cfg.rollout.dynamic_sampling:
                spare_samples.extend(samples[block])
                spare_rewards.append(rewards[block])
            else:
                kept_samples.extend(samples[block])
                kept_rewards.append(rewards[block])
        if len(kept_samples) >= want * n:
            break
    shortfall = max(0, want * n - len(kept_samples)) // n
    if shortfall:
        kept_samples.extend(spare_samples[:shortfall * n])
        kept_rewards.extend(spare_rewards[:shortfall])
    kept_samples = kept_samples[:want * n]
    rewards = torch.cat(kept_rewards)[:want * n]
    adv = compute_group_advantages(rewards, group_size=n, estimator=cfg.loss.advantage_estimator,
                                   normalize_std=cfg.loss.advantage_norm_std)
    total_generated = max(num_groups_seen * n, 1)
    lengths = torch.tensor([len(s.response_ids) for s in kept_samples], dtype=torch.float32)
    stats = {k: v / total_generated for k, v in agg_stats.items()}
    stats.update({
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std(unbiased=False).item(),
        "reward/accuracy": (rewards >= 1.0).float().mean().item(),
        "reward/degenerate_group_frac": num_degenerate / max(num_groups_seen, 1),
        "rollout/response_len": lengths.mean().item(),
        "rollout/response_len_max": lengths.max().item(),
        "rollout/stop_frac": sum(s.finish_reason == "stop" for s in kept_samples) / len(kept_samples),
        "rollout/refill_rounds": float(round_idx),
        "rollout/refill_shortfall": float(shortfall),
        "perf/rollout_time(s)": gen_time,
        "perf/reward_time(s)": reward_time,
        "rollout/generated_tokens": float(sum(len(s.response_ids) for s in kept_samples)),
        "data/skipped_prompts": float(loader.num_skipped),
    })
    return Experience(samples=kept_samples, rewards=rewards, advantages=adv.advantages.float(), stats=stats)


def broadcast_experience(exp: Experience | None, ps: "ParallelState") -> Experience:
    """Ship the generating rank's experience to every rank of its model-parallel group."""
    if ps.mp_group is None or dist.get_world_size(ps.mp_group) == 1:
        assert exp is not None
        return exp
    src = dist.get_global_rank(ps.mp_group, 0)
    payload = [None]
    if dist.get_rank() == src:
        assert exp is not None, "the generating rank has no experience to send"
        payload[0] = {"samples": [s.to_dict() for s in exp.samples], "rewards": exp.rewards,
                      "advantages": exp.advantages, "stats": exp.stats}
    # One pickled object per step (a few MB at most for CPU runs; GPU runs use the same path once per step).
    dist.broadcast_object_list(payload, src=src, group=ps.mp_group)
    data = payload[0]
    return Experience(samples=[Sample.from_dict(d) for d in data["samples"]], rewards=data["rewards"],
                      advantages=data["advantages"], stats=data["stats"])


def agree_loader_cursor(loader) -> None:
    """Replicas may consume different numbers of prompt batches (dynamic sampling refills): move every
    loader to the furthest cursor so the checkpointed cursor is valid for all of them (collective)."""
    cursor = torch.tensor([loader.cursor], dtype=torch.long)
    if dist.is_initialized():
        dist.all_reduce(cursor, op=dist.ReduceOp.MAX)
    loader.cursor = int(cursor)


def to_train_batch(exp: Experience, ps: "ParallelState", *, pad_id: int) -> TrainBatch:
    """This replica's samples as training rows (collective: token keys use the step's global longest row,
    sample ids are global, so Clip-Cov/KL-Cov tie-breaks do not depend on the data-parallel split)."""
    n_local = len(exp.samples)
    longest = torch.tensor([max(len(s.prompt_ids) + len(s.response_ids) for s in exp.samples)])
    if dist.is_initialized():
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    ids = [ps.dp_rank * n_local + i for i in range(n_local)]
    return pack_samples(exp.samples, exp.advantages, pad_id=pad_id, sample_ids=ids,
                        key_stride=int(longest) + ps.tp_size, multiple_of=ps.tp_size)
