"""`megatron-entcov plan` end to end: every shipped config plans (the Qwen ones fit their stated hardware), the
phases are the documented sums of independently computed parts, advice is planned again, and the command's
real entry point prints the table or the JSON with the exit status a batch script relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_entcov.config import load_config
from megatron_entcov.plan.activations import estimate_activations
from megatron_entcov.plan.advice import plan_with_advice
from megatron_entcov.plan.planner import StateCache, make_plan
from megatron_entcov.plan.states import rank_states

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
GIB = 1 << 30
CACHE = StateCache()
SEVEN_B = ROOT / "configs" / "qwen2.5-7b_kl_cov.yaml"
TOO_BIG = ["rollout.sglang.release_memory=false", "parallel.use_distributed_optimizer=false",
           "optim.max_tokens_per_micro_batch=30720"]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_plans_and_the_qwen_ones_fit(name):
    cfg = load_config(ROOT / "configs" / name)
    plan = make_plan(cfg, cache=CACHE)
    assert plan.world_size == cfg.hardware.world_size
    if name.startswith("qwen"):
        assert plan.fits, [(r.stage, r.role, r.peak_phase, r.peak_bytes / GIB) for r in plan.roles]
        assert plan.attention == "fused"


def test_the_phases_are_the_documented_sums():
    """Qwen2.5-7B KL-Cov, colocated one-GPU servers at --mem-fraction-static 0.6 that release their memory: the
    trainer's state is in host memory while they generate, back for training, the weights alone for the sync."""
    cfg = load_config(SEVEN_B)
    plan = make_plan(cfg, cache=CACHE)
    memory = int(79.6 * GIB)
    (state,) = rank_states(cfg.model, cfg.parallel, world_size=8, optimizer="adam")
    acts = estimate_activations(cfg.model, cfg.parallel, micro_batch_tokens=10240,
                                max_seq_len=cfg.rollout.max_prompt_len + cfg.sampling.max_new_tokens, packed=True,
                                attention="fused", stage=0)
    reserve, pool, overhead, context = 2 * GIB, int(0.6 * memory), 3 * GIB, 1 * GIB
    state_bytes = state.weights_bytes + state.grads_bytes + state.optimizer_bytes
    server_weights = 7_615_616_512 * 2                  # Qwen2.5-7B's parameters in bf16 on each one-GPU server
    largest = 152064 * 3584 * 2                                                       # the embedding
    for role in plan.roles:                       # every GPU hosts a server (4 per replica of 4 GPUs)
        assert role.phases["rollout"] == pool + overhead + reserve
        assert role.phases["old_logprob"] == state_bytes + acts.forward_bytes + context + reserve
        assert role.phases["train"] == state_bytes + acts.train_bytes + context + reserve
        assert role.phases["checkpoint"] == (state.weights_bytes + state.optimizer_bytes + server_weights + context
                                             + reserve)
        buffers = (1024 << 20) + largest if role.role.startswith("generating") else largest // 4
        assert role.phases["sync"] == state.weights_bytes + buffers + server_weights + context + reserve
        assert role.host_offload_bytes == state_bytes
    assert {r.role: r.ranks for r in plan.roles} == {"generating rank + server GPU": 2, "server GPU": 6}


def test_advice_is_planned_again_and_what_fits_comes_first():
    cfg = load_config(SEVEN_B, TOO_BIG)
    plan = plan_with_advice(cfg, cache=CACHE)
    assert not plan.fits and plan.advice
    fitting = [a.plan.fits for a in plan.advice]
    assert fitting == sorted(fitting, reverse=True) and fitting[0]
    for advice in plan.advice[:3]:
        again = make_plan(load_config(SEVEN_B, TOO_BIG + list(advice.change)), cache=CACHE)
        assert again.peak_bytes == advice.plan.peak_bytes and again.fits == advice.plan.fits
    assert ("rollout.sglang.release_memory=true",) in [a.change for a in plan.advice if a.plan.fits]


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_entcov", "plan", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_the_command_prints_json_and_exits_by_fit():
    done = _plan("--config", str(SEVEN_B), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    cfg = load_config(SEVEN_B)
    (state,) = rank_states(cfg.model, cfg.parallel, world_size=8, optimizer="adam")
    assert out["layout"] == {"tp": 4, "pp": 1, "dp": 2, "cp": 1, "ep": 1} and out["fits"] is True
    assert out["gpu_memory_gib"] == 79.6
    for rank in out["ranks"]:
        assert (rank["params"], rank["weights_bytes"], rank["grads_bytes"], rank["optimizer_bytes"]) == (
            state.params, state.weights_bytes, state.grads_bytes, state.optimizer_bytes)
        assert rank["peak_bytes"] == max(rank["phases"].values()) and rank["fits"] is True

    done = _plan("--config", str(SEVEN_B), *[f"--set={s}" for s in TOO_BIG], "--gpu-memory-gib", "79.6")
    assert done.returncode == 1, done.stderr
    assert "DOES NOT FIT" in done.stdout and "--set rollout.sglang.release_memory=true: fits" in done.stdout

    done = _plan("--config", str(SEVEN_B), *[f"--set={s}" for s in TOO_BIG], "--set", "hardware.fit_check=warn",
                 "--enforce")
    assert done.returncode == 0 and "starting anyway (hardware.fit_check=warn)" in done.stderr

    done = _plan("--config", str(SEVEN_B), "--nodes", "1", "--gpus-per-node", "2")
    assert done.returncode == 2
    assert "must divide the world size 2" in done.stderr
