"""Ownership of a run directory: it belongs to one run (identity) and one process tree at a time (lock).

Two files at the top of ``<output_dir>/<name>``: ``run.lock`` (held with ``fcntl.flock`` by rank 0 of the run
writing here) and ``run.json`` (the run's random id; every checkpoint records it). Checked on rank 0 before
anything else is written: a new run into a directory that holds another run is refused (nothing is overwritten
or deleted); ``--resume`` continues the directory's run and needs a complete checkpoint; a lock held by a live
run is refused, a lock left by a dead one is taken over with a warning. Across nodes the lock is only as good
as the shared file system's ``flock``.

Example:
    run = RunDir.open(cfg.run_dir, ps, resume=cfg.checkpoint.resume)   # collective; lock + identity
    ...                                                               # Checkpointer(..., run_id=run.run_id)
    run.close()                                                       # in a finally: releases the lock (rank 0)

Design notes (the rules in full, file systems): docs/design/run.md
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["RunDir", "RunDirError", "RunLock", "LOCK_FILE", "RUN_FILE"]

LOCK_FILE = "run.lock"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


class RunDirError(ValueError):
    """The run directory cannot be used by this run; the message names the directory and the fixes.
    A ValueError, so the command line prints it as one line (exit code 2)."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # exists, owned by another user
        return True
    return True


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/run.lock`` holding the owner's host, pid and start time.

    The kernel drops the lock when its process exits, however it exits; :meth:`release` (also run at
    interpreter exit) empties the file too, so a non-empty file whose lock is free was left by a run that died.

    Example:
        lock = RunLock(run_dir / "run.lock")
        lock.acquire()          # RunDirError naming the owner when a live run holds it
        ...
        lock.release()
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_fd(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"cannot lock {str(self.path)!r}: {exc}; the file system of the run directory "
                                  "must support flock (set output_dir to one that does)") from exc
            raise RunDirError(
                f"run directory {str(self.path.parent)!r} is in use by another run ({_describe_owner(owner)}, "
                f"holding {self.path.name}); wait for it to finish, stop it, or write elsewhere with "
                "--set name=<new name> (or --set output_dir=...)") from None
        previous = _read_fd(fd)
        if previous:
            _warn_stale(self.path, previous)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        atexit.register(self.release)

    def release(self) -> None:
        """Empty the file and drop the lock (idempotent). The file stays: removing it would let a run that
        opened the old file and one that creates a new file both hold a lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        atexit.unregister(self.release)
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:         # the lock is dropped below in any case
            logger.warning("run directory: could not empty %s: %s", self.path, exc)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_fd(fd: int) -> dict | None:
    raw = os.pread(fd, 65536, 0)
    if not raw.strip():
        return None
    try:
        owner = json.loads(raw)
    except ValueError:
        return {"unreadable": raw[:80].decode(errors="replace")}
    return owner if isinstance(owner, dict) else {"unreadable": repr(owner)[:80]}


def _describe_owner(owner: dict | None) -> str:
    if not owner:
        return "owner not recorded yet"
    if "unreadable" in owner:
        return f"owner record unreadable: {owner['unreadable']!r}"
    return f"host {owner.get('host')!r}, pid {owner.get('pid')}, since {owner.get('started')}"


def _warn_stale(path: Path, owner: dict) -> None:
    here = socket.gethostname()
    pid = owner.get("pid")
    if owner.get("host") == here and isinstance(pid, int) and pid != os.getpid():
        why = ("its process is gone" if not _pid_alive(pid) else
               "the lock is free, so that process no longer holds it (its pid was reused)")
        logger.warning("run directory: taking over the stale lock %s of %s: %s", path, _describe_owner(owner), why)
    elif owner.get("host") == here:
        logger.warning("run directory: taking over the lock %s left by this process (%s)", path, _describe_owner(owner))
    else:
        logger.warning("run directory: taking over the lock %s of %s: the lock is free, so that run has ended, or "
                       "this shared file system does not carry flock locks between nodes (then make sure no run "
                       "on %r still writes here)", path, _describe_owner(owner), owner.get("host"))


def _complete_checkpoints(root: Path) -> list[Path]:
    from megatron_entcov.run.checkpoint import list_complete_steps

    return [path for _, path in list_complete_steps(root)]


class RunDir:
    """A run directory owned by this run: locked on rank 0, with the run's identity. Build with :meth:`open`.

    Attributes:
        path: the run directory.
        run_id: the run's random id (run.json); recorded in every checkpoint of the run.
        resumed: True when this process continues the directory's run (``checkpoint.resume=true``).
    """

    def __init__(self, path: Path, run_id: str, resumed: bool, lock: RunLock | None):
        self.path, self.run_id, self.resumed, self._lock = path, run_id, resumed, lock

    @classmethod
    def open(cls, path: str | Path, ps: "ParallelState | None" = None, *, resume: bool) -> "RunDir":
        """Lock ``path`` and check or create its identity on rank 0; collective (every rank gets the run id,
        or every rank raises RunDirError with rank 0's message)."""
        path = Path(path)
        is_rank0 = ps is None or ps.is_rank0
        payload: dict = {}
        lock = None
        if is_rank0:
            lock = RunLock(path / LOCK_FILE)
            try:
                _check_usable(path)
                path.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                payload = {"run_id": _claim(path, resume=resume)}
            except (RunDirError, OSError) as exc:
                lock.release()
                payload = {"error": str(exc) if isinstance(exc, RunDirError) else
                           f"cannot use run directory {str(path)!r}: {exc}"}
        payload = _broadcast(payload, ps)
        if "error" in payload:
            raise RunDirError(payload["error"])
        return cls(path, payload["run_id"], resume, lock)

    def close(self, *, failed_to_start: bool = False) -> None:
        """Release the lock (rank 0; a no-op elsewhere and when called twice).

        ``failed_to_start``: a new run that failed while starting (a config error found when building the
        model) gives the directory back: its run.json is removed when it saved no checkpoint, so the corrected
        command can start in the same directory instead of being refused.
        """
        if self._lock is None or not self._lock.held:
            return
        if failed_to_start and not self.resumed and not _complete_checkpoints(self.path / CHECKPOINTS):
            try:
                (self.path / RUN_FILE).unlink()
            except OSError as exc:
                logger.warning("run directory: could not remove %s: %s", self.path / RUN_FILE, exc)
        self._lock.release()


def _check_usable(path: Path) -> None:
    """RunDirError when ``path`` or a directory above it is a symlink to a missing target, or is a file (mkdir
    would say only "[Errno 17] File exists")."""
    elsewhere = "write elsewhere with --set output_dir=... (or --set name=...)"
    for part in (path, *path.parents):
        where = f"run directory {str(path)!r}" + ("" if part == path else f": {str(part)!r}")
        if part.is_symlink() and not part.exists():
            target = Path(os.path.normpath(part.parent / os.readlink(part)))
            raise RunDirError(f"{where} is a symlink to {str(target)!r}, which does not exist; create it (mkdir -p "
                              f"{target}), point the link elsewhere, or {elsewhere}")
        if part.exists():
            if not part.is_dir():
                raise RunDirError(f"{where} is a file, not a directory; move it away, or {elsewhere}")
            return


def _claim(path: Path, *, resume: bool) -> str:
    """The run id for a run starting (``resume`` False) or continuing in ``path``; RunDirError otherwise."""
    run_file = path / RUN_FILE
    identity = _read_identity(run_file)
    checkpoints = _complete_checkpoints(path / CHECKPOINTS)
    if not resume:
        if identity is None and not checkpoints:
            run_id = uuid.uuid4().hex
            _write_identity(run_file, {"run_id": run_id, "created": _now(), "host": socket.gethostname(),
                                       "pid": os.getpid(), "argv": sys.argv})
            logger.info("run directory %s: new run %s", path, run_id)
            return run_id
        held = (f"run {identity['run_id']} (started {identity.get('created')})" if identity
                else "checkpoints of an earlier run")
        if checkpoints:
            saved = f"{len(checkpoints)} complete checkpoint(s), newest {checkpoints[-1].name}"
            fixes = "continue it with --resume (--set checkpoint.resume=true), "
        else:
            saved = "no complete checkpoint"
            fixes = ""
        raise RunDirError(
            f"run directory {str(path)!r} already holds {held} with {saved}; a run directory belongs to one run: "
            f"{fixes}start a new run elsewhere with --set name=<new name> (or --set output_dir=...), or remove "
            f"{str(path)!r} to start over")
    if not checkpoints:
        if identity is not None:
            raise RunDirError(
                f"checkpoint.resume=true but {str(path)!r} holds no complete checkpoint: run {identity['run_id']} "
                f"stopped before its first save; remove {str(path)!r} to start it over, or start a new run with "
                "--set name=<new name>")
        raise RunDirError(f"checkpoint.resume=true but {str(path)!r} holds no complete checkpoint; drop --resume "
                          "(checkpoint.resume=false) to start a new run")
    if identity is None:
        # A directory written before run identities existed: its checkpoints become this run's.
        run_id = uuid.uuid4().hex
        _write_identity(run_file, {"run_id": run_id, "created": _now(), "host": socket.gethostname(),
                                   "pid": os.getpid(), "argv": sys.argv, "adopted": True})
        logger.warning("run directory %s had no %s: its checkpoints are continued as run %s", path, RUN_FILE, run_id)
        return run_id
    logger.info("run directory %s: continuing run %s", path, identity["run_id"])
    return identity["run_id"]


def _read_identity(run_file: Path) -> dict | None:
    if not run_file.exists():
        return None
    try:
        identity = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{str(run_file)!r} is unreadable ({exc}); it names the run that owns the directory: "
                          "restore it, or remove the directory to start over") from exc
    if not isinstance(identity, dict) or not isinstance(identity.get("run_id"), str) or not identity["run_id"]:
        raise RunDirError(f"{str(run_file)!r} has no 'run_id' (got {identity!r}); restore it, or remove the "
                          "directory to start over")
    return identity


def _write_identity(run_file: Path, identity: dict) -> None:
    tmp = run_file.with_name(run_file.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(identity, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_file)


def _broadcast(payload: dict, ps: "ParallelState | None") -> dict:
    if ps is None:
        return payload
    from megatron_entcov.distributed import collectives  # here, so a lock alone needs no torch

    box = [payload]
    collectives.broadcast_object_list(box, src=0)
    return box[0]
