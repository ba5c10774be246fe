"""The RL trainer end to end on CPU: one step at tp=2 x pp=2 trains every parameter and logs the metrics;
a run killed with SIGKILL mid-run resumes from its last complete checkpoint and finishes exactly as an
uninterrupted run; a checkpoint resumes on another layout; bad data and configs fail with clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import run_workers

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]

# A tiny policy on the synthetic arithmetic task; entropy_coef > 0 so every parameter gets a gradient even
# when a random model earns no reward (all-equal groups have zero advantage).
TINY = [
    "model.num_layers=4", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=32", "model.make_vocab_size_divisible_by=8",
    "model.max_position_embeddings=64", "model.add_qkv_bias=true",
    "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
    "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "optim.num_mini_batches=2", "optim.lr=1e-2",
    "loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "loss.entropy_coef=0.01", "metrics.log_interval=1",
]

EXPECTED_TAGS = [
    "reward/mean", "reward/std", "reward/accuracy", "rollout/response_len", "entropy/mean", "cov/mean", "cov/q90",
    "train/ppo_kl", "train/kl_cov_frac", "train/clip_frac_high", "rollout/logprob_gap", "coef/kl_cov_ratio",
    "train/grad_norm", "perf/rollout_time_s", "perf/reward_time_s", "perf/train_time_s", "perf/sync_time_s",
    "perf/tokens_per_s", "sync/time(s)", "entropy/delta_measured", "sync/probe_gap", "sync/probe_tokens",
]


def _step_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2", "steps=1",
        f"output_dir={run_dir}", "name=tp2pp2"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    before = {n: p.detach().clone() for c in trainer.actor.chunks for n, p in c.named_parameters()}
    metrics = trainer.train_step()
    trainer.metrics.log(1, metrics)
    trainer.metrics.close()
    unchanged = [n for c in trainer.actor.chunks for n, p in c.named_parameters() if torch.equal(before[n], p)]
    trainer.close()
    return {"unchanged": unchanged, "n_params": len(before), "metrics": metrics if ps.is_rank0 else None,
            "skipped": trainer.actor.skipped_steps}


def test_one_rl_step_tp2_pp2_trains_every_parameter(tmp_path):
    from megatron_entcov.monitor.metrics import read_scalars

    results = run_workers(_step_worker, 4, args=(str(tmp_path),), timeout=300)
    for rank, res in enumerate(results):
        assert res["n_params"] > 0
        assert res["unchanged"] == [], f"rank {rank}: parameters not updated: {res['unchanged']}"
        assert res["skipped"] == 0
    scalars = read_scalars(tmp_path / "tp2pp2")
    missing = [t for t in EXPECTED_TAGS if t not in scalars]
    assert not missing, f"TensorBoard event files lack {missing}"
    m = results[0]["metrics"]
    assert m["train/kl_cov_frac"] > 0, "KL-Cov selected no token"
    assert 0.0 <= m["reward/mean"] <= 1.0
    # Trainer and engine hold the same weights: rollout log-probs agree with the recomputation.
    assert m["rollout/logprob_gap"] < 1e-4, m["rollout/logprob_gap"]
    # The post-sync probe compared tokens and found the engine on the trainer's weights.
    assert m["sync/probe_tokens"] > 0 and m["sync/probe_gap"] < 1e-4, m
    assert (tmp_path / "tp2pp2" / "resolved_config.yaml").is_file()


def _probe_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.probe import SyncVerificationError, verify_sync

    cfg = load_config(None, TINY + ["parallel.pipeline_model_parallel_size=2", "steps=1", f"output_dir={run_dir}",
                                    "name=probe", "weight_sync.probe_tokens=8"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)                 # its initial sync passed the probe, or this raised
    vocab = min(len(trainer.tokenizer), cfg.model.vocab_size)
    out = {"ok": verify_sync(trainer.engine, trainer.actor.policy, ps, cfg, version=0, vocab_limit=vocab)}

    def expect_failure(version):
        try:
            verify_sync(trainer.engine, trainer.actor.policy, ps, cfg, version=version, vocab_limit=vocab)
        except SyncVerificationError as err:
            return str(err)
        return None

    # A server told the wrong version: every rank raises.
    out["wrong_version"] = expect_failure(version=1)
    # The engine computes with weights the trainer does not hold (one tensor loaded wrong): every rank raises.
    if trainer.engine is not None:
        name = "model.layers.1.mlp.down_proj.weight"
        w = dict(trainer.engine.model.named_parameters())[name].detach()
        trainer.engine.update_weights([(name, w + 0.05 * torch.randn_like(w))], version=0)
    out["wrong_weights"] = expect_failure(version=0)
    trainer.close()
    return out


def test_sync_probe_catches_a_server_not_on_the_trainers_weights(tmp_path):
    """The post-sync probe (weights/probe.py) at pp=2: it passes on a correct sync, and on every rank it fails when
    the engine reports another version or computes with a tensor the trainer does not hold."""
    results = run_workers(_probe_worker, 2, args=(str(tmp_path),), timeout=300)
    for rank, res in enumerate(results):
        assert res["ok"]["sync/probe_gap"] < 1e-5 and res["ok"]["sync/probe_tokens"] > 0, res["ok"]
        assert res["wrong_version"] and "another version" in res["wrong_version"], (rank, res)
        assert res["wrong_weights"] and "failed its probe" in res["wrong_weights"], (rank, res)
    # The generating rank names the server and its gap.
    assert "embedded: gap" in results[0]["wrong_weights"]


def _generator_failure_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.rollout.local import LocalEngine
    from megatron_entcov.trainer import Trainer

    class ServersGone(LocalEngine):
        """Answers the one-prompt post-sync probe, fails every rollout (as when every server is dead)."""

        def generate(self, prompts, params, *, seeds=None):
            if len(prompts) > 1:
                raise RuntimeError("SGLangEngine: no SGLang server left (test)")
            return super().generate(prompts, params, seeds=seeds)

    cfg = load_config(None, TINY + ["parallel.pipeline_model_parallel_size=2", "steps=1", f"output_dir={run_dir}",
                                    "name=gen_failure"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    engine = ServersGone(cfg.model, seed=cfg.seed) if ps.tp_rank == 0 and ps.pp_rank == 0 else None
    trainer = Trainer(cfg, ps, engine=engine)
    try:
        trainer.train_step()
    except RuntimeError as err:
        return str(err)
    finally:
        trainer.close()
    return None


def test_a_failure_on_the_generating_rank_raises_on_every_rank(tmp_path):
    """Only the generating rank talks to the servers; when it fails, the other ranks must fail with it
    (parallel.raise_together), not wait forever in the next collective."""
    errors = run_workers(_generator_failure_worker, 2, args=(str(tmp_path),), timeout=240)
    assert "no SGLang server left (test)" in errors[0]
    assert "step 1 rollouts failed on another rank" in errors[1]


def _cli(args, run_dir, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "megatron_entcov", *args], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _scalars(run_dir):
    from megatron_entcov.monitor.metrics import read_scalars

    return read_scalars(run_dir)


def test_kill_9_mid_run_resumes_from_last_complete_checkpoint(tmp_path):
    common = ["train", "--set", "steps=5", "--set", "checkpoint.save_interval=1", "--set", "metrics.tensorboard=true"]
    common += [x for kv in TINY for x in ("--set", kv)]
    # Uninterrupted reference run.
    ref = _cli(common + ["--set", f"output_dir={tmp_path}", "--set", "name=ref"], tmp_path)
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out
    # Killed run: SIGKILL once step 2's checkpoint is complete (step 3 is then in flight or saving).
    victim = _cli(common + ["--set", f"output_dir={tmp_path}", "--set", "name=victim"], tmp_path)
    ckpts = tmp_path / "victim" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts / "step_000002" / "COMPLETE").is_file():
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    from megatron_entcov.run.checkpoint import find_latest

    latest = find_latest(ckpts)
    assert latest is not None and latest.name in ("step_000002", "step_000003", "step_000004")
    resumed = _cli(common + ["--set", f"output_dir={tmp_path}", "--set", "name=victim", "--resume"], tmp_path)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert "resumed from" in out or "resumed" in out.lower()
    a, b = _scalars(tmp_path / "ref"), _scalars(tmp_path / "victim")
    for tag in ("reward/mean", "entropy/mean", "train/loss", "train/grad_norm", "rollout/response_len"):
        assert dict(a[tag]) == dict(b[tag]), f"{tag}: resumed run differs from the uninterrupted one"


def test_resume_on_a_different_layout(tmp_path):
    base = [x for kv in TINY for x in ("--set", kv)] + ["--set", f"output_dir={tmp_path}", "--set", "name=run",
                                                        "--set", "checkpoint.save_interval=1"]
    first = _cli(["train"] + base + ["--set", "steps=1"], tmp_path)
    out, _ = first.communicate(timeout=240)
    assert first.returncode == 0, out
    second = _cli(["train", "--nproc", "2", "--resume"] + base + ["--set", "steps=2",
                                                                   "--set", "parallel.tensor_model_parallel_size=2"],
                  tmp_path)
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out
    assert "layout changed" in out
    steps = dict(_scalars(tmp_path / "run")["reward/mean"])
    assert sorted(steps) == [1, 2]


@pytest.mark.parametrize("setting, match", [
    (["--set", "loss.name=grpo"], "loss.name='grpo' is invalid"),
    (["--set", "data.source=file", "--set", "data.path=BAD"], "BAD"),
])
def test_bad_config_and_data_fail_clearly(tmp_path, setting, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" \n')
    setting = [s.replace("BAD", str(bad)) for s in setting]
    proc = _cli(["train", "--set", f"output_dir={tmp_path}"] + [x for kv in TINY for x in ("--set", kv)] + setting,
                tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert match.replace("BAD", str(bad)) in out
    if "data.path" in " ".join(setting):
        assert "row 2" in out or "line 2" in out, out


def _nan_worker(rank, world_size, run_dir):
    import megatron_entcov.trainer as trainer_mod
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel

    cfg = load_config(None, TINY + ["steps=1", f"output_dir={run_dir}", "name=nan"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    real = trainer_mod.policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer_mod.policy_loss = poisoned
    trainer = trainer_mod.Trainer(cfg, ps)
    before = {n: p.detach().clone() for c in trainer.actor.chunks for n, p in c.named_parameters()}
    metrics = trainer.train_step()
    changed = [n for c in trainer.actor.chunks for n, p in c.named_parameters() if not torch.equal(before[n], p)]
    trainer.close()
    return {"changed": changed, "skipped": trainer.actor.skipped_steps, "optimizer_steps": trainer.actor.optimizer_steps,
            "reported": metrics.get("train/skipped_updates"), "weight_version": trainer.weight_version,
            "engine_version": trainer.engine.weight_version, "logged_version": metrics.get("train/weight_version"),
            "synced": "sync/bytes" in metrics}


def test_non_finite_step_is_skipped_and_reported(tmp_path):
    (res,) = run_workers(_nan_worker, 1, args=(str(tmp_path),), timeout=180)
    assert res["changed"] == [], f"a NaN step was applied to {res['changed']}"
    assert res["skipped"] == 2 and res["optimizer_steps"] == 0  # both mini-batches skipped
    assert res["reported"] == 2.0
    # Nothing was applied: the engine already holds these weights, so no new version and no sync.
    assert res["weight_version"] == res["engine_version"] == res["logged_version"] == 0
    assert not res["synced"]
