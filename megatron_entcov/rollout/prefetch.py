"""Overlapped rollouts (``rollout.overlap``): the next step's experience is generated in a background thread
while the current step trains. Owns the thread (:class:`RolloutPrefetch`) and the staleness numbers
(``staleness_sums``); the trainer decides when to start and wait (trainer.py).

Contract: the engine's weights never change under a running generation (the trainer syncs after ``wait``), so
the prefetched samples are one weight version behind (``rollout/staleness`` = 1; ``loss.tis_cap`` corrects it).
With dp > 1 the thread gathers over its own gloo group, never one the main thread uses. ``wait`` re-raises the
thread's exception in the main thread; ``close`` joins the thread with a time-out (close the engine first).

Example:
    prefetch = RolloutPrefetch()
    prefetch.start(lambda: collect(step=t + 1), step=t + 1)     # generating ranks only; then train step t
    exp = prefetch.wait()                                      # re-raises the thread's exception

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable

__all__ = ["RolloutPrefetch", "staleness_sums"]

logger = logging.getLogger(__name__)


class RolloutPrefetch:
    """At most one background rollout at a time: start it, wait for its result (or its exception), close.

    Attributes:
        step: the step index the running or last started rollout is for (None before the first start).
        wait_time: seconds the last :meth:`wait` blocked (0 when the result was already there).
    """

    def __init__(self, name: str = "rollout-prefetch"):
        self.name = name
        self.step: int | None = None
        self.wait_time = 0.0
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        """A rollout was started and its result not yet collected by :meth:`wait`."""
        return self._thread is not None

    @property
    def running(self) -> bool:
        """The thread is still generating."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, fn: Callable[[], Any], *, step: int) -> None:
        """Run ``fn()`` in a daemon thread (a process that fails elsewhere must not hang on it at exit)."""
        if self._thread is not None:
            raise RuntimeError(f"RolloutPrefetch.start(step={step}): the rollout of step {self.step} is still "
                               "pending; wait() for it first")
        self.step, self._result, self._error = step, None, None

        def run() -> None:
            try:
                self._result = fn()
            except BaseException as err:        # noqa: BLE001 - handed to the main thread by wait()
                self._error = err

        self._thread = threading.Thread(target=run, name=f"{self.name}-step{step}", daemon=True)
        self._thread.start()

    def wait(self) -> Any:
        """Block until the rollout ends; its result, or its exception re-raised here (same object, with the
        thread's traceback and a note naming the step). Collects it: ``pending`` is False afterwards."""
        if self._thread is None:
            raise RuntimeError("RolloutPrefetch.wait(): no rollout was started")
        t0 = time.monotonic()
        self._thread.join()
        self.wait_time = time.monotonic() - t0
        self._thread = None
        result, error = self._result, self._error
        self._result = self._error = None
        if error is not None:
            error.add_note(f"(raised in the background rollout of step index {self.step}, generated while the "
                           "previous step trained: rollout.overlap=true)")
            raise error
        return result

    def close(self, timeout: float = 30.0) -> bool:
        """Join a running rollout for at most ``timeout`` seconds and drop any result; True when no thread is
        left. Close the engine first: a generation in flight cannot be interrupted otherwise."""
        thread, self._thread = self._thread, None
        self._result = self._error = None
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("rollout.overlap: the background rollout of step index %s is still running after "
                           "%.0f s; leaving it (a daemon thread ends with the process)", self.step, timeout)
            return False
        return True


def staleness_sums(trainer_version: int, sample_versions: Iterable[int]) -> tuple[float, float, float]:
    """(sum, count, max) of ``trainer_version - version`` over the samples: this rank's part of
    ``rollout/staleness`` (sum / count over all ranks) and ``rollout/staleness_max``; max is -inf with no
    samples, so that a MAX over ranks ignores ranks that hold none."""
    lags = [trainer_version - int(v) for v in sample_versions]
    return float(sum(lags)), float(len(lags)), float(max(lags)) if lags else float("-inf")
