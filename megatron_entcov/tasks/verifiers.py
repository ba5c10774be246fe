"""The verifier registry and `score`, which turns responses into rewards plus verifier statistics.

The registry never imports the verifiers: ``megatron_entcov.tasks`` imports them, and each registers itself
(``register_verifier``; "arithmetic", "countdown", "math"). A verifier never raises on model text: a response it
cannot parse scores 0.0 and counts as a parse failure, a check past the time-out scores 0.0 and counts as a
time-out; it raises on bad references (data, not model) and on a broken environment (math-verify missing).

Example:
    rewards, stats = score("arithmetic", ["46", " 7x"], ["46", "8"], timeout_s=5.0)
    # rewards == [1.0, 0.0]; stats["reward/parse_fail_frac"] == 0.0 (" 7x" parses as 7, which is wrong)

Design notes: docs/design/tasks.md
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

Status = Literal["ok", "parse_fail", "timeout", "error"]


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking one response.

    reward: 1.0 correct, 0.0 otherwise.
    status: "ok" = parsed and checked (correct or not); "parse_fail" = no answer could be read from the response;
        "timeout" = the check ran past the time-out; "error" = the check itself failed (e.g. a crashed worker).
    """

    reward: float
    status: Status = "ok"


@runtime_checkable
class Verifier(Protocol):
    """Scores responses against reference answers."""

    name: str

    def verify_batch(self, responses: Sequence[str], answers: Sequence[str], *,
                     timeout_s: float) -> list[VerifyResult]:
        """One result per response, in order. Never raises on the content of `responses`."""
        ...

    def close(self) -> None:
        """Release background resources (worker processes); the verifier may be used again afterwards."""
        ...


class PureVerifier:
    """Base of a verifier that checks each response on its own, in the calling thread, in time linear in the
    response: nothing can hang, so ``timeout_s`` is not used and there is nothing to close. Subclasses set
    ``name`` and implement ``verify_one``."""

    name: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def verify_batch(self, responses: Sequence[str], answers: Sequence[str], *,
                     timeout_s: float = 0.0) -> list[VerifyResult]:
        del timeout_s
        return [self.verify_one(response, answer, i)
                for i, (response, answer) in enumerate(zip(responses, answers, strict=True))]

    def verify_one(self, response: str, answer: str, index: int) -> VerifyResult:
        """The result of response ``index``; raises ValueError only for a bad reference ``answer``."""
        raise NotImplementedError

    def close(self) -> None:
        pass


_FACTORIES: dict[str, Callable[[], Verifier]] = {}
_INSTANCES: dict[str, Verifier] = {}


def register_verifier(name: str) -> Callable[[Callable[[], Verifier]], Callable[[], Verifier]]:
    """Class (or zero-argument factory) decorator: make it available as `get_verifier(name)`."""

    def deco(factory: Callable[[], Verifier]) -> Callable[[], Verifier]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"verifier {name!r} is already registered (by {_FACTORIES[name]!r})")
        _FACTORIES[name] = factory
        return factory

    return deco


def verifier_names() -> list[str]:
    """Registered verifier names, sorted."""
    return sorted(_FACTORIES)


def get_verifier(name: str) -> Verifier:
    """The verifier registered as `name`; one shared instance per name (the math verifier keeps its workers).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in _FACTORIES:
        raise ValueError(f"data.reward={name!r} is not a registered verifier; choose one of "
                         f"{', '.join(repr(n) for n in verifier_names())}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
        logger.info("verifier %r: %r", name, _INSTANCES[name])
    return _INSTANCES[name]


def close_verifiers() -> None:
    """Close every verifier instance created by `get_verifier` (stops worker processes)."""
    for verifier in _INSTANCES.values():
        verifier.close()
    _INSTANCES.clear()


def summarize(results: Sequence[VerifyResult]) -> dict[str, float]:
    """Verifier statistics of a batch: reward/{parse_fail,timeout,error}_frac, fractions of len(results) (0.0
    for an empty batch). Fractions only, so a mean over batches weighted by batch size stays exact."""
    n = len(results)
    return {f"reward/{status}_frac": sum(r.status == status for r in results) / n if n else 0.0
            for status in ("parse_fail", "timeout", "error")}


def score(verifier_name: str, responses: Sequence[str], answers: Sequence[str], *,
          timeout_s: float) -> tuple[list[float], dict[str, float]]:
    """Score responses with the named verifier.

    Args:
        verifier_name: a registered verifier ("arithmetic", "math").
        responses: decoded response texts (special tokens may be present or stripped; both work).
        answers: reference answers, one per response.
        timeout_s: per-sample time-out in seconds (DataConfig.reward_timeout_s); ignored by verifiers that
            cannot hang (arithmetic).
    Returns:
        (rewards, stats): rewards[i] in {0.0, 1.0}; stats as in `summarize`.
    Raises:
        ValueError: unknown verifier, len(responses) != len(answers), or a reference the verifier cannot use.
    """
    if len(responses) != len(answers):
        raise ValueError(f"score: {len(responses)} responses but {len(answers)} answers; pass one answer per "
                         f"response")
    if not timeout_s > 0:
        raise ValueError(f"score: timeout_s={timeout_s!r}; expected a positive number of seconds")
    verifier = get_verifier(verifier_name)
    results = verifier.verify_batch(list(responses), list(answers), timeout_s=timeout_s)
    assert len(results) == len(responses), (verifier_name, len(results), len(responses))
    return [r.reward for r in results], summarize(results)


__all__ = ["Status", "VerifyResult", "Verifier", "PureVerifier", "register_verifier", "verifier_names", "get_verifier",
           "close_verifiers", "summarize", "score"]
