"""The converters' output directories: never an input, never overwritten silently, written aside and renamed.

Shared by ``weights/to_megatron.py`` and ``weights/to_hf.py``. ``--out`` may not be an input, lie inside one or
contain one, nor be a step directory of or lie inside a Megatron checkpoint root (not even with ``--force``); an
``--out`` that holds a checkpoint is replaced only with ``--force``, a non-empty one that holds none never. The
output is written into ``.NAME.tmp`` and replaces ``--out`` only when complete; any failure leaves ``--out`` as
it was. A full disk is named as such (:class:`NoSpaceLeft`), an unwritable ``--out`` too (:class:`NotWritable`).

Example:
    check_output(out, force, inputs=[("--hf-dir", hf_dir)])   # ValueError: an input, or an existing checkpoint
    check_free_space(out, needed_bytes)                       # NoSpaceLeft
    with writing_output(out, needed=needed_bytes) as tmp:     # write into tmp; renamed to out on success
        ...

Design notes (the rules in full): docs/design/weights.md
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from megatron_entcov.run.disk import format_bytes, free_bytes, nearest_existing_dir, no_space_in

logger = logging.getLogger(__name__)

__all__ = ["TOKENIZER_FILES", "STEP_DIR", "MODEL_CONFIG_FILE", "NoSpaceLeft", "NotWritable", "holds_checkpoint",
           "check_output",
           "check_free_space", "free_bytes", "tmp_dir", "old_dir", "remove_path", "prepare_tmp", "finish_output",
           "writing_output", "copy_hf_side_files", "converter_parser", "run_converter"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
STEP_DIR = "step_000000"
MODEL_CONFIG_FILE = "model_config.yaml"

FULL_BELOW_BYTES = 1 << 20
"""A write that fails while its filesystem has less than this free is reported as 'no space left'."""


class NoSpaceLeft(OSError):
    """The output's filesystem is (or would be) full; errno ENOSPC, and the message names the path and the fix."""

    def __init__(self, message: str, path: str | Path):
        super().__init__(errno.ENOSPC, message, str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.filename)


class NotWritable(OSError):
    """``--out`` cannot be written (a read-only file system, no permission); the errno of the failure, and the
    message names the path and the fix."""

    def __init__(self, message: str, path: str | Path, code: int):
        super().__init__(code, message, str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.filename, self.errno)


def _not_writable(out: Path, exc: OSError) -> NotWritable:
    where = exc.filename or out
    return NotWritable(f"cannot write --out {str(out)!r}: {exc.strerror or exc} (at {str(where)!r}); nothing was "
                       "written. Choose an --out in a writable directory", where, exc.errno or errno.EACCES)


def _writes_near(exc: BaseException, out: Path) -> bool:
    """The OSError is about --out, its temporary sibling or something inside them (not an input file)."""
    if not isinstance(exc, OSError) or isinstance(exc, (NoSpaceLeft, NotWritable)) or not isinstance(
            exc.filename, (str, os.PathLike)):
        return False
    target, parent = _real(exc.filename), _real(out).parent
    return target == parent or parent in target.parents


def holds_checkpoint(path: Path) -> bool:
    markers = ("config.json", "model.safetensors", "model.safetensors.index.json", "latest", "metadata.json",
               "COMPLETE", "model")
    return any((path / m).exists() for m in markers) or any(path.glob("*.safetensors")) or any(path.glob("step_*"))


# --------------------------------------------------------------------------------------------------
# --out against the inputs
# --------------------------------------------------------------------------------------------------


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _relation(a: Path, b: Path) -> str | None:
    """How real path ``a`` relates to real path ``b``: 'is', 'is inside', 'contains' or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def _expand_inputs(inputs: Iterable[tuple[str, str | Path]]) -> list[tuple[str, Path, Path]]:
    """(label, path as given, real path) of each input, plus the targets of symbolic links directly inside an
    input directory (a Hugging Face cache snapshot links every file to ../../blobs/)."""
    out = []
    for label, path in inputs:
        if path is None:
            continue
        path = Path(path)
        out.append((label, path, _real(path)))
        if path.is_dir():
            with contextlib.suppress(OSError):
                for child in path.iterdir():
                    if child.is_symlink():
                        out.append((f"{label} entry {child.name!r} (a link)", child, _real(child)))
    return out


def _check_not_input(out: Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    real_out = _real(out)
    fix = "choose another --out, one that is not an input, not inside one and not containing one"
    for label, path, real in _expand_inputs(inputs):
        shown = f"{str(path)!r}" + (f" (real path {str(real)!r})" if str(real) != os.path.abspath(path) else "")
        rel = _relation(real_out, real)
        if rel is not None:
            out_shown = f"{str(out)!r}" + (f" (real path {str(real_out)!r})" if str(real_out) != os.path.abspath(out)
                                           else "")
            raise ValueError(f"--out {out_shown} {rel} the input {label} {shown}: the converter never writes into, "
                             f"replaces or removes its input, not even with --force; {fix}")
        for what, sibling in (("temporary folder", tmp_dir(out)), ("previous-output folder", old_dir(out))):
            rel = _relation(_real(sibling), real)
            if rel in ("is", "contains"):
                raise ValueError(f"--out {str(out)!r} would use the {what} {str(sibling)!r} (removed before and "
                                 f"after the write), which {rel} the input {label} {shown}; {fix}")


_STEP_NAME = re.compile(r"^step_\d+$")


def _is_checkpoint_root(path: Path) -> bool:
    """A Megatron checkpoints root: a ``latest`` pointer or a complete step directory in it."""
    from megatron_entcov.run.checkpoint import list_complete_steps

    return (path / "latest").is_file() or bool(list_complete_steps(path))


def _check_not_in_checkpoint(out: Path) -> None:
    """ValueError when ``out`` is a step directory of a checkpoint root or lies inside a root or a step: replacing
    it would break that checkpoint (a step replaced by a nested root no longer loads)."""
    real = _real(out)
    fix = ("choose an --out outside any checkpoint (a new directory), or pass the checkpoint root itself to "
           "replace it whole (with --force)")
    for path in (real, *real.parents):
        is_step = _STEP_NAME.match(path.name) and ((path / "COMPLETE").is_file()
                                                   or (path / "model" / "metadata.json").is_file()
                                                   or _is_checkpoint_root(path.parent))
        if is_step:
            where = "is" if path == real else "lies inside"
            raise ValueError(f"--out {str(out)!r} {where} the step directory {path.name} of the checkpoint root "
                             f"{str(path.parent)!r}, which it would break; {fix}")
        if path != real and _is_checkpoint_root(path):
            raise ValueError(f"--out {str(out)!r} lies inside the checkpoint root {str(path)!r}, which it would "
                             f"break; {fix}")


def check_output(out: Path, force: bool, inputs: Iterable[tuple[str, str | Path]] = ()) -> None:
    """ValueError unless ``out`` is absent, empty, or a checkpoint with ``force``; and never when ``out`` is one
    of ``inputs`` ((label, path) pairs such as ("--hf-dir", dir)), lies inside one or contains one, is a step
    directory of a checkpoint root or lies inside a root or a step."""
    out = Path(out)
    _check_not_input(out, inputs)
    _check_not_in_checkpoint(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory; choose a new or empty directory")
    if not any(out.iterdir()):
        return
    if not holds_checkpoint(out):
        raise ValueError(f"--out {str(out)!r} is a non-empty directory that holds no checkpoint; refusing to "
                         "replace it (even with --force): choose a new or empty directory")
    if not force:
        raise ValueError(f"--out {str(out)!r} already holds a checkpoint; pass --force to replace it")


# --------------------------------------------------------------------------------------------------
# Free space
# --------------------------------------------------------------------------------------------------


def check_free_space(out: Path, needed: int) -> None:
    """NoSpaceLeft when the filesystem that will hold ``out`` has less than ``needed`` bytes free."""
    out = Path(out)
    where = nearest_existing_dir(out.parent)
    free = free_bytes(where)
    if free is None or free >= needed:
        return
    both = (" (the existing checkpoint at --out is replaced only after the new one is complete, so both must fit)"
            if out.exists() else "")
    raise NoSpaceLeft(f"no space left for --out {str(out)!r}: the conversion writes about {format_bytes(needed)} but "
                      f"the filesystem of {str(where)!r} has {format_bytes(free)} free{both}; nothing was written. "
                      "Free space there or choose another --out", where)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


# --------------------------------------------------------------------------------------------------
# The temporary sibling and the final rename
# --------------------------------------------------------------------------------------------------


def tmp_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.tmp"


def old_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.old"


def remove_path(path: Path) -> None:
    """Remove a directory tree, a file or a symbolic link (the link only, never what it points to)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def prepare_tmp(out: Path) -> Path:
    """A fresh, empty ``.NAME.tmp`` next to ``out`` (one left by an earlier run that did not finish is removed)."""
    tmp = tmp_dir(out)
    if os.path.lexists(tmp):
        logger.info("convert: removing %s, left by an earlier conversion that did not finish", tmp)
        remove_path(tmp)
    tmp.mkdir(parents=True)
    return tmp


def finish_output(tmp: Path, out: Path) -> None:
    """Put the complete ``tmp`` at ``out``: an existing ``out`` is renamed aside first, removed last, and put
    back if the rename of ``tmp`` fails."""
    tmp, out = Path(tmp), Path(out)
    old = old_dir(out)
    if os.path.lexists(old):
        logger.info("convert: removing %s, left by an earlier conversion that did not finish", old)
        remove_path(old)
    had = os.path.lexists(out)
    if had:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if had:
            os.replace(old, out)
        raise
    if had:
        try:
            remove_path(old)
        except OSError as exc:
            logger.warning("convert: could not remove the replaced output %s (%s); remove it by hand", old, exc)


@contextlib.contextmanager
def writing_output(out: Path, *, owner: bool = True, needed: int | None = None) -> Iterator[Path]:
    """Yield the temporary directory to write ``out`` into; on success it replaces ``out``.

    ``owner`` (rank 0 of a collective write; True for one process) prepares, renames and cleans up; other
    ranks only write into the yielded path after a barrier. On any failure (KeyboardInterrupt too) the owner
    removes the temporary directory and ``out`` is untouched; a failure on a full filesystem is re-raised as
    :class:`NoSpaceLeft` naming the path (the original exception is its cause). ``needed``: the expected
    size, for the message.
    """
    out = Path(out)
    try:
        tmp = prepare_tmp(out) if owner else tmp_dir(out)
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    try:
        yield tmp
        if owner:
            finish_output(tmp, out)
    except BaseException as exc:
        full, filename = False, None
        if not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, ValueError, NoSpaceLeft)):
            full, filename = no_space_in(exc)
            free = free_bytes(tmp if tmp.exists() else out.parent)
            full = full or (free is not None and free < FULL_BELOW_BYTES)
        if owner and os.path.lexists(tmp):
            try:
                remove_path(tmp)
                logger.info("convert: removed the unfinished %s", tmp)
            except OSError as cleanup_exc:
                logger.warning("convert: could not remove the unfinished %s (%s); remove it by hand", tmp,
                               cleanup_exc)
        if not full and _writes_near(exc, out):
            raise _not_writable(out, exc) from exc
        if not full:
            raise
        free = free_bytes(out.parent)
        size = f"; the conversion writes about {format_bytes(needed)}" if needed else ""
        kept = (" and the existing checkpoint at --out is unchanged" if os.path.lexists(out) else "")
        removed = "was removed" if owner else "is removed by rank 0"
        raise NoSpaceLeft(
            f"no space left on device while writing --out {str(out)!r} (at {filename or str(tmp)!r}: "
            f"{_first_line(exc)}){size}. The unfinished {str(tmp)!r} {removed}{kept}; "
            f"{format_bytes(free) + ' are free there now' if free is not None else 'free space unknown'}. "
            "Free space on that filesystem or choose another --out", filename or tmp) from exc


def copy_hf_side_files(src: Path, dst: Path, *, config: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES + (("config.json",) if config else ()):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def converter_parser(direction: str, description: str, *, out_help: str) -> argparse.ArgumentParser:
    """The converters' shared command line: ``--out``, ``--dtype`` and ``--force``; the caller adds its input."""
    parser = argparse.ArgumentParser(prog=f"megatron-entcov convert {direction}", description=description)
    parser.add_argument("--out", required=True,
                        help=out_help + "; never an input, inside one or containing one")
    parser.add_argument("--dtype", default=None, help="float32|bfloat16|float16; default: the checkpoint's")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing checkpoint at --out (after the new one is complete)")
    return parser


def run_converter(convert: Callable[[], object]) -> int:
    """Run a converter with the tools' logging; a bad input (ValueError), a full disk (NoSpaceLeft), an
    unwritable ``--out`` (NotWritable) or any other file error (an OSError names its file) is one line on stderr
    and exit code 2."""
    from megatron_entcov.run.logs import setup_tool_logging

    setup_tool_logging()
    try:
        convert()
    except (ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
