"""Logging set-up for the command line and the tools: the project's messages at INFO, third-party noise
filtered at its source logger (``--verbose`` shows everything).

The project's loggers (``megatron_entcov.*``) are never quietened. ``QUIET_LOGGERS`` (third-party loggers whose
INFO records are internals) are set to WARNING; each ``QUIET_WARNINGS`` filter silences an expected Python
warning attributed to one named module. ``verbose=True`` (``--verbose``) or ``level="debug"`` drops both lists.
Ranks other than 0 log at WARNING or above whatever the level.

Example:
    setup_logging(verbose=args.verbose, level=args.log_level)   # megatron-entcov train / sft / quickstart
    setup_tool_logging()                                        # the converters

Design notes: docs/design/run.md
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["LEVELS", "QUIET_LOGGERS", "QUIET_WARNINGS", "setup_logging", "setup_tool_logging"]

LEVELS = ("debug", "info", "warning", "error")
"""Values of ``--log-level``."""

QUIET_LOGGERS: dict[str, str] = {
    "megatron.core.distributed.distributed_data_parallel":
        "'Setting up DistributedDataParallel with config DistributedDataParallelConfig(...)', one long line",
    "megatron.core.distributed.param_and_grad_buffer":
        "'Params for bucket N': every parameter name, one line each, for every model built",
    "megatron.core.distributed.fsdp":
        "'Detected Megatron Core, using Megatron-FSDP' at import, though Megatron-FSDP is not used",
    "megatron.core.optimizer":
        "'Setting up optimizer with config OptimizerConfig(...)', one long line",
    "megatron.core.optimizer_param_scheduler":
        "'> learning rate decay style: ...'",
    "tensorboard":
        "'No path found after <event file>' when the summary writer closes",
}
"""Third-party logger -> what it prints at INFO; set to WARNING unless verbose."""

QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # Megatron's torch checkpoint strategy calls torch's deprecated load_state_dict on every load.
    (FutureWarning, r"megatron\.core\.dist_checkpointing\.", r""),
    # Megatron's distributed checkpoints are built on ShardedTensor; torch's planner says so on every load.
    (FutureWarning, r"torch\.distributed\.checkpoint\.",
     r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # Import-time fallbacks when Apex / Transformer Engine are not installed (the CPU path never has them).
    (UserWarning, r"megatron\.core\.", r"Apex is not installed"),
    (UserWarning, r"megatron\.core\.", r"Transformer Engine and Apex are not installed"),
    # TransformerConfig's own default cuda_graph_scope="full" warns that "full" is deprecated.
    (UserWarning, r"megatron\.core\.transformer\.transformer_config$", r"full scope is deprecated"),
)
"""(category, module regex, message regex) of Python warnings ignored unless verbose; the module regex must
match the module the warning is attributed to (``warnings.filterwarnings(module=...)``)."""

_HANDLER_FLAG = "_megatron_entcov_handler"
_installed_filters: list[tuple] = []


def _parse_level(level: str | int | None) -> int:
    if level is None:
        return logging.INFO
    if isinstance(level, int):
        return level
    name = level.strip().lower()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    return getattr(logging, name.upper())


def _quiet_third_party(quiet: bool) -> None:
    """Apply (quiet=True) or undo (quiet=False) QUIET_LOGGERS and QUIET_WARNINGS."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    for entry in _installed_filters:
        try:
            warnings.filters.remove(entry)
        except ValueError:
            pass
    _installed_filters.clear()
    if quiet:
        for category, module, message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
            _installed_filters.append(warnings.filters[0])
    else:
        mutated = getattr(warnings, "_filters_mutated", None)  # forget warnings already ignored once
        if mutated is not None:
            mutated()


def _install_handler(fmt: str, datefmt: str | None) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)


def setup_logging(*, verbose: bool = False, level: str | int | None = None) -> None:
    """Configure logging for a (possibly multi-rank) run; safe to call again (it replaces its own handler).

    level: "debug" | "info" | "warning" | "error" (default "info") on rank 0; other ranks (env RANK) log at
    WARNING or above. verbose, or level "debug", keeps third-party INFO records and expected warnings too.
    """
    rank = int(os.environ.get("RANK", "0"))
    lvl = _parse_level(level)
    logging.getLogger().setLevel(lvl if rank == 0 else max(lvl, logging.WARNING))
    _install_handler(f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    _quiet_third_party(not (verbose or lvl <= logging.DEBUG))


def setup_tool_logging(*, verbose: bool = False) -> None:
    """Configure logging for a one-process tool (the converters), unless the caller already did."""
    if logging.getLogger().handlers:
        return
    logging.getLogger().setLevel(logging.INFO)
    _install_handler("%(asctime)s %(levelname)s %(name)s: %(message)s", None)
    _quiet_third_party(not verbose)
