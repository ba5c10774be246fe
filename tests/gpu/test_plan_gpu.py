"""The plan against the GPU: a bf16 step of a Qwen2.5-0.5B-shaped model (random weights, one GPU, the real
Actor) measured with torch.cuda's allocator statistics, phase by phase, against `megatron-entcov plan --json` for
the same config (run as its own process: the planner sees no GPU).

- the state (weights + gradient buffers + optimizer state after a step): memory_allocated within 5% of the plan
  (the plan counts the local spec's fp32 norm weights and Adam's step scalars; TE keeps bf16 norms);
- the old-log-prob pass and the training step: the peak above the state (max_memory_allocated) against the
  plan's activation terms, reported as a ratio and held to [0.5, 1.5] until measured ratios narrow it.

The ratios are printed as one JSON line ("plan-vs-measured: {...}"): the GPU check's gpu_tests phase keeps the
output; the README's "Will it fit?" section takes its figures from there.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

QWEN_05B = ["model.num_layers=24", "model.hidden_size=896", "model.ffn_hidden_size=4864",
            "model.num_attention_heads=14", "model.num_query_groups=2", "model.vocab_size=151936",
            "model.add_qkv_bias=true", "model.tie_word_embeddings=true", "model.params_dtype=bfloat16",
            "model.max_position_embeddings=2048", "model.rotary_base=1000000",
            "optim.optimizer=adam", "optim.num_mini_batches=1", "optim.max_tokens_per_micro_batch=2048",
            "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=1", "rollout.max_prompt_len=256",
            "sampling.max_new_tokens=768", "hardware.nodes=1", "hardware.gpus_per_node=1"]


def _batch(ps, cfg):
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.rollout.types import Sample

    g = torch.Generator().manual_seed(5)
    samples = []
    for i in range(8):
        ids = torch.randint(1, 150000, (1024,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:256], response_ids=ids[256:], rollout_logprobs=[0.0] * 768,
                              finish_reason="length", weight_version=0, index=i))
    return rows_from_samples(samples, torch.randn(8, generator=g), pad_id=0, sample_ids=list(range(8)),
                             key_stride=1024, device=ps.device)


def _plan(cfg, tmp_path, attention: str) -> dict:
    from megatron_entcov.config import dump_config

    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    done = subprocess.run([sys.executable, "-m", "megatron_entcov", "plan", "--config", str(path), "--json",
                           "--gpu-memory-gib", f"{memory:.3f}", "--attention", attention],
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def test_the_plan_against_the_allocator(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from megatron_entcov.compat import toolchain
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.policy.actor import Actor

    cfg = load_config(None, QWEN_05B + [f"output_dir={tmp_path}"]).resolve(1)
    attention = "fused" if toolchain.transformer_engine().ok else "local"
    plan = _plan(cfg, tmp_path, attention)["ranks"][0]
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    try:
        actor = Actor(cfg, ps, temperature=1.0)
        batch = _batch(ps, cfg)

        def loss_fn(mb, logprobs, entropy):
            m = mb.loss_mask.float()
            return -(logprobs * m * mb.advantages).sum() / batch.loss_mask.sum(), {}

        actor.train_step(batch, loss_fn)                 # Adam's state exists from here on
        torch.cuda.synchronize()
        state = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        actor.logprobs(batch)
        forward_peak = torch.cuda.max_memory_allocated() - state
        torch.cuda.reset_peak_memory_stats()
        actor.train_step(batch, loss_fn)
        train_peak = torch.cuda.max_memory_allocated() - state
    finally:
        destroy_parallel()
    planned_state = plan["weights_bytes"] + plan["grads_bytes"] + plan["optimizer_bytes"]
    reserve = plan["phases"]["train"] - planned_state - plan["activations_bytes"]
    planned_forward = plan["phases"]["old_logprob"] - planned_state - reserve
    ratios = {"device": torch.cuda.get_device_name(0), "attention": attention,
              "state": state / planned_state, "old_logprob": forward_peak / planned_forward,
              "train": train_peak / plan["activations_bytes"],
              "measured_gib": {"state": state / 2**30, "old_logprob": forward_peak / 2**30,
                               "train": train_peak / 2**30}}
    print("plan-vs-measured: " + json.dumps(ratios))
    assert 0.95 <= ratios["state"] <= 1.05, ratios
    assert 0.5 <= ratios["old_logprob"] <= 1.5, ratios
    assert 0.5 <= ratios["train"] <= 1.5, ratios
