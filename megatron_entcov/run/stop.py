"""Stopping a training process on a signal: at the next step boundary, with a checkpoint, on every rank.

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ("checkpoint and stop", for preemption notices) set a stop request that
the RL loop reads once per step (:func:`agree_stop`, collective) so every rank stops after the same step; a
second SIGTERM/SIGINT stops at once (:class:`StopNow`). A wait outside the steps (for rollout servers) sleeps
through :func:`wait_or_stop`, which ends it with :class:`StopNow` as soon as a stop is requested. Megatron's
dist-checkpointing worker manager is started here, shielded from these signals, so a signal to the whole process
group does not kill it mid-save.

Example:
    stops = StopSignals(graceful=True).install()
    ...  trainer.train()  (calls agree_stop(ps) before every step)
    stops.restore(); stop_checkpoint_queue()
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from megatron_entcov.distributed import collectives
from megatron_entcov.run.launch import LAUNCHED_ENV

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["StopNow", "StopSignals", "stop_exit_code", "request_stop", "stop_requested", "clear_stop",
           "wait_or_stop", "agree_stop", "start_checkpoint_queue", "stop_checkpoint_queue"]

_stop_signal = 0
_waiting: set[int] = set()     # threads inside wait_or_stop: a stop ends their wait, which says so itself


def request_stop(signum: int) -> None:
    """Ask this process to stop at the next step boundary (signal handlers call this; ``signum`` names why)."""
    global _stop_signal
    _stop_signal = _stop_signal or int(signum)


def stop_requested() -> int:
    """The signal number of this process's pending stop request, 0 when none."""
    return _stop_signal


def clear_stop() -> None:
    global _stop_signal
    _stop_signal = 0


def wait_or_stop(seconds: float, what: str) -> None:
    """Sleep ``seconds``, or raise :class:`StopNow` ("<SIGNAL> while waiting for <what>") as soon as a stop is
    requested (also when one is pending at the call): a wait for something outside the steps (a rollout
    server starting) has no step boundary to stop at. The rollout engine's waits sleep through this."""
    deadline = time.monotonic() + max(0.0, seconds)
    me = threading.get_ident()
    _waiting.add(me)
    try:
        while True:
            if _stop_signal:
                raise StopNow(_stop_signal, f"while waiting for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))
    finally:
        _waiting.discard(me)


def agree_stop(ps: "ParallelState | None") -> int:
    """Collective over the world: 0 when no rank has a stop request, else the same signal number on every
    rank (the largest requested), so that all ranks stop after the same step. One one-element all-reduce."""
    return int(collectives.reduce_values([float(_stop_signal)], op="max").item())


class StopNow(KeyboardInterrupt):
    """Raised by the stop-signal handler where the run cannot stop at a step boundary (or at a second signal),
    and by :func:`wait_or_stop`; ``during`` ("while waiting for ...") goes into its text after the signal name."""

    def __init__(self, signum: int, during: str = ""):
        name = signal.Signals(signum).name
        super().__init__(f"{name} {during}" if during else name)
        self.signum = signum


class StopSignals:
    """SIGINT, SIGTERM and SIGUSR1 in a training process. Graceful (the RL loop): the first one asks for a stop
    at the next step boundary (:func:`request_stop`; ``Trainer.train`` agrees on it over the ranks,
    checkpoints and returns); a second SIGINT/SIGTERM raises :class:`StopNow`. Not graceful (SFT, the
    quickstart before its RL loop): raise :class:`StopNow` at once. In a process forked from this one
    (Megatron's checkpoint writers) the signals are ignored: the rank finishes its save and stops."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, *, graceful: bool = False):
        self.graceful = graceful
        self._previous: dict = {}
        self._pid = os.getpid()

    def install(self) -> "StopSignals":
        self._pid = os.getpid()
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:              # a forked checkpoint writer: its rank decides
            return
        if self.graceful:

            if not stop_requested():
                request_stop(signum)
                if os.environ.get("RANK", "0") == "0" and not _waiting:     # a wait says why it stops
                    print(f"megatron-entcov: {signal.Signals(signum).name}: stopping after the step in flight "
                          "(checkpoint, then exit); send SIGTERM/Ctrl-C again to stop at once without saving",
                          file=sys.stderr, flush=True)
                return
            if signum == signal.SIGUSR1:          # a repeated preemption notice: already stopping
                return
        raise StopNow(signum)


def stop_exit_code(signum: int) -> int:
    """128 + signal after a requested stop; 0 under the --nproc launcher, which returns the code itself (a
    non-zero rank would make torchrun report a failure)."""
    if not signum or os.environ.get(LAUNCHED_ENV):
        return 0
    return 128 + signum


def _checkpoint_queue_init() -> None:
    """Runs in the checkpoint results queue's server process: ignore the stop signals (a group-wide SIGTERM
    must not kill it before the rank's last checkpoint) and die with the rank (PR_SET_PDEATHSIG)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_checkpoint_manager = None


def start_checkpoint_queue() -> None:
    """Start the multiprocessing Manager that Megatron's dist-checkpointing writer sends its results through,
    before it would start it itself at the first save: with the stop signals blocked while it (and the
    resource tracker) start, so that a signal to the whole process group does not kill them, and with
    :func:`_checkpoint_queue_init` so that it never outlives the rank. Megatron-internal: skipped if absent."""
    global _checkpoint_manager
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", False) is not None or _checkpoint_manager is not None:
        return
    import multiprocessing
    from multiprocessing import managers, resource_tracker

    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)       # ensure_running unblocks SIGINT/SIGTERM
        manager = managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_checkpoint_queue_init)
        fa._results_queue = manager.Queue()
        _checkpoint_manager = manager
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def stop_checkpoint_queue() -> None:
    global _checkpoint_manager
    if _checkpoint_manager is None:
        return
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

        fa._results_queue = None
    except ImportError:
        pass
    manager, _checkpoint_manager = _checkpoint_manager, None
    try:
        manager.shutdown()
    except Exception:          # noqa: BLE001 - already gone
        pass
