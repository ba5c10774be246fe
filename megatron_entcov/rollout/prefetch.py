"""Overlapped rollouts (``rollout.overlap``): the next step's experience is generated in a background thread
while the current step trains. This module owns the thread (:class:`RolloutPrefetch`) and the staleness
numbers; the trainer decides when to start and wait (trainer.py ``train_step``).

Timeline of step t (1-based) with overlap:
  take R_t (prefetched during step t-1; generated now when there is none: the first step, after a resume)
  -> start generating R_{t+1} in the background with the weights the engine holds (version v)
  -> train on R_t (the trainer's weights become version v+1)
  -> wait for R_{t+1} (``perf/overlap_wait(s)``) -> sync version v+1 to the engine -> evaluation, checkpoint.
The engine's weights therefore never change under a running generation (the sync comes after the wait), and
R_{t+1} is one version behind the trainer that trains on it: ``rollout/staleness`` (trainer version at train
time minus each sample's ``weight_version``, mean over the global batch; ``rollout/staleness_max`` its max)
is 1 after a step that applied an update. The trainer's recomputed old log-probs then differ from the rollout
log-probs by a whole optimizer step, which truncated importance sampling (``loss.tis_cap``) corrects; the
trainer warns when overlap runs without it. The last step starts no prefetch (nothing would train on it).

Threads and collectives: the generating ranks all-gather each refill round's payloads (experience.py). The
background thread must not issue collectives on a group the main thread uses at the same time (collectives on
one group are matched by call order, and two threads interleave them differently on different ranks), so with
dp > 1 it gathers over its own gloo group of the generating ranks (``parallel.build_rollout_group``, created
on every rank at start). Broadcasting the experience inside each model-parallel group and agreeing the loader
cursor stay in the main thread, when the next step takes the experience.

Resume: the prompts of R_{t+1} were drawn from the loader during step t, but step t's checkpoint stores the
loader as of the experience step t trained on (the trainer snapshots it before the prefetch draws). A resumed
run has no prefetched experience: it generates R_{t+1} from the same prompts, with the checkpoint's weights
(version t+1 instead of t, so the samples differ; no prompt is skipped or repeated).

Errors: an exception in the thread is kept and re-raised, the original exception with its traceback, by
:meth:`RolloutPrefetch.wait` in the main thread, which the trainer calls inside ``fail_together`` so every rank
fails at the same point. A running generation cannot be interrupted: :meth:`RolloutPrefetch.close` joins the
thread with a time-out after the trainer closed the engine (which ends its requests).

Example:
    prefetch = RolloutPrefetch()
    prefetch.start(lambda: collect(step=t + 1), step=t + 1)     # generating ranks only
    ...                                                        # train step t
    exp = prefetch.wait()                                      # re-raises the thread's exception
    prefetch.close(timeout=30.0)
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
