"""The "math" verifier: the last \\boxed{...} of a response checked against the reference with math-verify.

Scoring: the content of the last complete \\boxed{...} (or \\fbox{...}), else of the last "Answer: ..." line
(DAPO-Math-17k's prompt format; ``answer_line=False`` turns it off); none -> parse failure. Equal to the
reference after stripping whitespace -> 1.0; otherwise math_verify.parse + verify in a worker process (a bare
reference is parsed as \\boxed{<reference>}): 1.0 if equivalent, else 0.0.

Time-outs: checks run in persistent worker processes (JSON lines over pipes; they import only math-verify).
In the worker an interval timer stops a check after ``timeout_s`` ("timeout"); in the trainer a check still
unanswered ``kill_grace_s`` later has its worker killed and replaced (a time-out); a worker that dies
mid-check scores 0.0 as an error. A sample's clock starts when a worker receives it.

Design notes: docs/design/tasks.md
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_entcov.tasks.verifiers import VerifyResult, register_verifier

logger = logging.getLogger(__name__)

DEFAULT_CHECK = "megatron_entcov.tasks.math:math_verify_check"
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# As DAPO's reference reward reads it: "answer:" anywhere on a line, the rest of the line (markdown ** allowed).
_ANSWER_LINE_RE = re.compile(r"answer[ \t*_]*[:：][ \t*_]*([^\n]*?)[ \t*_]*$", re.IGNORECASE | re.MULTILINE)
_WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a busy node can take many seconds


# --------------------------------------------------------------------------------------------------
# extraction and the check (the check runs in worker processes)
# --------------------------------------------------------------------------------------------------


def _closing_brace(text: str, open_pos: int) -> int | None:
    """Index of the '}' matching the '{' at open_pos, or None if unclosed. Escaped braces do not count."""
    depth = 0
    i = open_pos
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # \{ and \} are literal braces in LaTeX; any other escape is skipped whole
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last complete top-level \\boxed{...} / \\fbox{...} in `text`, or None.

    "a \\boxed{1} b \\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"; "\\boxed{\\boxed{3}}" -> "\\boxed{3}";
    "\\boxed{2} then \\boxed{3" -> "2" (the unclosed one is ignored).
    """
    last = None
    pos = 0
    while (m := _BOXED_RE.search(text, pos)) is not None:
        end = _closing_brace(text, m.end() - 1)
        if end is None:
            break
        last = text[m.end():end]
        pos = end + 1
    return last


def extract_answer(text: str, *, answer_line: bool = True) -> str | None:
    """The answer of a response: `extract_last_boxed`, else (with answer_line) what follows the last "Answer:"
    to the end of its line (case-insensitive, markdown bold allowed), without enclosing $...$ or a final '.'.
    None when neither exists or the answer is empty.

    "... so \\boxed{34}" -> "34"; "work\\nAnswer: $\\frac{1}{2}$." -> "\\frac{1}{2}"
    """
    answer = extract_last_boxed(text)
    if answer is None and answer_line:
        matches = _ANSWER_LINE_RE.findall(text)
        if matches:
            answer = matches[-1].strip().rstrip(".").strip()
            if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
                answer = answer.strip("$").strip()
    if answer is None or not answer.strip():
        return None
    return answer


def math_verify_check(pred: str, gold: str) -> bool | None:
    """True/False: `pred` (boxed content) is/is not equivalent to `gold`; None: `pred` cannot be parsed.

    Runs math-verify without its own signal-based time-outs: the caller (a worker) bounds the time.
    """
    from math_verify import parse, verify

    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not pred_parsed:
        return None
    gold_text = gold if ("$" in gold or "\\boxed" in gold) else "\\boxed{" + gold + "}"
    gold_parsed = parse(gold_text, parsing_timeout=None)
    if not gold_parsed:
        logger.warning("math verifier: reference %r cannot be parsed by math-verify; comparing strings", gold)
        return pred.strip() == gold.strip()
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# --------------------------------------------------------------------------------------------------
# the worker process
# --------------------------------------------------------------------------------------------------


class _CheckTimeout(BaseException):
    """Raised by SIGALRM in a worker. A BaseException, so the `except Exception` blocks inside math-verify and
    sympy cannot swallow it and turn a time-out into a wrong answer."""


def _import_check(spec: str) -> Callable[[str, str], bool | None]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"check={spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


def worker_main() -> None:
    """Worker loop: read {"pred", "gold", "timeout_s"} lines from stdin, write {"status", "correct"} lines."""
    spec = sys.argv[1]
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="[math-verify worker] %(levelname)s %(message)s")
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own time-outs are off
    check = _import_check(spec)
    if spec == DEFAULT_CHECK:
        check("1", "1")  # pay the sympy/antlr imports now, not inside the first sample's time-out

    def on_alarm(signum, frame):
        raise _CheckTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        correct, status, detail = False, "ok", None
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, float(req["timeout_s"]))
                out = check(req["pred"], req["gold"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if out is None:
                status = "parse_fail"
            else:
                correct = bool(out)
        except _CheckTimeout:
            status = "timeout"
        except Exception as exc:  # noqa: BLE001 - a failed check scores 0, the worker lives on
            status, detail = "error", f"{type(exc).__name__}: {exc}"[:500]
        proto.write(json.dumps({"status": status, "correct": correct, "detail": detail}) + "\n")


# --------------------------------------------------------------------------------------------------
# the pool (trainer side)
# --------------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, check: str, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-c",
               "from megatron_entcov.tasks.math import worker_main; worker_main()", check]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None
        self.deadline = 0.0

    def send(self, msg: dict) -> bool:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def read_lines(self) -> list[dict] | None:
        """Complete messages now readable; None at end of file (the worker exited)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def stop(self, timeout_s: float = 2.0) -> None:
        """Close stdin (the worker's loop ends) and wait; kill if it does not exit."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _WorkerPool:
    """Persistent checker processes with per-task time-outs; a worker past its deadline is killed and replaced."""

    def __init__(self, check: str, num_workers: int, kill_grace_s: float) -> None:
        self.check = check
        self.num_workers = num_workers
        self.kill_grace_s = kill_grace_s
        self.workers: list[_Worker] = []
        pkg_root = str(Path(__file__).resolve().parents[2])
        # Workers import what the trainer can import (its sys.path, incl. entries added at run time).
        paths = [pkg_root] + [p for p in sys.path if p]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))

    def _spawn(self) -> _Worker:
        return _Worker(self.check, self.env)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []

    def run(self, tasks: Sequence[tuple[str, str]], timeout_s: float) -> list[tuple[str, bool]]:
        """(status, correct) per (pred, gold) task, status in {"ok", "parse_fail", "timeout", "error"}."""
        results: list[tuple[str, bool] | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        while len(self.workers) < self.num_workers:
            self.workers.append(self._spawn())
        sel = selectors.DefaultSelector()
        for w in self.workers:
            sel.register(w.fd, selectors.EVENT_READ, w)
        try:
            while queue or any(w.task is not None for w in self.workers):
                self._dispatch(sel, tasks, queue, results, timeout_s)
                self._collect(sel, results)
                self._expire(sel, results, timeout_s)
        except BaseException:
            # An exception (or KeyboardInterrupt) mid-batch leaves workers with unknown state: start afresh.
            self.close()
            raise
        finally:
            sel.close()
        assert all(r is not None for r in results), results
        return results  # type: ignore[return-value]

    def _replace(self, sel: selectors.BaseSelector, w: _Worker) -> None:
        """Kill worker ``w`` and put a fresh one in its place."""
        sel.unregister(w.fd)
        w.kill()
        new = self._spawn()
        self.workers[self.workers.index(w)] = new
        sel.register(new.fd, selectors.EVENT_READ, new)

    def _dispatch(self, sel: selectors.BaseSelector, tasks: Sequence[tuple[str, str]], queue: deque,
                  results: list, timeout_s: float) -> None:
        """Hand queued tasks to the ready, idle workers; the clock of a task starts here."""
        for w in self.workers:
            if w.ready and w.task is None and queue:
                i = queue.popleft()
                w.task, w.deadline = i, time.monotonic() + timeout_s + self.kill_grace_s
                if not w.send({"pred": tasks[i][0], "gold": tasks[i][1], "timeout_s": timeout_s}):
                    results[i] = ("error", False)
                    w.task = None
                    self._replace(sel, w)

    def _collect(self, sel: selectors.BaseSelector, results: list) -> None:
        """Wait for replies (until the next deadline or start-up limit) and record them; a worker that exited
        mid-check scores its task as an error and is replaced; one that exited during start-up raises."""
        now = time.monotonic()
        waits = [w.deadline - now for w in self.workers if w.task is not None]
        waits += [w.started + _WORKER_START_TIMEOUT_S - now for w in self.workers if not w.ready]
        for key, _ in sel.select(timeout=max(0.0, min(waits)) if waits else None):
            w = key.data
            msgs = w.read_lines()
            if msgs is None:  # the worker exited
                if not w.ready:
                    raise RuntimeError(f"math verifier: a worker process ({self.check}) exited during "
                                       f"start-up with code {w.proc.wait()}; see its stderr above")
                if w.task is not None:
                    logger.warning("math verifier: worker exited mid-check (code %s); sample scored 0",
                                   w.proc.poll())
                    results[w.task] = ("error", False)
                    w.task = None
                self._replace(sel, w)
                continue
            for msg in msgs:
                if msg.get("ready"):
                    w.ready = True
                elif w.task is not None:
                    if msg["status"] == "error":
                        logger.warning("math verifier: check failed: %s", msg.get("detail"))
                    results[w.task] = (msg["status"], bool(msg["correct"]))
                    w.task = None

    def _expire(self, sel: selectors.BaseSelector, results: list, timeout_s: float) -> None:
        """Kill and replace a worker past its task's deadline (the task times out); raise when one has not
        started within the start-up limit."""
        now = time.monotonic()
        for w in list(self.workers):
            if w.task is not None and now > w.deadline:
                # Past the in-worker timer too: stuck where no signal handler runs (e.g. C code).
                logger.warning("math verifier: a check ignored its %.1fs time-out; killing its worker",
                               timeout_s)
                results[w.task] = ("timeout", False)
                w.task = None
                self._replace(sel, w)
            elif not w.ready and now > w.started + _WORKER_START_TIMEOUT_S:
                raise RuntimeError(f"math verifier: a worker process did not start within "
                                   f"{_WORKER_START_TIMEOUT_S:.0f}s")


def _close_pool(pool: _WorkerPool) -> None:
    pool.close()


@register_verifier("math")
class MathVerifier:
    """Boxed-answer verifier with math-verify in worker processes (behaviour: see the module docstring).

    Args:
        num_workers: checker processes (started on first use, kept until `close`); default min(4, cpu count).
        check: "module:function" run in the workers, (pred_content, reference) -> True/False/None (None = pred
            unparseable); default `math_verify_check`. Must be importable from the trainer's sys.path.
        kill_grace_s: how long past the time-out a worker may stay silent before it is killed and replaced.
        answer_line: without a \\boxed{}, read the answer from a last "Answer: ..." line (DAPO prompt format).

    Example:
        v = MathVerifier()
        v.verify_batch(["... so \\\\boxed{0.5}"], ["\\\\frac{1}{2}"], timeout_s=5.0)   # [VerifyResult(1.0, "ok")]
        v.close()
    """

    name = "math"

    def __init__(self, num_workers: int | None = None, check: str = DEFAULT_CHECK, kill_grace_s: float = 2.0,
                 answer_line: bool = True):
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"MathVerifier: num_workers={num_workers} must be >= 1")
        if check == DEFAULT_CHECK and importlib.util.find_spec("math_verify") is None:
            raise ImportError("data.reward='math' needs the math-verify package: pip install math-verify==0.9.0")
        self.num_workers = num_workers
        self.check = check
        self.kill_grace_s = kill_grace_s
        self.answer_line = answer_line
        self._pool: _WorkerPool | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MathVerifier(num_workers={self.num_workers}, check={self.check!r})"

    def verify_batch(self, responses: Sequence[str], answers: Sequence[str], *,
                     timeout_s: float) -> list[VerifyResult]:
        results: list[VerifyResult | None] = [None] * len(responses)
        tasks, slots = [], []
        for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            if not isinstance(answer, str):
                raise ValueError(f"math verifier: reference answer {i} is {answer!r}; expected a string")
            pred = extract_answer(response, answer_line=self.answer_line) if isinstance(response, str) else None
            if pred is None:
                results[i] = VerifyResult(0.0, "parse_fail")
            elif pred.strip() == answer.strip():
                results[i] = VerifyResult(1.0, "ok")
            else:
                tasks.append((pred, answer))
                slots.append(i)
        if tasks:
            with self._lock:
                if self._pool is None:
                    self._pool = _WorkerPool(self.check, self.num_workers, self.kill_grace_s)
                    # Stops the workers when the verifier is garbage-collected or at interpreter exit.
                    self._finalizer = weakref.finalize(self, _close_pool, self._pool)
                for i, (status, correct) in zip(slots, self._pool.run(tasks, timeout_s)):
                    reward = 1.0 if status == "ok" and correct else 0.0
                    results[i] = VerifyResult(reward, status)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._pool, self._finalizer = None, None
