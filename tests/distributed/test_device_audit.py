"""RL and SFT steps with the device audit armed (ENTCOV_DEVICE_AUDIT=1): every tensor the package builds is
judged as a GPU machine would judge it, so a batch left on the host or a host tensor handed to an NCCL group
fails here, on CPU, instead of on the first GPU run (see megatron_entcov/compat/device_audit.py).

Before the batches were moved to ps.device (rows_from_samples(device=...)), the first of these runs failed in
Trainer.__init__: "embedding: host tensor (1, 24) torch.int64 meets device tensor (32, 32)"."""

from __future__ import annotations

import os

import pytest
from dist_utils import TINY_STEP, run_workers, tiny_model

pytestmark = pytest.mark.distributed

TINY = [
    *tiny_model(num_layers=4, add_qkv_bias=True), *TINY_STEP, "optim.num_mini_batches=2", "optim.lr=1e-2",
    "loss.entropy_coef=0.01", "metrics.log_interval=1", "eval.interval=1", "eval.num_prompts=8",
    "checkpoint.save_interval=1",
]


def _armed_rl_worker(rank, world_size, run_dir, layout):
    os.environ["ENTCOV_DEVICE_AUDIT"] = "1"
    from megatron_entcov.compat import device_audit
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + layout + ["steps=2", f"output_dir={run_dir}", "name=armed"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    assert device_audit.active() and ps.device is device_audit.AUDIT_DEVICE
    trainer = Trainer(cfg, ps)
    params = [p for c in trainer.actor.chunks for p in c.parameters()]
    batch, _ = trainer._experience_batch()
    result = trainer.train()
    trainer.close()
    return {"host_params": sum(device_audit.placement(p) != "device" for p in params),
            "batch": {k: device_audit.placement(v) for k, v in vars(batch).items() if v is not None},
            "step": trainer.step, "reward": result.get("reward/mean") if ps.is_rank0 else None}


@pytest.mark.parametrize("layout, world", [
    (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2", "loss.name=clip_cov",
      "loss.clip_cov_ratio=0.2"], 4),
    # Packed micro-batches (index tensors, cu_seqlens, segment ids) under the audit too.
    (["loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "parallel.use_distributed_optimizer=true",
      "optim.max_tokens_per_micro_batch=24"], 2),
], ids=["tp2-pp2-clip_cov", "dp2-kl_cov-distopt-packed"])
def test_rl_steps_pass_the_device_audit(tmp_path, layout, world):
    results = run_workers(_armed_rl_worker, world, (str(tmp_path), layout), timeout=420)
    for r in results:
        assert r["host_params"] == 0
        assert set(r["batch"].values()) == {"device"}, r["batch"]
        assert r["step"] == 2


def _armed_sft_worker(rank, world_size, run_dir):
    os.environ["ENTCOV_DEVICE_AUDIT"] = "1"
    from megatron_entcov.compat import device_audit
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.sft import run_sft

    cfg = load_config(None, TINY + ["sft.steps=2", "sft.batch_size=8", "sft.eval_size=8", f"output_dir={run_dir}", "name=armed_sft"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    assert device_audit.active()
    out = run_sft(cfg, ps)
    return out["accuracy"]


def test_sft_passes_the_device_audit(tmp_path):
    accuracies = run_workers(_armed_sft_worker, 2, (str(tmp_path),), timeout=300)
    assert accuracies[0] == accuracies[1] and 0.0 <= accuracies[0] <= 1.0
