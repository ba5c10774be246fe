"""The ``--nproc`` launcher: the same command under torchrun on this machine, supervised.

Every rendezvous socket stays on 127.0.0.1 (the launcher hosts torchrun's c10d store itself; rank 0 hosts the
process-group store), signals go to the ranks (not to torchrun, which would also signal their checkpoint
workers), and nothing is left running: after ``stop_timeout`` seconds, or a second signal, every process the
launcher saw is killed by PID (never by name).

A rank's error (a user error's line, a crash's traceback) goes to the launcher (:func:`report`), which prints
each distinct one once after the run and exits with the ranks' code, as one process would; torchrun's own
account of a failure the ranks reported is left out (:func:`torchrun_main`).

Example:
    store, port = loopback_store()
    code = run_ranks(torchrun_command(4, port, argv_without_nproc(sys.argv[1:])), env, stop_timeout=300)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["DEFAULT_STOP_TIMEOUT", "LAUNCHED_ENV", "LAUNCHER_SIGNALS", "REPORT_ENV", "argv_without_nproc", "report",
           "run_ranks", "supervise", "torchrun_command", "torchrun_main"]

DEFAULT_STOP_TIMEOUT = 300.0
LAUNCHED_ENV = "MEGATRON_ENTCOV_LAUNCHED"
"""Set by the --nproc launcher in the ranks' environment."""
REPORT_ENV = "MEGATRON_ENTCOV_REPORTS"
"""Set by the --nproc launcher in the ranks' environment: the directory where each rank leaves its error."""
LAUNCHER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
_TORCHRUN = "import torch.distributed.run; from megatron_entcov.run.launch import torchrun_main; torchrun_main()"
"""torchrun as :func:`torchrun_main` runs it (the command line names torch.distributed.run, as `-m` would)."""


def argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def torchrun_command(nproc: int, rdzv_port: int, argv: list[str]) -> list[str]:
    """torchrun (:func:`torchrun_main`) on this machine, joining the c10d rendezvous the launcher hosts on
    127.0.0.1:``rdzv_port`` (``is_host=false``: torchrun starts no store server of its own; with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in
    its environment it starts no shared one either, and rank 0 hosts the process-group store on 127.0.0.1)."""
    import uuid

    return [sys.executable, "-c", _TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", uuid.uuid4().hex,
            "--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1", "--max-restarts", "0",
            "-m", "megatron_entcov", *argv]


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_all(proc: subprocess.Popen, seen: dict) -> None:
    """SIGKILL torchrun's process group, each rank's (a rank leads its own session, with its checkpoint
    workers), then any process seen below torchrun that is still there. By recorded pid, never by name."""
    import psutil

    for p in _descendants(proc.pid):
        seen.setdefault(p.pid, p)
    groups = {proc.pid} | {p.pid for p in _alive(seen.values()) if _pgid(p.pid) == p.pid}
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in _alive(seen.values()):
        try:
            p.kill()
        except psutil.Error:
            pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def supervise(cmd: list[str], env: dict, *, stop_timeout: float = DEFAULT_STOP_TIMEOUT,
              start_new_session: bool = True) -> int:
    """Run ``cmd`` (torchrun) in its own session and forward stop signals to its workers.

    SIGINT, SIGTERM, SIGUSR1 (SIGHUP as SIGTERM) go to each rank (torchrun's children) and not to torchrun:
    torchrun would signal each rank's whole process group, its checkpoint workers included, and report the
    stop as a failure. The ranks finish their step, checkpoint and exit 0 (see ``LAUNCHED_ENV``); after
    ``stop_timeout`` seconds, or at a second SIGINT/SIGTERM, every process below this one is killed.
    Returns torchrun's exit code, or 128 + the signal number after a stop (137 after killing).
    """
    import psutil

    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in LAUNCHER_SIGNALS}
    seen: dict[int, psutil.Process] = {}
    stop_sig, deadline, rc, why = 0, None, None, ""
    proc = subprocess.Popen(cmd, env=env, start_new_session=start_new_session)
    try:
        while rc is None:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            # Everything below torchrun, kept while alive (a rank's helpers outlive it, reparented).
            seen = {p.pid: p for p in _alive(seen.values())}
            for p in _descendants(proc.pid):
                seen.setdefault(p.pid, p)
            while pending:
                sig = pending.pop(0)
                if not stop_sig:
                    stop_sig, deadline = sig, time.monotonic() + stop_timeout
                    why = f"did not stop within {stop_timeout:g} s of {signal.Signals(sig).name}"
                    _forward(proc, signal.SIGTERM if sig == signal.SIGHUP else sig, stop_timeout)
                elif sig != signal.SIGUSR1:
                    deadline, why = time.monotonic(), f"got a second {signal.Signals(sig).name}"
            if deadline is not None and time.monotonic() >= deadline:
                print(f"megatron-entcov: the run {why}: killing every process of it", file=sys.stderr, flush=True)
                _kill_all(proc, seen)
                proc.wait()
                rc = 128 + signal.SIGKILL
                stop_sig = 0
    except BaseException:
        _kill_all(proc, seen)
        proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Ranks that exited leave their checkpoint workers and resource trackers a moment to follow.
    left = _alive(seen.values())
    if left:
        psutil.wait_procs(left, timeout=10)
        for p in _alive(left):
            try:
                p.kill()
            except psutil.Error:
                pass
    if rc < 0:                       # torchrun itself died of a signal
        rc = 128 - rc
    if stop_sig:
        return rc if rc else 128 + stop_sig
    return rc


def _forward(proc: subprocess.Popen, sig: int, stop_timeout: float) -> None:
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children()
    except psutil.Error:
        ranks = []
    for rank in ranks:
        try:
            rank.send_signal(sig)
        except psutil.Error:
            pass
    if not ranks:      # torchrun has not started them yet: it stops itself on SIGTERM
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(f"megatron-entcov: {signal.Signals(sig).name}: the {len(ranks)} ranks finish their step, save a "
          f"checkpoint and exit (killed after {stop_timeout:g} s; send it again to kill them now)",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------- errors the ranks find: reported once
def report(text: str, code: int, *, rank0_only: bool = False) -> int:
    """Show the command's error ``text`` (a one-line error or a traceback) and return its exit ``code``. A rank of
    the --nproc launcher leaves it in its file under REPORT_ENV, for the launcher to print once for all ranks;
    otherwise it goes to stderr (``rank0_only``: only on rank 0 of a run launched some other way)."""
    where = os.environ.get(REPORT_ENV)
    rank = os.environ.get("RANK", "0")
    if where:
        path = Path(where) / f"rank{rank}.json"
        try:
            path.with_suffix(".tmp").write_text(json.dumps({"rank": int(rank), "code": code, "text": text}))
            os.replace(path.with_suffix(".tmp"), path)
            return code
        except OSError:                    # the launcher is gone: say it here
            pass
    if not rank0_only or rank == "0":
        print(text, file=sys.stderr, flush=True)
    return code


def _reports(where: Path) -> list[dict]:
    """The ranks' reports, by rank (unreadable ones skipped: a rank killed while writing leaves only .tmp)."""
    out = []
    for path in where.glob("rank*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(out, key=lambda r: r["rank"])


def run_ranks(cmd: list[str], env: dict, *, stop_timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
    """:func:`supervise` ``cmd`` with a report directory in the ranks' environment. When the run failed and its
    ranks reported: each distinct report once on stderr (the errors, or the stops when no rank had an error),
    and their exit code (1 when they differ), as one process would have printed and exited."""
    with tempfile.TemporaryDirectory(prefix="megatron-entcov-reports-") as where:
        rc = supervise(cmd, {**env, REPORT_ENV: where}, stop_timeout=stop_timeout)
        found = _reports(Path(where))
    if rc == 0 or not found:
        return rc
    # An error on one rank makes torchrun stop the others: a stop report (128 + signal) then only follows it.
    shown = [r for r in found if r["code"] < 128] or found
    for text in dict.fromkeys(r["text"] for r in shown):
        print(text, file=sys.stderr, flush=True)
    codes = {r["code"] for r in shown}
    return codes.pop() if len(codes) == 1 else 1


def torchrun_main() -> None:
    """torchrun (``torch.distributed.run``'s main; its arguments in sys.argv), quiet about a failure its ranks
    reported themselves (:func:`report`): its failure log records and its ChildFailedError block are left out
    when every failed rank left a report or was stopped by torchrun after another failed. Any other failure (a
    rank killed, a crash before its report) keeps torchrun's account."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    if not os.environ.get(REPORT_ENV):
        main()
        return
    where = Path(os.environ[REPORT_ENV])
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not any(where.glob("rank*.json")))
    try:
        main()
    except ChildFailedError as exc:
        reported = {r["rank"] for r in _reports(where)}
        teardown = (-signal.SIGTERM, -signal.SIGKILL)
        if not reported or any(rank not in reported and f.exitcode not in teardown
                               for rank, f in exc.failures.items()):
            raise
        sys.exit(max(1, *(f.exitcode for f in exc.failures.values())))
