"""One step's metrics: each key is recorded with its reduction over ranks where it is made, phases are timed
with ``timed(key)``, and one :meth:`StepMetrics.reduce` runs the collectives (one object gather of the key
sets, one SUM and one MAX all-reduce over the world; none in one process).

Reductions: SUM (this rank's share; token means as shares of the data-parallel token count, counters over
replicas), RANK0 (one value of the step, counted once), MAX, EXACT (the same on every rank: not reduced;
replaces a share of the same key), LOCAL (this rank's own measurement, e.g. a time: not reduced). Ratios of
sums and values derived from the reduced ones (rates, fractions) are computed after the reduction.

Example:
    m = StepMetrics(ps, num_mini_batches=2)
    with m.timed("perf/train_time_s"):
        m.add(result.metrics, SUM, mini_batch=True)        # the mean of the mini-batches' shares
    totals = m.reduce()                                    # collective: every rank calls it once per step
Design notes: docs/design/monitor.md
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_entcov.distributed import collectives

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

__all__ = ["StepMetrics", "TokenMean", "SUM", "RANK0", "MAX", "EXACT", "LOCAL"]

SUM = "sum"
"""This rank's share of the value: summed over the world (ranks that hold none add nothing)."""
RANK0 = "rank0"
"""One value of the whole step, known on rank 0 (e.g. the batch's reward statistics): counted once."""
MAX = "max"
"""The largest value over the world (memory figures, the oldest sample)."""
EXACT = "exact"
"""The same on every rank (a constant of the step): not reduced, so no float noise."""
LOCAL = "local"
"""This rank's own measurement (wall-clock times, bytes it sent): not reduced; rank 0 logs its own."""

_RATIO = "_ratio/"
"""Prefix of the numerator and denominator sums of a ratio (not logged)."""


class TokenMean:
    """A token mean over the step's valid response tokens, as this rank's share: the sum over its own tokens
    divided by the count over the data-parallel group (collective at construction), so shares add up over the
    replicas to the global mean."""

    def __init__(self, loss_mask: torch.Tensor, group=None):
        self.mask = loss_mask.float()
        self.local_count = float(self.mask.sum())
        self.global_count = float(collectives.reduce_values([self.local_count], group=group))

    def share(self, values: torch.Tensor) -> float:
        """This rank's share of the mean of ``values`` [B, T] over the valid tokens."""
        return float((values * self.mask).sum()) / max(self.global_count, 1.0)


class StepMetrics:
    """The metrics of one step on one rank, each with its reduction; :meth:`reduce` gives the logged values."""

    def __init__(self, ps: "ParallelState | None", *, num_mini_batches: int = 1):
        """``ps``: None = one process (no collective). ``num_mini_batches``: the step's optimizer mini-batches,
        for values recorded per mini-batch (``mini_batch=True``)."""
        self.ps, self.num_mini_batches = ps, num_mini_batches
        self._pools: dict[str, dict[str, float]] = {SUM: {}, MAX: {}, EXACT: {}, LOCAL: {}}
        self._floors: dict[str, float] = {}
        self._derived: dict[str, Callable[[dict[str, float]], float]] = {}

    def add(self, values: Mapping[str, float], reduce: str, *, mini_batch: bool = False) -> None:
        """Record ``values`` reduced by ``reduce`` (SUM, RANK0, MAX, EXACT or LOCAL). A key recorded again
        accumulates (its values add up). ``mini_batch``: one mini-batch's value; the step's is the mean over the
        mini-batches (adds value / num_mini_batches)."""
        if reduce == RANK0:
            if self.ps is not None and not self.ps.is_rank0:
                return
            reduce = SUM
        if reduce == MAX and mini_batch:
            raise ValueError("a MAX metric takes no mini-batch mean")
        pool = self._pools[reduce]
        for key, value in values.items():
            if mini_batch:
                pool[key] = pool.get(key, 0.0) + value / self.num_mini_batches
            elif reduce == MAX:
                pool[key] = max(pool[key], value) if key in pool else value
            else:
                pool[key] = pool[key] + value if key in pool else value

    def ratio(self, key: str, numerator: float, denominator: float, *, floor: float = 1.0) -> None:
        """``key`` = (sum of the numerators) / max(sum of the denominators, floor), over the world."""
        self.add({f"{_RATIO}{key}/num": numerator, f"{_RATIO}{key}/den": denominator}, SUM)
        self._floors[key] = floor

    def derive(self, key: str, fn: Callable[[dict[str, float]], float]) -> None:
        """``key`` = ``fn(reduced values)``, computed after the reduction (rates and fractions of logged keys)."""
        self._derived[key] = fn

    def token_mean(self, loss_mask: torch.Tensor) -> TokenMean:
        """Token means over ``loss_mask`` [B, T] as this rank's shares (collective over the data-parallel
        group): record them as SUM on the ranks that own results."""
        return TokenMean(loss_mask, group=self.ps.dp_group if self.ps is not None else None)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Wall-clock seconds of the block, as the LOCAL ``key``; blocks timed under one key add up."""
        start = time.monotonic()
        yield
        self.add({key: time.monotonic() - start}, LOCAL)

    def reduce(self) -> dict[str, float]:
        """The step's values: SUM and RANK0 summed, MAX maximised over the world (collective: every rank calls
        it, whatever keys it holds), then ratios, EXACT and LOCAL values (they replace a reduced value of the
        same key), and the derived keys."""
        sums, maxima = self._all_reduce(self._pools[SUM], self._pools[MAX])
        out = {k: v for k, v in sums.items() if not k.startswith(_RATIO)}
        for key, floor in self._floors.items():
            out[key] = sums[f"{_RATIO}{key}/num"] / max(sums[f"{_RATIO}{key}/den"], floor)
        out.update(maxima)
        out.update(self._pools[EXACT])
        out.update(self._pools[LOCAL])
        for key, fn in self._derived.items():
            out[key] = fn(out)
        return out

    def _all_reduce(self, sums: dict[str, float], maxima: dict[str, float]):
        if self.ps is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return {k: float(v) for k, v in sums.items()}, {k: float(v) for k, v in maxima.items()}
        # Ranks may hold different keys (loss metrics only on the last pipeline stage): agree on the union.
        keys_per_rank: list = [None] * dist.get_world_size()
        collectives.all_gather_object(keys_per_rank, (sorted(sums), sorted(maxima)))
        sum_keys = sorted(set().union(*(k for k, _ in keys_per_rank)))
        max_keys = sorted(set().union(*(k for _, k in keys_per_rank)))
        summed = collectives.reduce_values([float(sums.get(k, 0.0)) for k in sum_keys]).tolist() \
            if sum_keys else []
        maxed = collectives.reduce_values([float(maxima.get(k, float("-inf"))) for k in max_keys],
                                          op="max").tolist() if max_keys else []
        return dict(zip(sum_keys, summed)), dict(zip(max_keys, maxed))
