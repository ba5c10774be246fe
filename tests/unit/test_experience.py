"""collect_experience on one process with a scripted engine: rewards and GRPO group advantages against a hand
computation, dynamic sampling (drop, refill, shortfall) and its statistics, and the per-round/per-replica seeds."""

import hashlib
import math
import threading

import pytest
import torch

from megatron_entcov.config import load_config
from megatron_entcov.experience import collect_experience, shard_rows
from megatron_entcov.rollout.engine import RolloutEngine
from megatron_entcov.rollout.types import Sample
from megatron_entcov.tasks.arithmetic import ArithmeticTask
from megatron_entcov.tasks.prompts import PromptLoader, build_dataset
from megatron_entcov.tasks.tokenizer import build_char_tokenizer

N = 4  # samples per prompt

# Scripted outcomes per response: 1 = the correct answer, 0 = a wrong integer, "x" = unparseable text.
C, W, X = 1, 0, "x"
ALL_RIGHT, ALL_WRONG, ALL_X = [C] * N, [W] * N, [X] * N


class ScriptedEngine(RolloutEngine):
    """Answers call k's group g with script[k][g] (one outcome per response); records prompts and params."""

    def __init__(self, tok, answers, script):
        self.tok, self.answers, self.script = tok, answers, script
        self.calls = []  # (prompts, params) per generate call
        self.seeds = []  # the per-entry seeds of each call (None when not given); the script draws no randomness

    def generate(self, prompts, params, *, seeds=None):
        call = len(self.calls)
        self.calls.append((prompts, params))
        self.seeds.append(None if seeds is None else list(seeds))
        groups = self.script[min(call, len(self.script) - 1)]
        assert len(prompts) == len(groups) * N
        return [self.respond(prompt, groups[i // N][i % N], i) for i, prompt in enumerate(prompts)]

    def respond(self, prompt, outcome, index):
        """The Sample of one scripted outcome: the right answer, a wrong integer or unparseable text."""
        answer = self.answers[tuple(prompt)]
        text = {C: answer, W: str(int(answer) + 1), X: "="}[outcome]
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return Sample(prompt_ids=list(prompt), response_ids=ids, rollout_logprobs=[-0.5] * len(ids),
                      finish_reason="stop", weight_version=0, index=index)

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


def _seeds(tok, *, step, dp_rank, dp_size, seed=1234):
    """The per-sample seeds one replica passes to its engine, round by round (every group degenerate, so all
    1 + 2 rounds run); the gather fakes the other replicas with copies of this one's payload."""
    cfg, engine, loader, _ = _setup(tok, [[ALL_RIGHT] * (2 // dp_size) + [ALL_WRONG] * (2 // dp_size)],
                                    prompts=4 // dp_size, dynamic=True, refills=2, dp_size=dp_size, seed=seed)
    exp = collect_experience(cfg, engine, tok, loader, step=step, dp_rank=dp_rank, dp_size=dp_size,
                             gather=lambda payload: [payload] * dp_size)
    assert exp.stats["rollout/refill_shortfall"] == 4.0
    return engine.seeds


def _independent_seed(*parts):
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little") \
        & ((1 << 63) - 1)


def test_sample_seeds_depend_on_global_position_not_on_the_layout(tok):
    one = _seeds(tok, step=5, dp_rank=0, dp_size=1)
    assert len(one) == 3                                   # three rounds of 4 prompts x N samples
    for round_idx, seeds in enumerate(one):
        assert seeds == [_independent_seed(1234, 5, round_idx, g, j) for g in range(4) for j in range(N)]
    halves = [_seeds(tok, step=5, dp_rank=r, dp_size=2) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == one         # replica r generates prompts 2r, 2r + 1 of each round
    assert not set(_seeds(tok, step=6, dp_rank=0, dp_size=1)[0]) & set(one[0])
    assert not set(_seeds(tok, step=5, dp_rank=0, dp_size=1, seed=99)[0]) & set(one[0])


class SeededEngine(ScriptedEngine):
    """The outcome of a response is a function of its seed only (as with a real engine's per-request seeds):
    seed % 4 -> right, wrong, wrong, unparseable; lengths vary with the outcome."""

    def generate(self, prompts, params, *, seeds=None):
        assert seeds is not None and len(seeds) == len(prompts)
        return [self.respond(prompt, {0: C, 1: W, 2: W, 3: X}[seed % 4], i)
                for i, (prompt, seed) in enumerate(zip(prompts, seeds))]


def _collect_as_replicas(tok, dp_size, *, prompts=8, dynamic=True):
    """collect_experience on dp_size replicas (threads) whose gather exchanges their real payloads."""
    results = [None] * dp_size

    def replica(rank, gather):
        cfg, engine, loader, _ = _setup(tok, [[]], prompts=prompts // dp_size, dynamic=dynamic, refills=3,
                                        dp_size=dp_size)
        engine = SeededEngine(tok, engine.answers, [[]])
        results[rank] = collect_experience(cfg, engine, tok, loader, step=2, dp_rank=rank, dp_size=dp_size,
                                           gather=gather)

    _run_replicas(replica, dp_size)
    return results


def _run_replicas(replica, dp_size):
    """Run ``replica(rank, gather)`` on dp_size threads whose gather exchanges their real payloads."""
    barrier = threading.Barrier(dp_size)
    slots = [None] * dp_size

    def gather_of(rank):
        def gather(payload):
            slots[rank] = payload
            barrier.wait()
            parts = list(slots)
            barrier.wait()
            return parts
        return gather

    threads = [threading.Thread(target=replica, args=(r, gather_of(r))) for r in range(dp_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


@pytest.mark.parametrize("dynamic", [False, True])
def test_global_experience_is_the_same_for_every_data_parallel_size(tok, dynamic):
    (single,) = _collect_as_replicas(tok, 1, dynamic=dynamic)
    if dynamic:
        assert single.stats["reward/degenerate_group_frac"] > 0   # the refill path ran
    for dp in (2, 4):
        for exp in _collect_as_replicas(tok, dp, dynamic=dynamic):
            assert [x.to_dict() for x in exp.samples] == [x.to_dict() for x in single.samples]
            assert torch.equal(exp.rewards, single.rewards) and torch.equal(exp.advantages, single.advantages)
            timeless = {k: v for k, v in exp.stats.items() if "time" not in k}
            assert timeless == {k: v for k, v in single.stats.items() if "time" not in k}
    # reward/mean_all counts every generated response, dropped groups too; reward/mean only the kept ones.
    assert single.stats["reward/mean"] == pytest.approx(single.rewards.mean().item())
    if not dynamic:
        assert single.stats["reward/mean_all"] == pytest.approx(single.stats["reward/mean"])


def test_a_failing_replica_fails_every_replica(tok):
    class Failing(SeededEngine):
        def generate(self, prompts, params, *, seeds=None):
            raise OSError("server gone")

    errors = [None, None]

    def replica(rank, gather):
        cfg, engine, loader, _ = _setup(tok, [[]], prompts=2, dp_size=2)
        engine = (Failing if rank == 1 else SeededEngine)(tok, engine.answers, [[]])
        try:
            collect_experience(cfg, engine, tok, loader, step=0, dp_rank=rank, dp_size=2, gather=gather)
        except Exception as err:
            errors[rank] = err

    _run_replicas(replica, 2)
    assert isinstance(errors[1], OSError)
    assert isinstance(errors[0], RuntimeError) and "replica 1: OSError: server gone" in str(errors[0])


@pytest.mark.parametrize("dp, mini", [(1, 2), (2, 2), (2, 1), (4, 2)])
def test_shard_rows_gives_each_replica_its_slice_of_every_mini_batch(dp, mini):
    rows = 16
    shards = [shard_rows(rows, num_mini_batches=mini, dp_rank=r, dp_size=dp) for r in range(dp)]
    per_mini = rows // mini
    for i in range(mini):
        # Global mini-batch i is rows [i * per_mini, (i + 1) * per_mini) whatever dp is: the replicas' i-th
        # chunks (what TrainBatch.split(mini) gives each of them) are its consecutive pieces, in rank order.
        chunks = [s[i * (per_mini // dp):(i + 1) * (per_mini // dp)] for s in shards]
        assert sum(chunks, []) == list(range(i * per_mini, (i + 1) * per_mini))
    with pytest.raises(ValueError, match="do not split"):
        shard_rows(10, num_mini_batches=2, dp_rank=0, dp_size=4)
