"""The synthetic verifiable task: integer arithmetic problems generated from (seed, index), and its verifier.

Format (what the quickstart's character-level model learns):
    prompt text   "<a><op><b>=", e.g. "12+34=" (no spaces; with num_operands=3: "7*12-5=")
    answer        the exact integer value in decimal, e.g. "46"; negative values start with '-': "3-41=" -> "-38"
    response      the answer followed by the end-of-sequence token, i.e. the tokens "4", "6", <eos>.

Operands and operators:
  - Each operand first draws its digit count uniformly from 1..digits, then its value uniformly among the
    numbers with that many digits (0-9 for one digit). Mixing lengths gives a small model easy problems to start
    from; `digits` is the difficulty knob (DataConfig.arithmetic_digits), `num_operands` a second one.
  - Operators are drawn uniformly from `ops` (a subset of "+-*"). The value follows the usual precedence ('*'
    before '+'/'-', left to right), computed exactly with Python integers.
  - Problem `index` of seed `seed` is the same on every machine and Python version (random.Random seeded with a
    string is hashed with SHA-512, independent of PYTHONHASHSEED).

Verifier ("arithmetic"): the response must begin, after optional whitespace, with an integer: an optional '-'
then ASCII digits. The digits end at the first character that is not a digit (the end-of-answer marker: <eos>
when the tokenizer's special tokens are kept in the decoded text, end of text when they are stripped, anything
else otherwise). Reward 1.0 when that integer equals the reference (leading zeros ignored: "046" == "46"),
else 0.0. A response that does not begin with an integer ("", "abc", "--5", "=46") is a parse failure (0.0,
counted). Trailing text after the integer does not change the reward; a model that never emits <eos> is held
back by the response-length limit instead.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_entcov.tasks.verifiers import VerifyResult, register_verifier

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
class ArithmeticVerifier:
    """Exact-match verifier of the arithmetic task (format: see the module docstring). No time-out needed."""

    name = "arithmetic"

    def __repr__(self) -> str:
        return "ArithmeticVerifier()"

    def verify_batch(self, responses: Sequence[str], answers: Sequence[str], *,
                     timeout_s: float = 0.0) -> list[VerifyResult]:
        del timeout_s  # parsing a leading integer is linear in the response length; nothing can hang
        results = []
        for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            ref = answer.strip() if isinstance(answer, str) else answer
            if not isinstance(ref, str) or not _REFERENCE_RE.fullmatch(ref):
                raise ValueError(f"arithmetic verifier: reference answer {i} is {answer!r}; expected an integer "
                                 f"string such as '46' or '-38' (is data.reward right for this data set?)")
            got = parse_integer_answer(response) if isinstance(response, str) else None
            if got is None:
                results.append(VerifyResult(0.0, "parse_fail"))
            else:
                results.append(VerifyResult(1.0 if got == _normalize_integer(ref) else 0.0, "ok"))
        return results

    def close(self) -> None:
        pass
