"""One step's experience: prompts -> responses -> rewards -> group advantages, with dynamic sampling, the same
for every data-parallel layout.

Generation and scoring run on one rank per data-parallel replica (tp_rank 0 of the first pipeline stage, which
holds the rollout engine handle); each round, every replica generates its contiguous share of the step's global
prompt batch and the generating ranks all-gather the round, so each makes the decisions a single process would.
A sample's randomness depends on (seed, step, round, global prompt position, sample index) only
(:func:`sample_seed`); :func:`shard_rows` gives replica r the r-th slice of every optimizer mini-batch. With
``rollout.dynamic_sampling`` (DAPO) groups whose rewards are all equal are dropped and refilled from new prompts,
up to ``rollout.max_refill_rounds`` extra rounds; the shortfall is reported as ``rollout/refill_shortfall``.

Design notes (layout invariance, dynamic sampling): docs/design/experience.md
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from megatron_entcov.distributed import collectives
from megatron_entcov.losses.advantages import compute_group_advantages
from megatron_entcov.policy.batch import TrainBatch, rows_from_samples
from megatron_entcov.rollout.types import Sample, SamplingParams, mix_seed
from megatron_entcov.tasks import score

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["Experience", "collect_experience", "shard_rows", "shard_experience", "broadcast_experience",
           "agree_loader_cursor", "to_train_batch", "sample_seed", "dp_gather"]

Gather = Callable[[dict], list[dict]]
"""``gather(payload) -> [payload of replica 0, ..., replica dp-1]`` (collective over the generating ranks)."""


def sample_seed(seed: int, step: int, round_idx: int, prompt_position: int, sample_idx: int) -> int:
    """The sampling seed of one response: sample ``sample_idx`` of the prompt at ``prompt_position`` of the
    step's global batch in refill round ``round_idx``; the same whichever replica generates it."""
    return mix_seed(seed, step, round_idx, prompt_position, sample_idx)


def dp_gather(ps: "ParallelState", group=None) -> Gather:
    """The gather of the generating ranks: an all-gather of picklable payloads over their data-parallel group
    (the generating ranks of all replicas form one, since they share tp_rank 0 and pp_rank 0), or over
    ``group``, another group of the same ranks (the background rollouts of rollout.overlap use their own:
    parallel.build_rollout_group)."""
    def gather(payload: dict) -> list[dict]:
        if ps.dp_size == 1 or not dist.is_initialized():
            return [payload]
        out: list = [None] * ps.dp_size
        collectives.all_gather_object(out, payload, group=ps.dp_group if group is None else group)
        return out
    return gather


@dataclass
class Experience:
    """One step's samples, n consecutive samples per prompt: the global batch (from collect_experience), or a
    replica's rows of it (from shard_experience)."""

    samples: list[Sample]
    rewards: torch.Tensor
    """[N] float32."""
    advantages: torch.Tensor
    """[N] float32, one scalar per sample."""
    sample_ids: list[int]
    """Each sample's row in the step's global batch (token keys and tie-breaks are functions of it)."""
    key_stride: int
    """The step's longest prompt + response over the global batch (token keys: id * stride + position)."""
    stats: dict[str, float] = field(default_factory=dict)
    """Global statistics of the step (identical on every generating rank)."""
    replica_stats: dict[str, float] = field(default_factory=dict)
    """This replica's own generation numbers (its wall time; summed or prefixed per replica when logged)."""


def _generate_share(cfg: "RunConfig", engine, tokenizer, prompts, positions, *, step: int, round_idx: int,
                    stop_ids: tuple[int, ...]) -> dict:
    """Generate and score this replica's prompts of one round; a picklable payload for the gather."""
    n = cfg.rollout.n_samples_per_prompt
    seeds = [sample_seed(cfg.seed, step, round_idx, g, j) for g in positions for j in range(n)]
    params = SamplingParams.from_config(cfg.sampling, seed=mix_seed(cfg.seed, step, round_idx),
                                        stop_token_ids=stop_ids)
    t0 = time.monotonic()
    samples = engine.generate([p.prompt_ids for p in prompts for _ in range(n)], params, seeds=seeds) \
        if prompts else []
    t1 = time.monotonic()
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    answers = [p.answer for p in prompts for _ in range(n)]
    rewards, stats = score(cfg.data.reward, texts, answers, timeout_s=cfg.data.reward_timeout_s) \
        if samples else ([], {})
    return {"samples": [s.to_dict() for s in samples], "rewards": [float(r) for r in rewards],
            "stat_sums": {k: v * len(samples) for k, v in stats.items()},
            "gen_time": t1 - t0, "reward_time": time.monotonic() - t1}


def collect_experience(cfg: "RunConfig", engine, tokenizer, loader, *, step: int, dp_rank: int = 0,
                       dp_size: int = 1, gather: Gather | None = None) -> Experience:
    """The step's GLOBAL experience (the same on every generating rank, for any dp_size).

    Runs on the generating ranks only. Each round takes the loader's next global batch, generates and scores
    this replica's contiguous share of it, and gathers the other replicas' shares (``gather``; None = a
    single replica). ``replica_stats['perf/replica_rollout_time(s)']`` is this replica's own generation time.
    """
    n = cfg.rollout.n_samples_per_prompt
    gather = gather or (lambda payload: [payload])
    rounds = 1 + (cfg.rollout.max_refill_rounds if cfg.rollout.dynamic_sampling else 0)
    # The tokenizer's end-of-sequence token always ends a response.
    stop_ids = tuple(dict.fromkeys([*cfg.sampling.stop_token_ids, tokenizer.eos_token_id]))
    want = loader.batch_size
    per_replica = want // dp_size
    kept: list[tuple[list[Sample], torch.Tensor]] = []
    spare: list[tuple[list[Sample], torch.Tensor]] = []
    all_rewards: list[float] = []
    stat_sums: dict[str, float] = {}
    gen_time = reward_time = own_gen_time = 0.0
    generated_tokens = 0
    num_groups_seen = num_degenerate = 0
    for round_idx in range(rounds):
        prompts = loader.next_global_batch()
        lo = dp_rank * per_replica
        error = None
        try:
            mine = _generate_share(cfg, engine, tokenizer, prompts[lo:lo + per_replica],
                                   range(lo, lo + per_replica), step=step, round_idx=round_idx, stop_ids=stop_ids)
            own_gen_time += mine["gen_time"]
        except Exception as err:               # still join the gather: the other replicas are waiting in it
            mine, error = {"error": f"{type(err).__name__}: {err}"}, err
        parts = gather(mine)
        if error is not None:
            raise error
        failed = [r for r, part in enumerate(parts) if "error" in part]
        if failed:
            raise RuntimeError(f"step {step} rollouts failed on data-parallel replica {failed[0]}: "
                               f"{parts[failed[0]]['error']}")
        samples = [Sample.from_dict(d) for part in parts for d in part["samples"]]
        rewards = torch.tensor([r for part in parts for r in part["rewards"]], dtype=torch.float32)
        # Replicas generate concurrently: a round takes as long as its slowest replica.
        gen_time += max(part["gen_time"] for part in parts)
        reward_time += max(part["reward_time"] for part in parts)
        for part in parts:
            for k, v in part["stat_sums"].items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v
        all_rewards.extend(rewards.tolist())
        generated_tokens += sum(len(s.response_ids) for s in samples)
        groups = compute_group_advantages(rewards, group_size=n, estimator=cfg.loss.advantage_estimator,
                                          normalize_std=cfg.loss.advantage_norm_std)
        degenerate = groups.degenerate.tolist()
        num_groups_seen += len(degenerate)
        num_degenerate += sum(degenerate)
        for g, is_degenerate in enumerate(degenerate):
            block = (samples[g * n:(g + 1) * n], rewards[g * n:(g + 1) * n])
            (spare if is_degenerate and cfg.rollout.dynamic_sampling else kept).append(block)
        if len(kept) >= want:
            break
    shortfall = max(0, want - len(kept))
    groups_kept = (kept + spare[:shortfall])[:want]
    kept_samples = [s for block, _ in groups_kept for s in block]
    for row, sample in enumerate(kept_samples):     # the engine numbered its own call; this is the global row
        sample.index = row
    rewards = torch.cat([r for _, r in groups_kept])
    adv = compute_group_advantages(rewards, group_size=n, estimator=cfg.loss.advantage_estimator,
                                   normalize_std=cfg.loss.advantage_norm_std)
    lengths = torch.tensor([len(s.response_ids) for s in kept_samples], dtype=torch.float32)
    total_generated = max(len(all_rewards), 1)
    stats = {k: v / total_generated for k, v in stat_sums.items()}
    stats.update({
        "reward/mean": rewards.mean().item(),
        "reward/mean_all": sum(all_rewards) / total_generated,
        "reward/std": rewards.std(unbiased=False).item(),
        "reward/accuracy": (rewards >= 1.0).float().mean().item(),
        "reward/degenerate_group_frac": num_degenerate / max(num_groups_seen, 1),
        "rollout/response_len": lengths.mean().item(),
        "rollout/response_len_max": lengths.max().item(),
        "rollout/stop_frac": sum(s.finish_reason == "stop" for s in kept_samples) / len(kept_samples),
        "rollout/refill_rounds": float(round_idx),
        "rollout/refill_shortfall": float(shortfall),
        "perf/rollout_time_s": gen_time,
        "perf/reward_time_s": reward_time,
        "rollout/generated_tokens": float(generated_tokens),
        "data/skipped_prompts": float(loader.num_skipped),
    })
    key_stride = max(len(s.prompt_ids) + len(s.response_ids) for s in kept_samples)
    return Experience(samples=kept_samples, rewards=rewards, advantages=adv.advantages.float(),
                      sample_ids=list(range(len(kept_samples))), key_stride=key_stride, stats=stats,
                      replica_stats={"perf/replica_rollout_time(s)": own_gen_time})


def shard_rows(num_rows: int, *, num_mini_batches: int, dp_rank: int, dp_size: int) -> list[int]:
    """The global rows replica ``dp_rank`` trains on: its slice of every optimizer mini-batch, in order.

    Global mini-batch i is rows [i * M, (i + 1) * M) with M = num_rows / num_mini_batches, whatever dp is;
    replica r holds rows [i * M + r * M / dp, i * M + (r + 1) * M / dp) of it.
    """
    if num_rows % (num_mini_batches * dp_size):
        raise ValueError(f"{num_rows} rows do not split into {num_mini_batches} mini-batches over {dp_size} replicas")
    per_mini = num_rows // num_mini_batches
    per_rank = per_mini // dp_size
    return [i * per_mini + dp_rank * per_rank + j for i in range(num_mini_batches) for j in range(per_rank)]


def shard_experience(exp: Experience, *, num_mini_batches: int, dp_rank: int, dp_size: int) -> Experience:
    """This replica's rows of the global experience (:func:`shard_rows`); ids stay global."""
    rows = shard_rows(len(exp.samples), num_mini_batches=num_mini_batches, dp_rank=dp_rank, dp_size=dp_size)
    index = torch.tensor(rows, dtype=torch.long)
    return Experience(samples=[exp.samples[i] for i in rows], rewards=exp.rewards[index],
                      advantages=exp.advantages[index], sample_ids=[exp.sample_ids[i] for i in rows],
                      key_stride=exp.key_stride, stats=exp.stats, replica_stats=exp.replica_stats)


def broadcast_experience(exp: Experience | None, ps: "ParallelState") -> Experience:
    """Ship the generating rank's experience (its replica's rows) to every rank of its model-parallel group."""
    if ps.mp_group is None or dist.get_world_size(ps.mp_group) == 1:
        assert exp is not None
        return exp
    src = dist.get_global_rank(ps.mp_group, 0)
    payload = [None]
    if dist.get_rank() == src:
        assert exp is not None, "the generating rank has no experience to send"
        payload[0] = {"samples": [s.to_dict() for s in exp.samples], "rewards": exp.rewards,
                      "advantages": exp.advantages, "sample_ids": exp.sample_ids, "key_stride": exp.key_stride,
                      "stats": exp.stats, "replica_stats": exp.replica_stats}
    # One pickled object per step (a few MB at most for CPU runs; GPU runs use the same path once per step).
    collectives.broadcast_object_list(payload, src=src, group=ps.mp_group)
    data = payload[0]
    return Experience(samples=[Sample.from_dict(d) for d in data["samples"]], rewards=data["rewards"],
                      advantages=data["advantages"], sample_ids=data["sample_ids"], key_stride=data["key_stride"],
                      stats=data["stats"], replica_stats=data["replica_stats"])


def agree_loader_cursor(loader) -> None:
    """Only the generating ranks draw prompts: move every rank's loader to the furthest cursor so that the
    checkpointed cursor is valid whichever rank saves it (collective)."""
    cursor = collectives.reduce_values([loader.cursor], op="max", dtype=torch.long)
    loader.cursor = int(cursor)


def to_train_batch(exp: Experience, ps: "ParallelState", *, pad_id: int) -> TrainBatch:
    """This replica's samples as training rows (token keys from global sample ids and the global longest sample,
    so Clip-Cov/KL-Cov tie-breaks and random choices depend neither on the data-parallel split nor on the
    padding that tensor parallelism adds)."""
    return rows_from_samples(exp.samples, exp.advantages, pad_id=pad_id, sample_ids=exp.sample_ids,
                             key_stride=exp.key_stride, multiple_of=ps.tp_size, device=ps.device)
