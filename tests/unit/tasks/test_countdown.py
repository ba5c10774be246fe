"""The countdown task: generation (deterministic, solvable, content-disjoint held-out split), the solution
enumerator against an independent brute force, and the verifier (every valid solution accepted, not only the
trace's; malformed and wrong ones rejected); its config fields' errors."""

from __future__ import annotations

import itertools

import pytest

from megatron_entcov.config import DataConfig
from megatron_entcov.tasks import score
from megatron_entcov.tasks.countdown import CountdownTask, check_solution, parse_reference, solutions
from megatron_entcov.tasks.prompts import PromptDataset, PromptLoader, build_dataset
from megatron_entcov.tasks.tokenizer import build_char_tokenizer


def _brute_force_targets(numbers, max_value):
    """Every value reachable using all numbers (any order, any pairing), intermediates in [0, max_value]:
    written independently of the module, over lists instead of sorted tuples."""
    if len(numbers) == 1:
        return {numbers[0]}
    out = set()
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [numbers[k] for k in range(len(numbers)) if k not in (i, j)]
        x, y = numbers[i], numbers[j]
        for z in (x + y, x - y, x * y):
            if 0 <= z <= max_value:
                out |= _brute_force_targets(rest + [z], max_value)
    return out


def test_problems_are_deterministic_and_solvable_by_their_trace():
    task = CountdownTask(seed=7)
    problems = [task.problem(i) for i in range(300)]
    assert problems == [CountdownTask(seed=7).problem(i) for i in range(300)]
    assert [p.prompt for p in problems] != [CountdownTask(seed=8).problem(i).prompt for i in range(300)]
    rewards, stats = score("countdown", [p.trace for p in problems], [p.answer for p in problems], timeout_s=1.0)
    assert rewards == [1.0] * 300 and stats["reward/parse_fail_frac"] == 0.0
    for p in problems:
        numbers, target = parse_reference(p.answer)
        assert p.prompt == p.answer + "\n" and list(numbers) == sorted(numbers)
        assert len(p.trace.strip().split("\n")) == 3 and p.num_solutions >= 1
    # several paths are the rule, not the exception (the point of the task)
    assert sum(p.num_solutions >= 2 for p in problems) > 0.8 * len(problems)


def test_solutions_match_brute_force_and_each_verifies():
    for numbers in [(1, 2, 3, 7), (2, 2, 5, 9), (3, 4, 6, 8)]:
        reachable = _brute_force_targets(list(numbers), 99)
        for target in range(0, 100):
            sols = solutions(numbers, target, 99)
            assert bool(sols) == (target in reachable), (numbers, target)
            spec = " ".join(map(str, numbers)) + f"={target}"
            for sol in sols[:20]:
                assert check_solution("\n".join(sol), numbers, target).reward == 1.0, (spec, sol)


def test_verifier_accepts_any_valid_solution_and_rejects_bad_ones():
    ref = "2 3 5 7=36"
    # two different paths (the second writes operands in the other order, no final newline), and the first
    # as decoded with special tokens kept
    good = ["5*7=35\n3-2=1\n35+1=36\n", "7*5=35\n35+3=38\n38-2=36", "  5*7=35\n3-2=1\n35+1=36\n<eos><pad><pad>"]
    rewards, _ = score("countdown", good, [ref] * len(good), timeout_s=1.0)
    assert rewards == [1.0, 1.0, 1.0]
    bad = {
        "3*2=6\n6*7=42\n42-5=37\n": "ok",          # valid steps, wrong final value
        "5*7=35\n35+1=36\n": "ok",                 # 1 was never available
        "5*7=35\n5+3=8\n": "ok",                   # 5 used twice
        "5*7=36\n36+3=39\n39-2=37": "ok",          # wrong arithmetic
        "2-3=-1\n": "parse_fail",                  # negative intermediate (not a step line)
        "7*5=35\n35+3=38\n": "ok",                 # stops early: 2 unused
        "5*7=35\n3-2=1\n35+1=36\n1+1=2": "ok",     # a step after the target with unavailable numbers
        "": "parse_fail",
        "36": "parse_fail",
        "5*7=35 and then": "parse_fail",
        "5x7=35": "parse_fail",
    }
    from megatron_entcov.tasks import get_verifier

    results = get_verifier("countdown").verify_batch(list(bad), [ref] * len(bad), timeout_s=1.0)
    assert [r.reward for r in results] == [0.0] * len(bad)
    assert [r.status for r in results] == list(bad.values())


def test_verifier_rejects_malformed_references():
    with pytest.raises(ValueError, match="not a countdown problem"):
        score("countdown", ["1+1=2"], ["36"], timeout_s=1.0)


def test_held_out_split_is_disjoint_from_training_by_content():
    tok = build_char_tokenizer()
    cfg = DataConfig(source="countdown", reward="countdown", held_out_share=0.2)
    ds = build_dataset(cfg, tok, max_prompt_len=16, seed=3)
    held = {it.prompt_text for it in ds.held_out(40)}
    loader = PromptLoader(ds, batch_size=64, seed=3)
    seen = set()
    for _ in range(15):
        for it in loader.next_batch():
            assert it.sft_target is not None and it.sft_target.endswith("\n")
            seen.add(it.prompt_text)
    assert held and not held & seen
    # the same problem under another seed's stream is held out too (the split hashes the content)
    other = build_dataset(cfg, tok, max_prompt_len=16, seed=4)
    mine = {ds.get(j).prompt_text: ds.is_held_out(j) for j in range(300)}
    shared = [(mine[t], other.is_held_out(i)) for i in range(300) if (t := other.get(i).prompt_text) in mine]
    assert shared and all(a == b for a, b in shared)


def test_countdown_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.reward"):
        DataConfig(source="countdown", reward="arithmetic")
    with pytest.raises(ValueError, match="data.countdown_numbers"):
        DataConfig(source="countdown", reward="countdown", countdown_numbers=7)
    with pytest.raises(ValueError, match="data.countdown_max_value"):
        DataConfig(source="countdown", reward="countdown", countdown_max_number=20, countdown_max_value=10)
    with pytest.raises(ValueError, match="rollout.max_prompt_len"):
        PromptDataset.from_task(CountdownTask(seed=0), build_char_tokenizer(), max_prompt_len=8)
