"""The converters' output directories: never overwritten silently, written to a temporary sibling and renamed.

Shared by ``weights/to_megatron.py`` and ``weights/to_hf.py``.

Example:
    check_output(out, force)             # ValueError unless absent, empty, or a checkpoint with force
    tmp = tmp_dir(out); ...write into tmp...; finish_output(tmp, out)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

__all__ = ["TOKENIZER_FILES", "STEP_DIR", "MODEL_CONFIG_FILE", "holds_checkpoint", "check_output", "tmp_dir",
           "finish_output", "copy_hf_side_files", "converter_parser", "run_converter"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
STEP_DIR = "step_000000"
MODEL_CONFIG_FILE = "model_config.yaml"


def holds_checkpoint(path: Path) -> bool:
    markers = ("config.json", "model.safetensors", "model.safetensors.index.json", "latest", "metadata.json",
               "COMPLETE", "model")
    return any((path / m).exists() for m in markers) or any(path.glob("*.safetensors")) or any(path.glob("step_*"))


def check_output(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not holds_checkpoint(out):
        raise ValueError(f"--out {str(out)!r} is a non-empty directory that holds no checkpoint; refusing to "
                         "replace it (even with --force): choose a new or empty directory")
    if not force:
        raise ValueError(f"--out {str(out)!r} already holds a checkpoint; pass --force to replace it")


def tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def finish_output(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def copy_hf_side_files(src: Path, dst: Path, *, config: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES + (("config.json",) if config else ()):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def converter_parser(direction: str, description: str, *, out_help: str) -> argparse.ArgumentParser:
    """The converters' shared command line: ``--out``, ``--dtype`` and ``--force``; the caller adds its input."""
    parser = argparse.ArgumentParser(prog=f"megatron-entcov convert {direction}", description=description)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--dtype", default=None, help="float32|bfloat16|float16; default: the checkpoint's")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    return parser


def run_converter(convert: Callable[[], object]) -> int:
    """Run a converter with the tools' logging; a bad input (ValueError) is one line on stderr and exit code 2."""
    from megatron_entcov.logs import setup_tool_logging

    setup_tool_logging()
    try:
        convert()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
