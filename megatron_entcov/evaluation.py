"""Held-out evaluation during RL: greedy accuracy, pass@k from n samples, entropy and length of the responses.

``Evaluator`` scores a fixed set of held-out prompts (the data set's held-out split, or eval.path) with the
rollout engine, on the weights it holds: ``eval/accuracy`` (greedy, one response per prompt), ``eval/pass@k``
(unbiased estimator from n = eval.n_samples responses at eval.temperature, averaged over prompts;
``eval/pass@1`` is the mean sampled accuracy), ``eval/entropy`` (the policy's mean token entropy over the
sampled responses, at the training temperature) and ``eval/response_len``. The sampled responses of prompt i
use seeds from (run seed, i, sample index) only: the same at every evaluation and for every data-parallel
layout. Prompts are split over the replicas and the sums reduced over the world.

Design notes (why held-out accuracy, the estimator): docs/design/experience.md

Example:
    evaluator = Evaluator(cfg, ps, tokenizer, dataset)
    metrics = evaluator.run(engine, actor)        # collective; {"eval/accuracy": ..., "eval/pass@4": ...}
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

from megatron_entcov.distributed.parallel import fail_together
from megatron_entcov.experience import Experience, broadcast_experience
from megatron_entcov.monitor.metrics import reduce_sum_metrics
from megatron_entcov.policy.batch import rows_from_samples
from megatron_entcov.rollout.types import SamplingParams, mix_seed
from megatron_entcov.tasks import score

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig
    from megatron_entcov.distributed.parallel import ParallelState
    from megatron_entcov.tasks.prompts import PromptDataset, PromptItem

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "pass_at_k", "eval_prompts"]

EVAL_STEP = -1
"""The step slot of evaluation seeds (training steps are >= 0), so evaluation never reuses a rollout's draw."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def eval_prompts(cfg: "RunConfig", tokenizer, dataset: "PromptDataset") -> list["PromptItem"]:
    """The eval.num_prompts evaluation prompts: the held-out split of ``dataset`` (of the eval.seed stream of a
    generated task when that is set) or the first usable rows of eval.path (a ValueError naming the fix when
    there are fewer)."""
    e = cfg.eval
    if e.source == "held_out":
        if e.seed is not None and e.seed != cfg.seed:
            from megatron_entcov.tasks.prompts import build_dataset

            dataset = build_dataset(cfg.data, tokenizer, max_prompt_len=cfg.rollout.max_prompt_len, seed=e.seed)
        return dataset.held_out(e.num_prompts)
    from megatron_entcov.tasks.prompts import PromptDataset

    ds = PromptDataset.from_file(e.path, tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
                                 prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                                 chat_template=cfg.data.chat_template, unknown_chars=cfg.data.unknown_chars)
    items = [it for it in (ds.get(i) for i in range(ds.size)) if it is not None][:e.num_prompts]
    if len(items) < e.num_prompts:
        raise ValueError(f"eval.path={e.path!r} has {len(items)} prompts within rollout.max_prompt_len="
                         f"{cfg.rollout.max_prompt_len}, fewer than eval.num_prompts={e.num_prompts}; lower it")
    return items


class Evaluator:
    """Periodic held-out evaluation of one run (module docstring). ``run`` is collective over the world."""

    def __init__(self, cfg: "RunConfig", ps: "ParallelState", tokenizer, dataset: "PromptDataset"):
        self.cfg, self.ps, self.tokenizer = cfg, ps, tokenizer
        self.items = eval_prompts(cfg, tokenizer, dataset)
        per = -(-len(self.items) // ps.dp_size)
        self.first = min(ps.dp_rank * per, len(self.items))
        self.mine = self.items[self.first:self.first + per]
        self.stop_ids = tuple(dict.fromkeys([*cfg.sampling.stop_token_ids, tokenizer.eos_token_id]))
        logger.debug("eval: %d prompts, %d on this replica", len(self.items), len(self.mine))

    def due(self, step: int) -> bool:
        """Evaluate after ``step`` completed steps (0 = the starting weights)?"""
        interval = self.cfg.eval.interval
        return bool(interval) and (step % interval == 0 or step == self.cfg.steps)

    def run(self, engine, actor) -> dict[str, float]:
        """Evaluate the engine's current weights; every rank returns the same metrics."""
        ps = self.ps
        t0 = time.monotonic()
        with fail_together("evaluation"):
            local, exp = self._generate(engine) if ps.is_generator else ({}, None)
        if self.mine:                                          # the whole replica has prompts, or none has
            exp = broadcast_experience(exp, ps)
            local.update(self._entropy_sums(exp, actor))
        sums = reduce_sum_metrics(local, ps)
        n, prompts = self.cfg.eval.n_samples, len(self.items)
        out = {"eval/accuracy": sums["greedy_correct"] / prompts,
               "eval/response_len": sums["sampled_tokens"] / (prompts * n),
               "eval/entropy": sums.get("entropy_sum", 0.0) / max(sums.get("entropy_tokens", 0.0), 1.0),
               "perf/eval_time_s": time.monotonic() - t0}
        for k in self.cfg.eval.pass_k:
            out[f"eval/pass@{k}"] = sums[f"pass@{k}"] / prompts
        return out

    def _generate(self, engine) -> tuple[dict[str, float], Experience | None]:
        """Greedy and sampled responses of this replica's prompts, scored: summed metrics and the samples."""
        cfg, e = self.cfg, self.cfg.eval
        zeros = {"greedy_correct": 0.0, "sampled_tokens": 0.0, **{f"pass@{k}": 0.0 for k in e.pass_k}}
        if not self.mine:
            return zeros, None
        ids = [it.prompt_ids for it in self.mine]
        greedy = engine.generate(ids, SamplingParams(temperature=1.0, top_k=1,
                                                     max_new_tokens=cfg.sampling.max_new_tokens,
                                                     stop_token_ids=self.stop_ids, seed=0))
        n = e.n_samples
        seeds = [mix_seed(cfg.seed, EVAL_STEP, self.first + i, j) for i in range(len(ids)) for j in range(n)]
        params = SamplingParams.from_config(cfg.sampling, temperature=e.temperature, seed=0,
                                            stop_token_ids=self.stop_ids)
        sampled = engine.generate([p for p in ids for _ in range(n)], params, seeds=seeds)
        answers = [it.answer for it in self.mine]
        greedy_rewards = self._score(greedy, answers)
        sampled_rewards = self._score(sampled, [a for a in answers for _ in range(n)])
        local = dict(zeros)
        local["greedy_correct"] = float(sum(r >= 1.0 for r in greedy_rewards))
        local["sampled_tokens"] = float(sum(len(s.response_ids) for s in sampled))
        for i in range(len(ids)):
            correct = sum(r >= 1.0 for r in sampled_rewards[i * n:(i + 1) * n])
            for k in e.pass_k:
                local[f"pass@{k}"] += pass_at_k(n, correct, k)
        rewards = torch.tensor(sampled_rewards, dtype=torch.float32)
        exp = Experience(samples=sampled, rewards=rewards, advantages=torch.zeros_like(rewards),
                         sample_ids=list(range(len(sampled))),
                         key_stride=max(len(s.prompt_ids) + len(s.response_ids) for s in sampled))
        return local, exp

    def _score(self, samples, answers) -> list[float]:
        texts = self.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        rewards, _ = score(self.cfg.data.reward, texts, answers, timeout_s=self.cfg.data.reward_timeout_s)
        return rewards

    def _entropy_sums(self, exp: Experience, actor) -> dict[str, float]:
        """Token entropy of the sampled responses under the trainer's model (a forward-only pass)."""
        ps = self.ps
        batch = rows_from_samples(exp.samples, exp.advantages, pad_id=self.tokenizer.pad_token_id,
                                  sample_ids=exp.sample_ids, key_stride=exp.key_stride + ps.tp_size,
                                  multiple_of=ps.tp_size, device=ps.device)
        rows = batch.num_rows
        mbs = max(d for d in range(1, min(actor.micro_batch_size, rows) + 1) if rows % d == 0)
        _, entropy = actor.logprobs(batch, mbs)
        if not ps.owns_results:
            return {}
        mask = batch.loss_mask.float()
        return {"entropy_sum": float((entropy * mask).sum()), "entropy_tokens": float(mask.sum())}
