"""loss.tis_cap end to end: a trainer step with truncated importance sampling runs and logs its metrics.

On CPU the embedded engine samples with the trainer's own float32 numerics, so its log-probs equal the
trainer's recomputed old log-probs to ~1e-6: every IS ratio exp(old - rollout) is 1 to that precision, the
cap never applies, and the weights' mean is 1.
"""

from __future__ import annotations

import math

import pytest
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

TINY = [
    *TINY_MODEL, "model.add_qkv_bias=true", *TINY_STEP, "optim.num_mini_batches=2", "optim.lr=1e-2",
    "loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "loss.entropy_coef=0.01", "metrics.log_interval=1",
    "steps=1",
]


def _worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + ["loss.tis_cap=2.0", f"output_dir={run_dir}", "name=tis"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    try:
        return trainer.train()
    finally:
        trainer.close()


def test_trainer_step_with_tis_logs_plausible_weights(tmp_path):
    (metrics,) = run_workers(_worker, 1, (str(tmp_path),), timeout=300)
    gap = metrics["rollout/logprob_gap"]
    assert gap < 1e-4                                   # same numerics on both sides (float32, CPU)
    assert metrics["train/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    # |mean(exp(d)) - 1| <= mean|exp(d) - 1| ~ mean|d| = the logged gap (first order), up to float32 sums.
    assert abs(metrics["train/is_ratio_mean"] - 1.0) <= 2 * gap + 1e-6
    assert metrics["train/tis_weight_mean"] == pytest.approx(metrics["train/is_ratio_mean"], abs=1e-7)
    assert metrics["train/tis_clip_frac"] == 0.0
    assert math.isfinite(metrics["train/pg_loss"]) and math.isfinite(metrics["train/grad_norm"])
