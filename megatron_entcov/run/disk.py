"""Disk-space facts for error messages: free bytes where a path will be written, and whether a failure was a
full disk (ENOSPC anywhere in an exception chain, including the per-rank failures torch's checkpoint errors
carry). Shared by checkpoint saves and the converters.

Example:
    full, filename = no_space_in(error)
    free = free_bytes(out_dir)          # None when it cannot be read
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exception_chain", "no_space_in", "nearest_existing_dir", "free_bytes", "format_bytes"]

_NO_SPACE_TEXT = ("no space left on device", "os error 28", "storagefull", "enospc")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, the per-rank failures a torch CheckpointException carries and the
    members of an exception group, each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if failures is None:
            failures = getattr(e, "_failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                failure = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(failure, BaseException):
                    todo.append(failure)
        todo += [x for x in getattr(e, "exceptions", ()) or () if isinstance(x, BaseException)]


def no_space_in(exc: BaseException) -> tuple[bool, str | None]:
    """(errno ENOSPC or its text somewhere in the chain, the first file name an OSError in it names, if any)."""
    found, filename = False, None
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.filename and filename is None:
            filename = str(e.filename)
        if getattr(e, "errno", None) == errno.ENOSPC or any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            found = True
    return found, filename


def nearest_existing_dir(path: str | Path) -> Path:
    """``path`` or its nearest existing ancestor directory (where a write under ``path`` would land)."""
    path = Path(os.path.abspath(path))
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the filesystem that holds ``path`` (or its nearest existing ancestor)."""
    try:
        return shutil.disk_usage(nearest_existing_dir(path)).free
    except OSError:
        return None


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units: '512 B', '3.4 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
