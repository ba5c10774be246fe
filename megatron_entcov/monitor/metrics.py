"""Monitoring: metric sums over ranks, TensorBoard event files and the console line (rank 0 only).

Metric keys are ``section/name(unit)``: train/, rollout/, reward/, entropy/, cov/, coef/, law/, sync/, perf/,
mem/, eval/. Evaluation and SFT sum their shares with :func:`reduce_sum_metrics` (a collective); an RL step
declares each key's reduction in step.py. Only ``ps.is_rank0`` writes: besides scalars, the custom-scalars
layout, text, images and histograms that dashboard.py, law_report.py and histograms.py build.

Example:
    logger = MetricsLogger(run_dir, ps, enabled=cfg.metrics.tensorboard)
    totals = reduce_sum_metrics(local_shares, ps)      # one SUM all-reduce over the world
    logger.log(step, totals)                            # TensorBoard + console line
    logger.close()
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_entcov.distributed import collectives

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["reduce_sum_metrics", "MetricsLogger", "Progress", "iter_progress", "read_scalars"]

# The console line shows these (when present), in this order.
_CONSOLE_KEYS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/accuracy", "acc", "{:.3f}"),
    ("entropy/mean", "H", "{:.3f}"),
    ("cov/mean", "cov", "{:.2e}"),
    ("train/ppo_kl", "kl", "{:.1e}"),
    ("train/clip_cov_frac", "clipcov", "{:.1e}"),
    ("train/kl_cov_frac", "klcov", "{:.1e}"),
    ("rollout/response_len", "len", "{:.1f}"),
    ("train/grad_norm", "gnorm", "{:.2e}"),
    ("sft/loss", "loss", "{:.4f}"),
    ("perf/step_time_s", "t", "{:.1f}s"),
    ("eval/accuracy", "eval acc", "{:.3f}"),
    ("eval/entropy", "eval H", "{:.3f}"),
)
_CONSOLE_PREFIXES = (("eval/pass@", "pass@", "{:.3f}"),)
"""Families shown after the fixed keys, one entry per key in sorted order (eval/pass@1, eval/pass@4, ...)."""


def reduce_sum_metrics(local: dict[str, float | torch.Tensor], ps: "ParallelState | None",
                       *, contribute: bool = True) -> dict[str, float]:
    """SUM each metric over all ranks of the world; ranks with ``contribute=False`` add zeros.

    Ranks may hold different key sets (e.g. only last pipeline stages have loss metrics): the key union is
    agreed with one small all_gather_object first. Values must already be shares that sum to the global
    value (losses return them so). One host sync per call: call it once per step, not per micro-batch.
    """
    if ps is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: float(v) for k, v in local.items()} if contribute else {}
    keys_per_rank: list = [None] * dist.get_world_size()
    collectives.all_gather_object(keys_per_rank, sorted(local) if contribute else [])
    keys = sorted(set().union(*keys_per_rank))
    if not keys:
        return {}
    values = [float(local[k]) if contribute and k in local else 0.0 for k in keys]
    return dict(zip(keys, collectives.reduce_values(values).tolist()))


def iter_progress(iterable, total: int, desc: str, enabled: bool = True):
    """Yield from ``iterable`` with a tqdm bar on stderr (a log line every ~10% without tqdm)."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(total // 10, 1)
        for i, item in enumerate(iterable):
            if i % step == 0:
                logger.info("%s: %d/%d", desc, i, total)
            yield item
        return
    yield from tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr)


class Progress:
    """A one-line progress bar for long phases on rank 0 (stderr, only when it is a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, max(total, 1), enabled and sys.stderr.isatty()
        self.done, self.t0 = 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
                             f"{time.monotonic() - self.t0:.1f}s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


class MetricsLogger:
    """TensorBoard writer and console line, active on rank 0 only."""

    def __init__(self, run_dir: str | Path, ps: "ParallelState | None", *, enabled: bool = True,
                 log_interval: int = 1, print_fn=print):
        self.active = ps is None or ps.is_rank0
        self.log_interval = log_interval
        self.print_fn = print_fn
        self.writer = None
        self.tb_dir = Path(run_dir) / "tensorboard"
        if self.active and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.tb_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if step % self.log_interval == 0:
            parts = [f"step {step}"]
            for key, short, fmt in _CONSOLE_KEYS:
                if key in metrics:
                    parts.append(f"{short} {fmt.format(metrics[key])}")
            for prefix, short, fmt in _CONSOLE_PREFIXES:
                family = sorted((k for k in metrics if k.startswith(prefix)), key=lambda k: (len(k), k))
                parts.extend(f"{short}{k[len(prefix):]} {fmt.format(metrics[k])}" for k in family)
            self.print_fn(" | ".join(parts), flush=True)

    @property
    def writes(self) -> bool:
        """Whether this logger writes event files (rank 0 with TensorBoard on): build costly summaries only then."""
        return self.writer is not None

    def layout(self, layout: dict) -> None:
        """A custom-scalars layout (dashboard.entropy_control_layout)."""
        if self.writer is not None:
            self.writer.add_custom_scalars(layout)
            self.writer.flush()

    def text(self, step: int, tag: str, markdown: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, markdown, step)
            self.writer.flush()

    def image(self, step: int, tag: str, hwc) -> None:
        """An RGB image, [H, W, 3] uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")
            self.writer.flush()

    def histograms(self, step: int, values: dict) -> None:
        """One histogram per tag (64 equal-width bins between the sample's min and max); empty arrays skipped."""
        if self.writer is not None and values:
            for tag, array in values.items():
                if len(array):
                    self.writer.add_histogram(tag, array, step, bins=64)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a run's TensorBoard event files: {tag: [(step, value), ...]} sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(run_dir) / "tensorboard"
    if not tb_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} has no tensorboard/ directory; pass a run directory")
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        for ev in acc.Scalars(tag):
            out.setdefault(tag, {})[ev.step] = ev.value  # a resumed run rewrites steps: keep the last
    return {tag: sorted(d.items()) for tag, d in out.items()}
