"""StepMetrics (monitor/step.py): each reduction against hand-computed values, in one process and in a fake
two-rank world whose other rank's values are given here; timed() against a fake clock; TokenMean's share of the
data-parallel token count."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_entcov.monitor import step as step_mod
from megatron_entcov.monitor.step import EXACT, LOCAL, MAX, RANK0, SUM, StepMetrics, TokenMean


def _ps(rank0=True):
    return SimpleNamespace(is_rank0=rank0, dp_group="dp-group")


def test_one_process_reductions_accumulate_and_mean_the_mini_batches():
    m = StepMetrics(None, num_mini_batches=4)
    m.add({"rollout/response_len": 7.0}, RANK0)
    m.add({"perf/tokens": 10.0}, SUM)
    m.add({"perf/tokens": 5.0}, SUM)                          # recorded again: adds up
    for loss in (1.0, 2.0, 3.0, 6.0):
        m.add({"train/pg_loss": loss, "coef/kl_cov_coef": loss / 2}, SUM, mini_batch=True)
        m.add({"coef/kl_cov_coef": 0.5}, EXACT, mini_batch=True)   # the exact mean replaces the shares
    m.add({"train/skipped_updates": 1.0}, RANK0)
    m.add({"train/skipped_updates": 1.0}, RANK0)
    m.add({"mem/train/host_rss_GiB": 2.0}, MAX)
    m.add({"mem/train/host_rss_GiB": 1.5}, MAX)
    m.add({"sync/bytes": 8e9}, LOCAL)
    m.ratio("rollout/staleness", 3.0, 0.0, floor=1.0)          # no samples: the floor keeps it finite
    m.derive("sync/GBps", lambda v: v["sync/bytes"] / v["perf/tokens"] / 1e9)
    assert m.reduce() == {"rollout/response_len": 7.0, "perf/tokens": 15.0, "train/pg_loss": 3.0,
                          "coef/kl_cov_coef": 0.5, "train/skipped_updates": 2.0, "mem/train/host_rss_GiB": 2.0,
                          "sync/bytes": 8e9, "rollout/staleness": 3.0, "sync/GBps": 8e9 / 15.0 / 1e9}


def test_rank0_values_count_once():
    m = StepMetrics(_ps(rank0=False))
    m.add({"reward/mean": 0.25}, RANK0)
    m.add({"perf/tokens": 4.0}, SUM)
    assert m.reduce() == {"perf/tokens": 4.0}


def test_max_takes_no_mini_batch_mean():
    with pytest.raises(ValueError, match="MAX"):
        StepMetrics(None, num_mini_batches=2).add({"mem/offloaded_GiB": 1.0}, MAX, mini_batch=True)


def test_timed_adds_up_blocks_under_one_key(monkeypatch):
    clock = iter([10.0, 10.25, 20.0, 20.5, 30.0, 33.0])
    monkeypatch.setattr(step_mod.time, "monotonic", lambda: next(clock))
    m = StepMetrics(None)
    for _ in range(2):
        with m.timed("perf/selection_time_s"):
            pass
    with m.timed("perf/step_time_s"):
        pass
    m.derive("perf/selection_frac", lambda v: v["perf/selection_time_s"] / max(v["perf/step_time_s"], 1e-9))
    assert m.reduce() == {"perf/selection_time_s": 0.75, "perf/step_time_s": 3.0, "perf/selection_frac": 0.25}


class _TwoRanks:
    """The collectives of a two-rank world, seen from rank 0; rank 1 holds ``sums`` and ``maxima``."""

    def __init__(self, sums, maxima):
        self.sums, self.maxima, self.calls = sums, maxima, []

    def all_gather_object(self, out, obj, group=None):
        self.calls.append("all_gather_object")
        self.mine = obj
        out[:] = [obj, (sorted(self.sums), sorted(self.maxima))]

    def reduce_values(self, values, *, group=None, op="sum", dtype=torch.float64):
        self.calls.append(op)
        if op == "sum":
            keys = sorted(set(self.mine[0]) | set(self.sums))
            theirs = [self.sums.get(k, 0.0) for k in keys]
            return torch.tensor(values, dtype=dtype) + torch.tensor(theirs, dtype=dtype)
        keys = sorted(set(self.mine[1]) | set(self.maxima))
        theirs = [self.maxima.get(k, -math.inf) for k in keys]
        return torch.maximum(torch.tensor(values, dtype=dtype), torch.tensor(theirs, dtype=dtype))


def test_two_ranks_one_gather_one_sum_one_max(monkeypatch):
    # Rank 1: the other replica's token shares, a loss metric only it holds (the last pipeline stage), its
    # staleness parts, a larger memory figure, and its own (unreduced) time.
    world = _TwoRanks(sums={"entropy/mean": 0.5, "train/pg_loss": -0.25, "_ratio/rollout/staleness/num": 5.0,
                            "_ratio/rollout/staleness/den": 2.0},
                      maxima={"mem/sync/host_rss_GiB": 3.0, "rollout/staleness_max": 4.0})
    monkeypatch.setattr(step_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(step_mod.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(step_mod.collectives, "all_gather_object", world.all_gather_object)
    monkeypatch.setattr(step_mod.collectives, "reduce_values", world.reduce_values)
    m = StepMetrics(_ps())
    m.add({"entropy/mean": 0.25}, SUM)
    m.add({"reward/mean": 0.75}, RANK0)
    m.ratio("rollout/staleness", 3.0, 2.0)
    m.add({"mem/sync/host_rss_GiB": 2.0, "rollout/staleness_max": 1.0, "mem/train/host_rss_GiB": 1.0}, MAX)
    m.add({"train/weight_version": 3.0}, EXACT)
    m.add({"perf/step_time_s": 1.5}, LOCAL)
    assert m.reduce() == {"entropy/mean": 0.75, "train/pg_loss": -0.25, "reward/mean": 0.75,
                          "rollout/staleness": 2.0, "mem/sync/host_rss_GiB": 3.0, "rollout/staleness_max": 4.0,
                          "mem/train/host_rss_GiB": 1.0, "train/weight_version": 3.0, "perf/step_time_s": 1.5}
    assert world.calls == ["all_gather_object", "sum", "max"]


def test_token_mean_is_a_share_of_the_data_parallel_count(monkeypatch):
    seen = {}

    def reduce_values(values, *, group=None, op="sum", dtype=torch.float64):
        seen["group"] = group
        return torch.tensor(values, dtype=dtype) + 6.0        # the other replica holds 6 valid tokens

    monkeypatch.setattr(step_mod.collectives, "reduce_values", reduce_values)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    values = torch.tensor([[9.0, 1.0, 2.0, 9.0], [3.0, 4.0, 9.0, 9.0]])
    tokens = StepMetrics(_ps()).token_mean(mask)
    assert seen["group"] == "dp-group"
    assert tokens.local_count == 4.0 and tokens.global_count == 10.0
    assert tokens.share(values) == pytest.approx((1 + 2 + 3 + 4) / 10, abs=1e-15)


def test_token_mean_in_one_process_is_the_mean():
    tokens = TokenMean(torch.tensor([[1, 1, 0]]))
    assert tokens.share(torch.tensor([[2.0, 4.0, 100.0]])) == 3.0
    assert TokenMean(torch.zeros(1, 3)).share(torch.ones(1, 3)) == 0.0     # no token: 0, not a division by 0
