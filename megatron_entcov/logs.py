"""Logging set-up for the command line and the tools: the project's messages at INFO, third-party noise
filtered at its source logger (``--verbose`` shows everything).

Example:
    setup_logging(verbose=args.verbose)        # megatron-entcov train / sft / quickstart
    setup_tool_logging()                        # the converters
"""

from __future__ import annotations

import logging
import os

__all__ = ["setup_logging", "setup_tool_logging"]


def setup_logging(*, verbose: bool = False) -> None:
    """Configure the root logger for a (possibly multi-rank) run: INFO on rank 0, WARNING elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def setup_tool_logging() -> None:
    """Configure logging for a one-process tool (the converters), unless the caller already did."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
