"""Verifiers: registry, arithmetic task and verifier, boxed extraction, math-verify equivalences, time-outs."""

import textwrap
import time

import pytest

from megatron_entcov.tasks import VerifyResult, get_verifier, register_verifier, score, summarize, verifier_names
from megatron_entcov.tasks.arithmetic import ArithmeticTask, evaluate, parse_integer_answer
from megatron_entcov.tasks.math import MathVerifier, extract_answer, extract_last_boxed, math_verify_check

# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    assert {"arithmetic", "math"} <= set(verifier_names())
    assert get_verifier("arithmetic") is get_verifier("arithmetic")
    with pytest.raises(ValueError, match=r"'nope' is not a registered verifier.*'arithmetic'.*'math'"):
        get_verifier("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("arithmetic")(lambda: None)


def test_score_checks_lengths_and_timeout():
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        score("arithmetic", ["1", "2"], ["1"], timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        score("arithmetic", ["1"], ["1"], timeout_s=0.0)


def test_summarize_fractions():
    stats = summarize([VerifyResult(1.0), VerifyResult(0.0, "parse_fail"), VerifyResult(0.0, "timeout"),
                       VerifyResult(0.0, "parse_fail")])
    assert set(stats) == {"reward/parse_fail_frac", "reward/timeout_frac", "reward/error_frac"}
    assert stats["reward/parse_fail_frac"] == 0.5
    assert stats["reward/timeout_frac"] == 0.25 and stats["reward/error_frac"] == 0.0
    assert summarize([])["reward/parse_fail_frac"] == 0.0


# ---------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_task_is_deterministic_and_correct():
    task = ArithmeticTask(seed=7, digits=3, ops="+-*", num_operands=3)
    again = ArithmeticTask(seed=7, digits=3, ops="*-+", num_operands=3)  # same set of ops, same draws
    other = ArithmeticTask(seed=8, digits=3, ops="+-*", num_operands=3)
    probs = [task.problem(i) for i in range(300)]
    assert probs == [again.problem(i) for i in range(300)]
    assert probs != [other.problem(i) for i in range(300)]
    saw_negative = False
    for p in probs:
        assert p.prompt.endswith("=") and " " not in p.prompt
        expr = p.prompt[:-1]
        assert int(p.answer) == eval(expr)  # noqa: S307 - digits and +-* only, generated here
        operands = expr.replace("+", " ").replace("-", " ").replace("*", " ").split()
        assert len(operands) == 3 and all(1 <= len(a) <= 3 for a in operands)
        assert all(a == "0" or not a.startswith("0") for a in operands)
        saw_negative |= p.answer.startswith("-")
    assert saw_negative
    assert {len(a) for p in probs for a in p.prompt[:-1].replace("-", "+").replace("*", "+").split("+")} == {1, 2, 3}


def test_arithmetic_fixed_values_and_precedence():
    # Pinned: problem ids are part of the data order of saved runs.
    task = ArithmeticTask(seed=1234, digits=2, ops="+-")
    assert [(task.problem(i).prompt, task.problem(i).answer) for i in range(4)] == [
        ("8+90=", "98"), ("8+4=", "12"), ("0-5=", "-5"), ("34-76=", "-42")]
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([2, 3, 4, 5], ["-", "*", "-"]) == -15
    assert evaluate([12, 34], ["+"]) == 46
    assert task.longest_prompt() == "99*99="


def test_arithmetic_task_rejects_bad_args():
    with pytest.raises(ValueError, match="arithmetic_digits"):
        ArithmeticTask(seed=0, digits=0)
    with pytest.raises(ValueError, match="arithmetic_ops"):
        ArithmeticTask(seed=0, ops="+/")
    with pytest.raises(ValueError, match="num_operands"):
        ArithmeticTask(seed=0, num_operands=1)


@pytest.mark.parametrize("response,parsed", [
    ("46", "46"), ("46<eos>", "46"), (" \n46<eos><pad><pad>", "46"), ("46+1", "46"), ("046", "46"),
    ("-38", "-38"), ("-0", "0"), ("12345678901234567890123", "12345678901234567890123"),
    ("", None), ("abc", None), ("--5", None), ("=46", None), ("+46", None), ("<eos>", None), ("４６", None),
])
def test_parse_integer_answer(response, parsed):
    assert parse_integer_answer(response) == parsed


def test_arithmetic_verifier_scores_and_counts():
    responses = ["46<eos>", "47", "hello", "-38", "5" * 5000, ""]
    answers = ["46", "46", "46", "-38", "5" * 5000, "1"]
    rewards, stats = score("arithmetic", responses, answers, timeout_s=1.0)
    assert rewards == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert stats["reward/parse_fail_frac"] == pytest.approx(2 / 6)
    assert stats["reward/timeout_frac"] == 0.0
    with pytest.raises(ValueError, match=r"reference answer 0 is '1/2'"):
        score("arithmetic", ["1"], ["1/2"], timeout_s=1.0)


# ---------------------------------------------------------------------------------------------- boxed extraction


@pytest.mark.parametrize("text,content", [
    ("The answer is \\boxed{34}.", "34"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"),
    ("\\boxed{2} and then \\boxed{3", "2"),
    ("\\boxed{5", None),
    ("no box at all: 34", None),
    ("", None),
])
def test_extract_last_boxed(text, content):
    assert extract_last_boxed(text) == content


@pytest.mark.parametrize("text,answer,boxed_only", [
    ("so \\boxed{34}. Answer: 35", "34", "34"),              # a box wins over an answer line
    ("work\nAnswer: $\\frac{1}{2}$.", "\\frac{1}{2}", None),  # DAPO prompt format
    ("**Answer:** 34", "34", None),
    ("Answer: 3\nmore\nFinal answer: 4 ", "4", None),        # the last one
    ("Answer:   \n", None, None),
    ("I give up", None, None),
    ("\\boxed{}", None, None),
])
def test_extract_answer_falls_back_to_answer_line(text, answer, boxed_only):
    assert extract_answer(text) == answer
    assert extract_answer(text, answer_line=False) == boxed_only


# ---------------------------------------------------------------------------------------------- math-verify


@pytest.mark.parametrize("pred,gold,expected", [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("2^{1/2}", "\\sqrt{2}", True),
    ("1+x^2", "x^2+1", True),
    ("35", "34", False),
    ("\\frac{1}{3}", "0.5", False),
    ("34", "$34$", True),
])
def test_math_verify_check_equivalences(pred, gold, expected):
    assert math_verify_check(pred, gold) is expected


@pytest.fixture(scope="module")
def math_verifier():
    verifier = MathVerifier(num_workers=2)
    yield verifier
    verifier.close()


def test_math_verifier_scores_through_workers(math_verifier):
    responses = [
        "So x = \\boxed{0.5}.",                 # equivalent
        "\\boxed{34}",                          # string-equal (no worker)
        "I think 34",                           # no box: parse failure
        "\\boxed{\\frac{1}{3}}",                # wrong
        "First \\boxed{1}, finally \\boxed{x^2+1}",
        "\\boxed{}",                            # empty: parse failure
        "Steps...\nAnswer: $0.50$",             # DAPO answer line, equivalent
    ]
    answers = ["\\frac{1}{2}", "34", "34", "0.5", "1+x^2", "3", "\\frac{1}{2}"]
    results = math_verifier.verify_batch(responses, answers, timeout_s=5.0)
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert [r.status for r in results] == ["ok", "ok", "parse_fail", "ok", "ok", "parse_fail", "ok"]


def test_score_math_by_name():
    rewards, stats = score("math", ["\\boxed{\\frac{2}{4}}", "nothing"], ["0.5", "0.5"], timeout_s=5.0)
    assert rewards == [1.0, 0.0]
    assert stats["reward/parse_fail_frac"] == 0.5 and stats["reward/timeout_frac"] == 0.0


_SLOW_CHECKS = textwrap.dedent('''
    import signal, time

    def slow_check(pred, gold):
        """Hangs (interruptible) on pred 'slow'; otherwise a plain comparison."""
        if pred == "slow":
            time.sleep(60)
        return pred == gold

    def stuck_check(pred, gold):
        """Hangs where the worker's timer cannot interrupt it (SIGALRM blocked), like sympy in C code."""
        if pred == "stuck":
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            time.sleep(60)
        return pred == gold
''')


@pytest.fixture
def slow_checks(tmp_path, monkeypatch):
    (tmp_path / "entcov_slow_checks.py").write_text(_SLOW_CHECKS)
    monkeypatch.syspath_prepend(str(tmp_path))  # workers inherit the trainer's sys.path
    return "entcov_slow_checks"


def test_math_timeout_scores_zero_and_is_counted(slow_checks):
    verifier = MathVerifier(num_workers=1, check=f"{slow_checks}:slow_check")
    try:
        start = time.monotonic()
        results = verifier.verify_batch(["\\boxed{slow}", "\\boxed{1}", "\\boxed{2}"], ["1", "2", "2"],
                                        timeout_s=0.5)
        elapsed = time.monotonic() - start
        assert [(r.reward, r.status) for r in results] == [(0.0, "timeout"), (0.0, "ok"), (1.0, "ok")]
        assert elapsed < 20, elapsed
        # The worker survived its in-process time-out and keeps serving.
        assert verifier.verify_batch(["\\boxed{4}"], ["4 "], timeout_s=0.5)[0].reward == 1.0
    finally:
        verifier.close()


def test_math_stuck_worker_is_killed_and_replaced(slow_checks):
    verifier = MathVerifier(num_workers=1, check=f"{slow_checks}:stuck_check", kill_grace_s=0.5)
    try:
        start = time.monotonic()
        results = verifier.verify_batch(["\\boxed{stuck}", "\\boxed{a}"], ["x", "a "], timeout_s=0.5)
        assert [(r.reward, r.status) for r in results] == [(0.0, "timeout"), (1.0, "ok")]
        assert time.monotonic() - start < 20
    finally:
        verifier.close()


def test_math_verifier_never_raises_on_model_text(math_verifier):
    nasty = ["\\boxed{\\frac{", "\\boxed{}}}}", "\\boxed{\\left(}", "\\boxed{\x00\udcff}", "\\boxed{" + "(" * 500 + "}",
             "\\boxed{\\int_0^1 x dx}", None]
    results = math_verifier.verify_batch(nasty, ["1"] * len(nasty), timeout_s=5.0)
    assert len(results) == len(nasty)
    assert all(r.reward in (0.0, 1.0) for r in results)
    assert results[-1].status == "parse_fail"
