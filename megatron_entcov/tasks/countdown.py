"""The countdown task: reach a target by combining given numbers, with a step-by-step scratchpad; its verifier.

A search problem with many correct paths, where entropy control can pay off (pass@k far above greedy).
Format: prompt "2 3 5 7=36\\n" (numbers ascending), response one step per line "5*7=35\\n3-2=1\\n35+1=36\\n" then
<eos>, answer (the verifier's reference) "2 3 5 7=36". Rules: each step combines two available numbers with
'+', '-' or '*' into a non-negative z = x op y; the last number left must be the target, every given number
used. The verifier simulates the steps (any valid solution scores 1.0); text that is not step lines is a parse
failure. ``CountdownTask.problem(index)`` depends on (seed, index) only; its SFT trace is any of ``solutions``.

Example:
    task = CountdownTask(seed=1234)
    p = task.problem(0)     # CountdownProblem(prompt='1 4 6 8=..\\n', answer='1 4 6 8=..', trace='...')
    score("countdown", [p.trace], [p.answer], timeout_s=1.0)     # ([1.0], ...)

Design notes: docs/design/tasks.md
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from megatron_entcov.tasks.verifiers import PureVerifier, VerifyResult, register_verifier

COUNTDOWN_OPS = "+-*"
_STEP_RE = re.compile(r"([0-9]+)([+\-*])([0-9]+)=([0-9]+)")
_REFERENCE_RE = re.compile(r"\s*([0-9]+(?: [0-9]+)*)=([0-9]+)\s*")
_MAX_DIGITS = 12  # numbers in a response longer than this are not a solution (and int() stays cheap)


@dataclass(frozen=True)
class CountdownProblem:
    """One generated problem."""

    prompt: str
    """What the model sees, e.g. "2 3 5 7=36\\n" (numbers ascending: the text is the problem's content)."""
    answer: str
    """The reference for the verifier: the problem without the newline, "2 3 5 7=36"."""
    trace: str
    """A reference solution (SFT target), one step per line, drawn among all solutions:
    "5*7=35\\n3-2=1\\n35+1=36\\n"."""
    num_solutions: int
    """Distinct step sequences that solve the problem within max_value (a measure of how many paths exist)."""


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _steps_from(numbers: tuple[int, ...], max_value: int) -> list[tuple[int, str, int, int, tuple[int, ...]]]:
    """Every legal step from a multiset (sorted tuple): (x, op, y, z, the multiset after it), x >= y for '-'."""
    out, seen = [], set()
    n = len(numbers)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            x, y = numbers[i], numbers[j]
            for op in COUNTDOWN_OPS:
                if op in "+*" and i > j:  # commutative: write each unordered pair once, larger first
                    continue
                if op in "+*" and x < y:
                    x_, y_ = y, x
                else:
                    x_, y_ = x, y
                z = _apply(x_, op, y_)
                if not 0 <= z <= max_value:
                    continue
                rest = tuple(sorted([numbers[k] for k in range(n) if k not in (i, j)] + [z]))
                key = (x_, op, y_, rest)
                if key not in seen:
                    seen.add(key)
                    out.append((x_, op, y_, z, rest))
    return out


@lru_cache(maxsize=65536)
def solutions(numbers: tuple[int, ...], target: int, max_value: int) -> tuple[tuple[str, ...], ...]:
    """Every solution (a tuple of step lines "x op y=z") of a problem, intermediate values in [0, max_value].

    ``numbers`` must be sorted. Steps with the same operands written in the other order ("3+5" vs "5+3") are
    counted once, larger operand first; the verifier accepts either order.
    """
    if len(numbers) == 1:
        return ((),) if numbers[0] == target else ()
    found = []
    for x, op, y, z, rest in _steps_from(numbers, max_value):
        for tail in solutions(rest, target, max_value):
            found.append((f"{x}{op}{y}={z}", *tail))
    return tuple(found)


class CountdownTask:
    """Deterministic generator of countdown problems: ``task.problem(index)`` depends only on (seed, index).

    Args:
        seed: run seed (RunConfig.seed).
        num_numbers: numbers given per problem (DataConfig.countdown_numbers), 2..6; num_numbers - 1 steps.
        max_number: the given numbers are drawn from 1..max_number (DataConfig.countdown_max_number), 2..99.
        max_value: every intermediate value of the generating path and of the SFT trace lies in [0, max_value]
            (DataConfig.countdown_max_value); the verifier itself accepts any non-negative value.
    """

    def __init__(self, seed: int, num_numbers: int = 4, max_number: int = 9, max_value: int = 99) -> None:
        if not isinstance(num_numbers, int) or not 2 <= num_numbers <= 6:
            raise ValueError(f"data.countdown_numbers={num_numbers!r} is invalid: use an integer in [2, 6]")
        if not isinstance(max_number, int) or not 2 <= max_number <= 99:
            raise ValueError(f"data.countdown_max_number={max_number!r} is invalid: use an integer in [2, 99]")
        if not isinstance(max_value, int) or max_value < max_number:
            raise ValueError(f"data.countdown_max_value={max_value!r} is invalid: use an integer >= "
                             f"data.countdown_max_number={max_number}")
        self.seed = int(seed)
        self.num_numbers, self.max_number, self.max_value = num_numbers, max_number, max_value

    def __repr__(self) -> str:
        return (f"CountdownTask(seed={self.seed}, num_numbers={self.num_numbers}, max_number={self.max_number}, "
                f"max_value={self.max_value})")

    def problem(self, index: int) -> CountdownProblem:
        """Problem number ``index`` (any integer >= 0)."""
        if index < 0:
            raise ValueError(f"CountdownTask.problem: index={index} must be >= 0")
        rng = random.Random(f"countdown/{self.seed}/{index}")
        numbers = tuple(sorted(rng.randint(1, self.max_number) for _ in range(self.num_numbers)))
        pool = list(numbers)
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            op = rng.choice(COUNTDOWN_OPS)
            x, y = (max(pool[i], pool[j]), min(pool[i], pool[j])) if op == "-" else (pool[i], pool[j])
            z = _apply(x, op, y)
            if z > self.max_value:
                continue  # resample this step; '+' always fits once '*' does not, so this ends
            pool = [pool[k] for k in range(len(pool)) if k not in (i, j)] + [z]
        target = pool[0]
        sols = solutions(numbers, target, self.max_value)
        assert sols, (numbers, target)  # the generating path is one
        trace = "".join(line + "\n" for line in rng.choice(sols))
        spec = " ".join(map(str, numbers)) + f"={target}"
        return CountdownProblem(prompt=spec + "\n", answer=spec, trace=trace, num_solutions=len(sols))

    def longest_prompt(self) -> str:
        """A prompt of the greatest possible length (for checking it against rollout.max_prompt_len)."""
        return " ".join([str(self.max_number)] * self.num_numbers) + f"={self.max_value}\n"


def parse_reference(answer: str) -> tuple[tuple[int, ...], int]:
    """(sorted numbers, target) of a reference "2 3 5 7=36". Raises ValueError on anything else."""
    m = _REFERENCE_RE.fullmatch(answer) if isinstance(answer, str) else None
    if m is None:
        raise ValueError(f"countdown verifier: reference answer {answer!r} is not a countdown problem such as "
                         f"'2 3 5 7=36' (is data.reward right for this data set?)")
    return tuple(sorted(int(t) for t in m.group(1).split())), int(m.group(2))


def check_solution(response: str, numbers: Sequence[int], target: int) -> VerifyResult:
    """Simulate the response's steps on the numbers (the rules: see the module docstring)."""
    text = response.split("<eos>", 1)[0].replace("<pad>", "").strip()
    lines = [line.strip() for line in text.split("\n")] if text else []
    steps = []
    for line in lines:
        m = _STEP_RE.fullmatch(line)
        if m is None or any(len(g) > _MAX_DIGITS for g in (m.group(1), m.group(3), m.group(4))):
            return VerifyResult(0.0, "parse_fail")
        steps.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    if not steps:
        return VerifyResult(0.0, "parse_fail")
    pool = list(numbers)
    for x, op, y, z in steps:
        for v in (x, y):
            if v not in pool:
                return VerifyResult(0.0, "ok")      # a number that is not (or no longer) available
            pool.remove(v)
        if _apply(x, op, y) != z:
            return VerifyResult(0.0, "ok")          # wrong arithmetic (this also rejects negative results)
        pool.append(z)
    return VerifyResult(1.0 if pool == [target] else 0.0, "ok")


@register_verifier("countdown")
class CountdownVerifier(PureVerifier):
    """Countdown verifier: accepts every correct sequence of steps (format and rules: the module docstring).
    Linear in the response length (numbers capped at _MAX_DIGITS digits): nothing can hang."""

    name = "countdown"

    def verify_one(self, response: str, answer: str, index: int) -> VerifyResult:
        numbers, target = parse_reference(answer)
        if not isinstance(response, str):
            return VerifyResult(0.0, "parse_fail")
        return check_solution(response, numbers, target)
