"""collect_experience on one process with a scripted engine: rewards and GRPO group advantages against a hand
computation, dynamic sampling (drop, refill, shortfall) and its statistics, and the per-round/per-replica seeds."""

import math

import pytest
import torch

from megatron_entcov.config import load_config
from megatron_entcov.data import PromptLoader, build_dataset
from megatron_entcov.experience import collect_experience
from megatron_entcov.rewards.arithmetic import ArithmeticTask
from megatron_entcov.rollout.engine import RolloutEngine
from megatron_entcov.rollout.types import Sample
from megatron_entcov.tokenizer import build_char_tokenizer

N = 4  # samples per prompt

# Scripted outcomes per response: 1 = the correct answer, 0 = a wrong integer, "x" = unparseable text.
C, W, X = 1, 0, "x"
ALL_RIGHT, ALL_WRONG, ALL_X = [C] * N, [W] * N, [X] * N


class ScriptedEngine(RolloutEngine):
    """Answers call k's group g with script[k][g] (one outcome per response); records prompts and params."""

    def __init__(self, tok, answers, script):
        self.tok, self.answers, self.script = tok, answers, script
        self.calls = []  # (prompts, params) per generate call

    def generate(self, prompts, params):
        call = len(self.calls)
        self.calls.append((prompts, params))
        groups = self.script[min(call, len(self.script) - 1)]
        assert len(prompts) == len(groups) * N
        out = []
        for i, prompt in enumerate(prompts):
            outcome = groups[i // N][i % N]
            answer = self.answers[tuple(prompt)]
            text = {C: answer, W: str(int(answer) + 1), X: "="}[outcome]
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append(Sample(prompt_ids=list(prompt), response_ids=ids, rollout_logprobs=[-0.5] * len(ids),
                              finish_reason="stop", weight_version=0, index=i))
        return out

    def update_weights(self, named_tensors, version):
        raise NotImplementedError

    def pause(self):
        pass

    def resume(self):
        pass

    def health(self):
        return {"ok": True, "weight_version": 0}

    @property
    def weight_version(self):
        return 0

    def close(self):
        pass


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _setup(tok, script, *, prompts, dynamic=False, refills=4, dp_rank=0, dp_size=1, seed=1234):
    cfg = load_config(None, [f"seed={seed}", f"rollout.prompts_per_step={prompts * dp_size}",
                             f"rollout.n_samples_per_prompt={N}", f"rollout.dynamic_sampling={str(dynamic).lower()}",
                             f"rollout.max_refill_rounds={refills}"])
    dataset = build_dataset(cfg.data, tok, max_prompt_len=cfg.rollout.max_prompt_len, seed=cfg.seed)
    loader = PromptLoader(dataset, batch_size=prompts * dp_size, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)
    # Independent of the loader: problem i of the task, tokenised as the dataset does (with <bos>).
    task = ArithmeticTask(seed=seed, digits=cfg.data.arithmetic_digits, ops=cfg.data.arithmetic_ops,
                          num_operands=cfg.data.arithmetic_operands)
    problem_ids = [tok(task.problem(i).prompt)["input_ids"] for i in range(64)]
    answers = {tuple(problem_ids[i]): task.problem(i).answer for i in range(64)}
    engine = ScriptedEngine(tok, answers, script)
    return cfg, engine, loader, problem_ids


def _reward(outcome):
    return 1.0 if outcome == C else 0.0


def _grpo(rewards, eps=1e-6):
    """GRPO advantages of one group by hand: (r - mean) / (unbiased std + eps); 0 for an all-equal group."""
    n = len(rewards)
    mean = sum(rewards) / n
    if all(r == rewards[0] for r in rewards):
        return [0.0] * n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + eps) for r in rewards]


def _expected(groups):
    rewards = [_reward(o) for g in groups for o in g]
    adv = [a for g in groups for a in _grpo([_reward(o) for o in g])]
    return rewards, adv


def test_hand_values_of_grpo_helper():
    # mean 0.25, unbiased std 0.5: (1 - 0.25) / 0.5 = 1.5 and (0 - 0.25) / 0.5 = -0.5.
    assert _grpo([1.0, 0.0, 0.0, 0.0]) == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert _grpo([1.0, 1.0, 1.0, 0.0]) == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-5)


def test_without_dynamic_sampling_all_groups_kept(tok):
    groups = [[C, W, W, W], ALL_WRONG, [C, C, C, W], [W, X, C, C]]
    cfg, engine, loader, problem_ids = _setup(tok, [groups], prompts=4)
    exp = collect_experience(cfg, engine, tok, loader, step=0, dp_rank=0)

    assert len(engine.calls) == 1
    prompts, params = engine.calls[0]
    # Each prompt repeated n times, consecutively, in loader order (problems 0..3).
    assert prompts == [problem_ids[i] for i in range(4) for _ in range(N)]
    assert tok.eos_token_id in params.stop_token_ids

    rewards, adv = _expected(groups)
    assert exp.rewards.dtype == exp.advantages.dtype == torch.float32
    assert exp.rewards.tolist() == rewards
    torch.testing.assert_close(exp.advantages, torch.tensor(adv), rtol=0, atol=1e-5)
    assert exp.advantages[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert [s.prompt_ids for s in exp.samples] == prompts
    s = exp.stats
    assert s["reward/mean"] == pytest.approx(sum(rewards) / 16)
    assert s["reward/accuracy"] == pytest.approx(6 / 16)  # 1 + 0 + 3 + 2 correct
    assert s["reward/std"] == pytest.approx(torch.tensor(rewards).std(unbiased=False).item())
    assert s["reward/degenerate_group_frac"] == pytest.approx(1 / 4)
    assert s["reward/parse_fail_frac"] == pytest.approx(1 / 16)
    assert s["rollout/refill_rounds"] == 0.0 and s["rollout/refill_shortfall"] == 0.0
    assert s["rollout/stop_frac"] == 1.0
    lengths = [len(x.response_ids) for x in exp.samples]
    assert s["rollout/generated_tokens"] == sum(lengths)
    assert s["rollout/response_len"] == pytest.approx(sum(lengths) / 16)
    assert s["rollout/response_len_max"] == max(lengths)


def test_dynamic_sampling_drops_and_refills(tok):
    a, b, c, d = [C, W, W, W], [W, C, W, C], [C, C, C, W], [W, W, C, W]
    script = [[ALL_X, a, ALL_RIGHT],  # round 0: problems 0, 1, 2 -> keeps problem 1
              [b, c, d]]  # round 1: problems 3, 4, 5 -> keeps 3 and 4; 5 is not needed
    cfg, engine, loader, problem_ids = _setup(tok, script, prompts=3, dynamic=True, refills=4)
    exp = collect_experience(cfg, engine, tok, loader, step=3, dp_rank=0)

    assert len(engine.calls) == 2  # stops as soon as enough groups are kept
    kept_problems = [1, 3, 4]
    assert [s.prompt_ids for s in exp.samples] == [problem_ids[i] for i in kept_problems for _ in range(N)]
    rewards, adv = _expected([a, b, c])
    assert exp.rewards.tolist() == rewards
    torch.testing.assert_close(exp.advantages, torch.tensor(adv), rtol=0, atol=1e-5)
    s = exp.stats
    assert s["rollout/refill_rounds"] == 1.0
    assert s["rollout/refill_shortfall"] == 0.0
    assert s["reward/degenerate_group_frac"] == pytest.approx(2 / 6)  # 2 degenerate of 6 groups generated
    # Verifier statistics are over everything generated (24 responses), dropped groups included.
    assert s["reward/parse_fail_frac"] == pytest.approx(4 / 24)
    assert s["reward/mean"] == pytest.approx(sum(rewards) / 12)


def test_dynamic_sampling_runs_all_refill_rounds(tok):
    a, b, c = [C, W, W, W], [W, C, W, C], [C, C, C, W]
    script = [[a, ALL_WRONG, ALL_RIGHT], [ALL_WRONG, ALL_WRONG, ALL_RIGHT], [ALL_X, b, ALL_RIGHT],
              [ALL_WRONG, ALL_WRONG, c]]
    cfg, engine, loader, problem_ids = _setup(tok, script, prompts=3, dynamic=True, refills=3)
    exp = collect_experience(cfg, engine, tok, loader, step=0, dp_rank=0)
    assert len(engine.calls) == 4
    assert [s.prompt_ids for s in exp.samples] == [problem_ids[i] for i in (0, 7, 11) for _ in range(N)]
    rewards, adv = _expected([a, b, c])
    assert exp.rewards.tolist() == rewards
    torch.testing.assert_close(exp.advantages, torch.tensor(adv), rtol=0, atol=1e-5)
    assert exp.stats["rollout/refill_rounds"] == 3.0
    assert exp.stats["rollout/refill_shortfall"] == 0.0
    assert exp.stats["reward/degenerate_group_frac"] == pytest.approx(9 / 12)


@pytest.mark.parametrize("refills", [0, 1])
def test_shortfall_filled_with_degenerate_groups(tok, refills):
    a, b = [C, W, W, W], [W, W, C, C]
    script = [[ALL_WRONG, a, ALL_RIGHT], [ALL_X, ALL_RIGHT, b]]
    cfg, engine, loader, problem_ids = _setup(tok, script, prompts=3, dynamic=True, refills=refills)
    exp = collect_experience(cfg, engine, tok, loader, step=0, dp_rank=0)
    assert len(engine.calls) == 1 + refills
    if refills == 0:
        # Kept: problem 1; the two missing groups are the round's degenerate ones, in order (0 then 2).
        kept, groups, shortfall, degenerate = [1, 0, 2], [a, ALL_WRONG, ALL_RIGHT], 2, (2, 3)
    else:
        # Kept: problems 1 and 5; the missing group is the first degenerate one generated (problem 0).
        kept, groups, shortfall, degenerate = [1, 5, 0], [a, b, ALL_WRONG], 1, (4, 6)
    assert [s.prompt_ids for s in exp.samples] == [problem_ids[i] for i in kept for _ in range(N)]
    rewards, adv = _expected(groups)
    assert exp.rewards.tolist() == rewards
    torch.testing.assert_close(exp.advantages, torch.tensor(adv), rtol=0, atol=1e-5)
    assert exp.advantages[(len(kept) - shortfall) * N:].tolist() == [0.0] * (shortfall * N)
    assert exp.stats["rollout/refill_shortfall"] == float(shortfall)
    assert exp.stats["rollout/refill_rounds"] == float(refills)
    assert exp.stats["reward/degenerate_group_frac"] == pytest.approx(degenerate[0] / degenerate[1])


def _seeds(tok, *, step, dp_rank, seed=1234):
    # Every group degenerate: all 1 + 2 rounds run, the shortfall is the whole batch.
    cfg, engine, loader, _ = _setup(tok, [[ALL_RIGHT, ALL_WRONG]], prompts=2, dynamic=True, refills=2,
                                    dp_rank=dp_rank, dp_size=2, seed=seed)
    exp = collect_experience(cfg, engine, tok, loader, step=step, dp_rank=dp_rank)
    assert exp.stats["rollout/refill_shortfall"] == 2.0
    assert exp.advantages.tolist() == [0.0] * (2 * N)
    return [params.seed for _, params in engine.calls]


def test_seeds_per_round_replica_and_step(tok):
    base = _seeds(tok, step=5, dp_rank=0)
    assert len(base) == 3 and len(set(base)) == 3  # one seed per round, all different
    assert all(isinstance(x, int) and x >= 0 for x in base)
    assert _seeds(tok, step=5, dp_rank=0) == base  # same (seed, step, dp_rank): same seeds
    other_rank = _seeds(tok, step=5, dp_rank=1)
    other_step = _seeds(tok, step=6, dp_rank=0)
    other_seed = _seeds(tok, step=5, dp_rank=0, seed=99)
    for other in (other_rank, other_step, other_seed):
        assert len(set(other)) == 3
        assert not set(other) & set(base)
    assert not set(other_rank) & set(other_step)
