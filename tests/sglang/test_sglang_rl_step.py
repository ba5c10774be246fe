"""One RL step of the trainer on the arithmetic task with rollouts from a real SGLang server (CPU): the trainer
pushes its weights to the server (disk or distributed sync), the post-sync probe checks the server computes with
them, it generates there, trains, and the rollout log-probs agree with the trainer's own recomputation (the
|rollout - train| gap is the end-to-end check that both hold the same weights).

Run: make test-sglang
"""

from __future__ import annotations

import pytest
from dist_utils import run_workers

pytestmark = pytest.mark.sglang

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=32", "model.make_vocab_size_divisible_by=8",
    "model.max_position_embeddings=64", "model.add_qkv_bias=true",
    "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
    "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "optim.num_mini_batches=2", "optim.lr=1e-2",
    "loss.name=clip_cov", "loss.entropy_coef=0.01", "metrics.log_interval=1",
]


def _rl_step_worker(rank, world_size, run_dir, method):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.rollout.sglang import SGLangEngine
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + ["steps=2", f"output_dir={run_dir}", "name=sglang"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    from sglang_utils import cpu_servers

    engine = SGLangEngine(cfg.model, cpu_servers(num_servers=1, sync_method=method, max_inflight=32,
                                                 request_timeout_s=cfg.rollout.sglang.request_timeout_s),
                          seed=cfg.seed, log_dir=f"{run_dir}/sglang_logs")
    trainer = Trainer(cfg, ps, engine=engine)       # syncs its weights to the server (version 0)
    metrics = [trainer.train_step() for _ in range(2)]   # each step ends with a sync (version += 1)
    health = engine.health()
    trainer.close()
    return {"metrics": metrics, "health": health, "version": trainer.weight_version}


@pytest.mark.parametrize("method", ["disk", "distributed"])
def test_rl_steps_with_sglang_rollouts(tmp_path, method):
    (res,) = run_workers(_rl_step_worker, 1, args=(str(tmp_path), method), timeout=600)
    for step, m in enumerate(res["metrics"], 1):
        print(f"\n[sglang] RL step {step} ({method} sync): |rollout - train| log-prob gap {m['rollout/logprob_gap']:.2e}, "
              f"sync {m.get('sync/time(s)', float('nan')):.2f} s")
        assert m["rollout/logprob_gap"] < 1e-4, m["rollout/logprob_gap"]
        # The post-sync probe: the server computes with the weights just pushed.
        print(f"[sglang] RL step {step}: probe gap {m['sync/probe_gap']:.2e} over {m['sync/probe_tokens']:.0f} "
              f"tokens; server 0 generated {m['rollout/server0/tokens_per_s']:.0f} tokens/s")
        assert m["sync/probe_tokens"] > 0 and m["sync/probe_gap"] < 1e-4, m
        assert m["rollout/server0/tokens_per_s"] > 0 and m["rollout/live_servers"] == 1
    assert res["health"]["servers"][0]["weight_version"] == res["version"] == res["health"]["weight_version"]
    assert res["health"]["last_sync"]["method"] == method


def _dp_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + ["steps=1", f"output_dir={run_dir}", "name=sglang_dp2", "rollout.engine=sglang",
                                    "rollout.sglang.num_servers=1", "rollout.sglang.request_timeout_s=120",
                                    "rollout.sglang.server_device=cpu"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)            # each replica's generating rank launches its own server (from_config)
    metrics = trainer.train_step()
    urls = [s.url for s in trainer.engine.servers]
    trainer.close()
    return {"dp": ps.dp_size, "metrics": metrics, "urls": urls}


def test_two_data_parallel_replicas_each_generate_on_their_own_server(tmp_path):
    results = run_workers(_dp_worker, 2, args=(str(tmp_path),), timeout=600)
    assert [r["dp"] for r in results] == [2, 2]
    assert results[0]["urls"] != results[1]["urls"]
    m = results[0]["metrics"]
    print(f"\n[sglang] dp=2: server tokens/s {m['rollout/dp0/server0/tokens_per_s']:.0f} / "
          f"{m['rollout/dp1/server0/tokens_per_s']:.0f}, probe gap {m['sync/probe_gap']:.2e}, "
          f"|rollout - train| {m['rollout/logprob_gap']:.2e}")
    assert m["rollout/dp0/server0/tokens_per_s"] > 0 and m["rollout/dp1/server0/tokens_per_s"] > 0
    assert m["rollout/live_servers"] == 2
    assert m["sync/probe_gap"] < 1e-4 and m["rollout/logprob_gap"] < 1e-4
    assert (tmp_path / "sglang_dp2" / "sglang" / "dp1").is_dir()
