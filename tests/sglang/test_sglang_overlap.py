"""rollout.overlap with a real SGLang server (CPU): three RL steps where steps 2 and 3 train on rollouts the server
generated while the step before trained, one weight version behind.

Checked: the samples of step t carry the server's weight version max(t - 2, 0) (reported by SGLang itself),
rollout/staleness is 0, 1, 1; the first step's rollout log-probs agree with the trainer's recomputation (same
weights) while the stale steps' do not, and the TIS statistics show it; the server ends at the trainer's version.

Run: make test-sglang
"""

from __future__ import annotations

import pytest
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.sglang

TINY = [*TINY_MODEL, "model.add_qkv_bias=true", *TINY_STEP, "optim.num_mini_batches=1", "optim.lr=1e-2",
        "loss.name=ppo", "loss.entropy_coef=0.01", "loss.tis_cap=2.0", "metrics.log_interval=1",
        "rollout.overlap=true", "steps=3"]


def _worker(rank, world_size, run_dir):
    from sglang_utils import cpu_servers

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.rollout.sglang import SGLangEngine
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + [f"output_dir={run_dir}", "name=sglang_overlap"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    engine = SGLangEngine(cfg.model, cpu_servers(num_servers=1, sync_method="disk", max_inflight=32,
                                                 request_timeout_s=cfg.rollout.sglang.request_timeout_s),
                          seed=cfg.seed, log_dir=f"{run_dir}/sglang_logs")
    trainer = Trainer(cfg, ps, engine=engine)
    versions: list[set[int]] = []
    inner = trainer._experience_batch

    def experience_batch():
        batch, exp = inner()
        versions.append({s.weight_version for s in exp.samples})
        return batch, exp

    trainer._experience_batch = experience_batch
    try:
        metrics = []
        while trainer.step < cfg.steps:
            metrics.append(trainer.train_step())
            trainer.step += 1
        health = engine.health()
    finally:
        trainer.close()
    return {"metrics": metrics, "versions": versions, "health": health, "version": trainer.weight_version}


def test_overlapped_steps_with_a_real_sglang_server(tmp_path):
    (res,) = run_workers(_worker, 1, args=(str(tmp_path),), timeout=600)
    assert res["versions"] == [{0}, {0}, {1}]
    for step, m in enumerate(res["metrics"], 1):
        print(f"\n[sglang overlap] step {step}: staleness {m['rollout/staleness']:.0f}, |rollout - train| gap "
              f"{m['rollout/logprob_gap']:.2e}, is_ratio_mean {m['train/is_ratio_mean']:.4f}, waited "
              f"{m['perf/overlap_wait(s)']:.2f} s")
        lag = 0.0 if step == 1 else 1.0
        assert m["rollout/staleness"] == lag and m["rollout/staleness_max"] == lag
        assert m["sync/probe_gap"] < 1e-4                 # every sync (after the wait) reached the server
    first, stale = res["metrics"][0], res["metrics"][1:]
    assert first["rollout/logprob_gap"] < 1e-4 and first["train/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    for m in stale:                                       # one optimizer step of mismatch, which TIS weighs
        assert m["rollout/logprob_gap"] > 1e-3 and m["train/is_ratio_mean"] != pytest.approx(1.0, abs=1e-4)
    assert res["health"]["servers"][0]["weight_version"] == res["version"] == 3
