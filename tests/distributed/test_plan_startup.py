"""The trainer's start-up plan (plan/command.py check_at_start, called by `train` before the model is built): on
GPUs too small for the run every rank stops with the plan's table (hardware.fit_check=error), or logs it and goes
on (warn); off skips it. CPU runs skip it unless a GPU size is given, as here."""

from __future__ import annotations

import pytest
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed


def _check(rank: int, world_size: int, fit_check: str, gib: float):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.plan.command import check_at_start

    cfg = load_config("configs/quickstart.yaml", [*TINY_MODEL, *TINY_STEP, f"hardware.fit_check={fit_check}"])
    cfg.resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=0)
    try:
        check_at_start(cfg, ps, gpu_memory_gib=gib, gpus_per_node=world_size)
    except ValueError as err:
        return str(err)
    return "went on"


def test_a_run_that_cannot_fit_stops_every_rank_with_the_table():
    out = run_workers(_check, 2, args=("error", 1.0))
    assert out[0] == out[1]
    assert out[0].startswith("this run does not fit its GPUs (megatron-entcov plan):\nplan of ")
    assert "1 node(s) x 2 GPUs of 1.0 GiB; tp 1 pp 1 dp 2" in out[0] and "DOES NOT FIT" in out[0]
    assert out[0].endswith("change the config as advised, or set hardware.fit_check=warn to start anyway")


def test_warn_goes_on_and_a_run_that_fits_goes_on():
    assert run_workers(_check, 1, args=("warn", 1.0)) == ["went on"]
    assert run_workers(_check, 1, args=("error", 8.0)) == ["went on"]
    assert run_workers(_check, 1, args=("off", 0.001)) == ["went on"]
