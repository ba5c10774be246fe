"""Colocated mode's trainer offload (policy/offload.py) on CPU: while the engine generates the rollouts, the
trainer's weights, gradient buffers and optimizer state have no storage at all, and a run with offload ends
bit-identical to the same run without it (weights, optimizer state, metrics), in one process and at dp2 with
the distributed optimizer. The mem/* tags hold the process's own figures (max over ranks)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

TINY = [
    *TINY_MODEL, "model.add_qkv_bias=true", *TINY_STEP, "optim.num_mini_batches=2", "optim.lr=1e-2",
    "loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "loss.entropy_coef=0.01", "metrics.log_interval=1",
    "steps=3", "checkpoint.save_interval=2",
]


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _run(cfg_args, ps, offload: bool):
    from megatron_entcov.config import load_config
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, cfg_args).resolve(ps.world_size)
    trainer = Trainer(cfg, ps)
    # release_memory needs GPU servers; the colocation does not (the local engine's release/resume do nothing)
    trainer.colocation.offload.enabled = offload
    seen = []
    if trainer.engine is not None:
        generate = trainer.engine.generate

        def watched(*args, **kwargs):
            weights = [p for c in trainer.actor.chunks for p in c.parameters()]
            optimizer_state = trainer.colocation.offload._optimizer_state()
            seen.append((trainer.colocation.offload.offloaded, _storage_bytes(weights),
                         _storage_bytes(optimizer_state), _storage_bytes(trainer.colocation.offload._grads())))
            return generate(*args, **kwargs)
        trainer.engine.generate = watched
    last = trainer.train()
    # A colocated run ends as after every checkpoint: gradients freed, optimizer state on the host.
    after_run = (trainer.colocation.offload.offloaded, trainer.colocation.offload.host_bytes)
    trainer.colocation.offload.reload()
    params = {n: p.detach().clone() for c in trainer.actor.chunks for n, p in c.named_parameters()}
    state = [t.detach().clone() for t in trainer.colocation.offload._optimizer_state()]
    host = trainer.colocation.offload.host_bytes
    opt_bytes = sum(t.untyped_storage().nbytes() for t in trainer.colocation.offload._optimizer_state()
                    if t.untyped_storage().data_ptr() not in
                    {p.untyped_storage().data_ptr() for c in trainer.actor.chunks for p in c.parameters()})
    from megatron_entcov.policy.offload import _unique_storages

    kept = _unique_storages([p for c in trainer.actor.chunks for p in c.parameters()]
                            + trainer.colocation.offload._optimizer_state())
    kept_bytes = sum(t.untyped_storage().nbytes() for t in kept)
    trainer.close()
    return last, params, state, seen, (host, after_run, opt_bytes), kept_bytes


def _twin_worker(rank, world_size, run_dir, layout):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel, seed_everything

    base = TINY + layout + [f"output_dir={run_dir}"]
    cfg = load_config(None, base).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    on = _run(base + ["name=offload"], ps, True)
    seed_everything(cfg.seed, ps)                  # the same random init for the twin
    off = _run(base + ["name=plain"], ps, False)
    # Compared here: the tensors stay in this process.
    (m_on, p_on, s_on, seen_on, host, _), (m_off, p_off, s_off, seen_off, _, kept) = on, off
    return {"m_on": m_on, "m_off": m_off, "seen_on": seen_on, "seen_off": seen_off, "host": host, "kept": kept,
            "params": sorted(p_on) == sorted(p_off), "n_state": (len(s_on), len(s_off)),
            "unequal": [n for n in p_on if not torch.equal(p_on[n], p_off[n])]
            + [f"state {i}" for i, (a, b) in enumerate(zip(s_on, s_off)) if not torch.equal(a, b)]}


@pytest.mark.parametrize("layout, world", [([], 1), (["parallel.use_distributed_optimizer=true"], 2)],
                         ids=["one-process", "dp2-distributed-optimizer"])
def test_offload_frees_everything_during_rollouts_and_changes_nothing(tmp_path, layout, world):
    results = run_workers(_twin_worker, world, (str(tmp_path), layout), timeout=400)
    for r in results:
        # Bit-identical training: weights, optimizer state and every training metric.
        assert r["params"] and r["n_state"][0] == r["n_state"][1] > 0
        assert r["unequal"] == []
        for key in ("train/pg_loss", "train/grad_norm", "entropy/mean", "reward/mean", "train/ppo_kl"):
            assert r["m_on"][key] == r["m_off"][key], key
        # Offloaded after the run: gradients and the optimizer state (on the host), not the weights; after
        # reload() nothing stays on the host.
        host, (parts, after_bytes), opt_bytes = r["host"]
        assert host == 0 and set(parts) == {"grads", "optimizer"} and after_bytes == opt_bytes > 0
        # While the engine generated the rollouts (once per step): no trainer storage at all. The post-sync
        # probe also generates (weight_sync.verify=probe, after each sync): then only the weights are there.
        rollouts = [x for x in r["seen_on"] if "weights" in x[0]]
        probes = [x for x in r["seen_on"] if "weights" not in x[0]]
        assert len(rollouts) == 3 and len(probes) == 3
        for parts, weights, optimizer_state, grads in rollouts:
            assert set(parts) == {"grads", "optimizer", "weights"}
            assert weights == optimizer_state == grads == 0
        for parts, weights, _, grads in probes:
            assert set(parts) == {"grads", "optimizer"} and weights > 0 and grads == 0
        # Without offload everything stays put (the optimizer state exists from the first update on).
        assert all(w > 0 and g > 0 for _, w, _, g in r["seen_off"]) and r["seen_off"][-1][2] > 0
        # mem/* tags: host RSS of each phase (CPU: no GPU tags).
        for phase in ("rollout", "train", "sync"):
            assert 0.05 < r["m_on"][f"mem/{phase}/host_rss_GiB"] < 24
            assert f"mem/{phase}/allocated_GiB" not in r["m_on"]
    # The offloaded figure is what the weights and optimizer state occupy (distinct storages), max over ranks.
    expected = max(r["kept"] for r in results) / 2**30
    assert results[0]["m_on"]["mem/offloaded_GiB"] == pytest.approx(expected, rel=1e-12)
    assert "mem/offloaded_GiB" not in results[0]["m_off"]
