"""The synthetic verifiable task: integer arithmetic problems generated from (seed, index), and its verifier.

Format: prompt "12+34=" (no spaces; num_operands=3: "7*12-5="), answer the exact integer "46" (negative:
"3-41=" -> "-38"), response the answer then <eos>. Operands draw a digit count from 1..digits, then a value
with that many digits; operators come from ``ops`` with the usual precedence; problem ``index`` of ``seed`` is
the same on every machine. Verifier ("arithmetic"): the integer the response begins with (after whitespace;
leading zeros ignored) must equal the reference: 1.0, else 0.0; a response that does not begin with an integer
is a parse failure; trailing text does not change the reward.

Example:
    task = ArithmeticTask(seed=1234, digits=2, ops="+-")
    p = task.problem(0)                                            # ArithmeticProblem(prompt, answer)
    score("arithmetic", [p.answer + "<eos>"], [p.answer], timeout_s=1.0)     # ([1.0], ...)

Design notes: docs/design/tasks.md
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_entcov.tasks.verifiers import PureVerifier, VerifyResult, register_verifier

VALID_OPS = "+-*"
_ANSWER_RE = re.compile(r"\s*(-?[0-9]+)")
_REFERENCE_RE = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One generated problem."""

    prompt: str
    """The prompt text, e.g. "12+34="."""
    answer: str
    """The exact integer answer in decimal, e.g. "46"."""


class ArithmeticTask:
    """Deterministic generator of arithmetic problems: `task.problem(index)` depends only on (seed, index).

    Args:
        seed: run seed (RunConfig.seed).
        digits: operands have 1..digits digits (DataConfig.arithmetic_digits), 1 <= digits <= 18.
        ops: operators to draw from, a non-empty subset of "+-*" (DataConfig.arithmetic_ops).
        num_operands: operands per problem, >= 2.

    Example:
        task = ArithmeticTask(seed=1234, digits=2, ops="+-")
        p = task.problem(0)     # ArithmeticProblem(prompt='..=', answer='..'), the same on every call
    """

    def __init__(self, seed: int, digits: int = 2, ops: str = "+-", num_operands: int = 2) -> None:
        if not isinstance(digits, int) or not 1 <= digits <= 18:
            raise ValueError(f"data.arithmetic_digits={digits!r} is invalid: use an integer in [1, 18]")
        if not ops or set(ops) - set(VALID_OPS):
            raise ValueError(f"data.arithmetic_ops={ops!r} is invalid: use a non-empty subset of {VALID_OPS!r}")
        if not isinstance(num_operands, int) or num_operands < 2:
            raise ValueError(f"num_operands={num_operands!r} is invalid: use an integer >= 2")
        self.seed = int(seed)
        self.digits = digits
        self.ops = "".join(sorted(set(ops), key=VALID_OPS.index))  # canonical order: same draws for "-+" and "+-"
        self.num_operands = num_operands

    def __repr__(self) -> str:
        return (f"ArithmeticTask(seed={self.seed}, digits={self.digits}, ops={self.ops!r}, "
                f"num_operands={self.num_operands})")

    def problem(self, index: int) -> ArithmeticProblem:
        """Problem number `index` (any integer >= 0)."""
        if index < 0:
            raise ValueError(f"ArithmeticTask.problem: index={index} must be >= 0")
        rng = random.Random(f"arithmetic/{self.seed}/{index}")
        operands = []
        for _ in range(self.num_operands):
            n = rng.randint(1, self.digits)
            operands.append(rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1))
        ops = [rng.choice(self.ops) for _ in range(self.num_operands - 1)]
        prompt = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="
        return ArithmeticProblem(prompt=prompt, answer=str(evaluate(operands, ops)))

    def longest_prompt(self) -> str:
        """A prompt of the greatest possible length (for checking it against rollout.max_prompt_len)."""
        return "*".join(["9" * self.digits] * self.num_operands) + "="


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Exact value of operands[0] ops[0] operands[1] ... with '*' before '+'/'-', left to right."""
    assert len(ops) == len(operands) - 1, (operands, ops)
    total, term = 0, operands[0]
    sign = 1
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            term *= b
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), b
    return total + sign * term


def _normalize_integer(text: str) -> str:
    """'-046' -> '-46', '-0' -> '0'. Compared as strings, so no int() digit limit applies."""
    negative = text.startswith("-")
    digits = text.lstrip("-").lstrip("0") or "0"
    return "-" + digits if negative and digits != "0" else digits


def parse_integer_answer(response: str) -> str | None:
    """The normalised integer the response begins with (after optional whitespace), or None (parse failure)."""
    m = _ANSWER_RE.match(response)
    return _normalize_integer(m.group(1)) if m else None


@register_verifier("arithmetic")
class ArithmeticVerifier(PureVerifier):
    """Exact-match verifier of the arithmetic task (format: see the module docstring). Parsing a leading integer
    is linear in the response length: no time-out needed."""

    name = "arithmetic"

    def verify_one(self, response: str, answer: str, index: int) -> VerifyResult:
        ref = answer.strip() if isinstance(answer, str) else answer
        if not isinstance(ref, str) or not _REFERENCE_RE.fullmatch(ref):
            raise ValueError(f"arithmetic verifier: reference answer {index} is {answer!r}; expected an integer "
                             f"string such as '46' or '-38' (is data.reward right for this data set?)")
        got = parse_integer_answer(response) if isinstance(response, str) else None
        if got is None:
            return VerifyResult(0.0, "parse_fail")
        return VerifyResult(1.0 if got == _normalize_integer(ref) else 0.0, "ok")
