"""Inputs that used to train garbage with exit 0, at the Trainer level (one gloo rank; the config-loader halves
are in tests/unit/test_config_inputs.py):

- ``model.hf_dir`` with a ``model`` section that contradicts its config.json (a 4-layer checkpoint trained as 2
  layers): the CLI fails at config load, the Actor's start check fails for a config built without the loader,
  and a run that leaves the architecture out builds and loads all 4 layers;
- updates skipped over and over (non-finite loss): the run stops at ``optim.max_consecutive_skipped`` before the
  step is checkpointed, so the last good step's checkpoint stays the newest; skips that are not consecutive do not
  stop it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_workers, tiny_model

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]

MODEL = tiny_model(num_layers=4, add_qkv_bias=True)
RUN = ["rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2",
       "rollout.max_prompt_len=16", "sampling.max_new_tokens=6", "optim.micro_batch_size=2",
       "optim.num_mini_batches=2", "optim.lr=1e-2", "loss.entropy_coef=0.01", "metrics.tensorboard=false",
       "weight_sync.probe_tokens=4"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 4-layer Qwen2 of MODEL's shape with the character tokenizer: a directory a run can start from."""
    import transformers

    from megatron_entcov.tasks.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    path = tmp_path_factory.mktemp("hf") / "qwen_tiny"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    build_char_tokenizer(path)
    return path


def test_cli_refuses_a_model_section_that_truncates_the_checkpoint(hf_dir, tmp_path):
    """The reported fault: a 4-layer checkpoint with model.num_layers=2 (every other field right) trained layers
    0-1 and exited 0."""
    model = [kv for kv in MODEL if not kv.startswith("model.num_layers=")] + ["model.num_layers=2"]
    args = ["train", "--set", f"output_dir={tmp_path}", "--set", f"model.hf_dir={hf_dir}", "--set", "steps=1"]
    args += [x for kv in model + RUN for x in ("--set", kv)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"error: model.num_layers=2 but {hf_dir / 'config.json'} has num_hidden_layers=4: set "
            "model.num_layers=4 or remove it") in proc.stderr
    assert not (tmp_path / "run").exists()


def _worker(rank, world_size, tmp, hf_dir):
    import megatron_entcov.trainer as trainer_mod
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.actor import TrainingDivergedError
    from megatron_entcov.policy.model import unwrap_model
    from megatron_entcov.run.checkpoint import find_latest

    out = {}
    common = RUN + [f"output_dir={tmp}"]
    ps = init_parallel(load_config(None, MODEL + common).parallel, seed=1)

    # 1. A config built without the loader (nothing derived): the Actor's start check refuses it.
    cfg = load_config(None, MODEL + common + ["name=start_check", "model.num_layers=2"]).resolve(world_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_dir=str(hf_dir)))
    try:
        trainer_mod.Trainer(cfg, ps)
        out["start_check"] = None
    except ValueError as err:
        out["start_check"] = str(err)

    # 2. model.hf_dir and no architecture fields: the run builds config.json's 4 layers and loads their weights.
    cfg = load_config(None, common + ["name=derived", "steps=1", f"model.hf_dir={hf_dir}"]).resolve(world_size)
    trainer = trainer_mod.Trainer(cfg, ps)
    model = unwrap_model(trainer.actor.chunks[0])
    out["layers"] = len(model.decoder.layers)
    from safetensors.torch import load_file

    hf = load_file(str(hf_dir / "model.safetensors"))
    out["embedding_loaded"] = torch.equal(model.embedding.word_embeddings.weight[:32], hf["model.embed_tokens.weight"])
    out["last_layer_loaded"] = torch.equal(model.decoder.layers[3].mlp.linear_fc2.weight,
                                           hf["model.layers.3.mlp.down_proj.weight"])
    trainer.close()

    # 3. Every update from step 2 on is skipped: the run stops at the 2nd skip in a row, inside step 2, before
    #    step 2 is checkpointed.
    real = trainer_mod.policy_loss
    cfg = load_config(None, MODEL + common + ["name=stop", "steps=3", "checkpoint.save_interval=1",
                                              "optim.max_consecutive_skipped=2"]).resolve(world_size)
    trainer = trainer_mod.Trainer(cfg, ps)

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if trainer.step >= 1 else loss), metrics

    trainer_mod.policy_loss = poisoned
    try:
        trainer.train()
        out["stop"] = None
    except TrainingDivergedError as err:
        out["stop"] = str(err)
    finally:
        trainer_mod.policy_loss = real
        trainer.close()
    ckpts = Path(tmp) / "stop" / "checkpoints"
    out["stop_ckpts"] = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    out["stop_latest"] = find_latest(ckpts).name
    out["stop_counts"] = (trainer.actor.optimizer_steps, trainer.actor.skipped_steps)

    # 4. The first mini-batch of every step is skipped, the second applied: never two in a row, no stop.
    cfg = load_config(None, MODEL + common + ["name=isolated", "steps=2", "optim.max_consecutive_skipped=2"]
                      ).resolve(world_size)
    trainer = trainer_mod.Trainer(cfg, ps)
    make_loss_fn, calls = trainer._policy_loss_fn, []

    def every_other(selection):
        inner = make_loss_fn(selection)
        calls.append(selection)
        if len(calls) % 2 == 0:
            return inner
        return lambda mb, logprobs, entropy: (inner(mb, logprobs, entropy)[0] * float("nan"), {})

    trainer._policy_loss_fn = every_other
    try:
        trainer.train()
        out["isolated"] = None
    except TrainingDivergedError as err:
        out["isolated"] = str(err)
    finally:
        trainer.close()
    out["isolated_counts"] = (trainer.actor.optimizer_steps, trainer.actor.skipped_steps, len(calls))
    out["isolated_latest"] = find_latest(Path(tmp) / "isolated" / "checkpoints").name
    return out


@pytest.fixture(scope="module")
def results(hf_dir, tmp_path_factory):
    (res,) = run_workers(_worker, 1, args=(str(tmp_path_factory.mktemp("runs")), hf_dir), timeout=400)
    return res


def test_start_check_refuses_a_model_that_contradicts_hf_dir(results, hf_dir):
    assert results["start_check"] is not None, "a 2-layer model was built from a 4-layer model.hf_dir"
    assert results["start_check"].startswith(f"model.num_layers=2 but {hf_dir / 'config.json'} has "
                                             "num_hidden_layers=4: set model.num_layers=4 or remove it")


def test_a_run_without_a_model_section_builds_the_checkpoints_architecture(results):
    assert results["layers"] == 4
    assert results["embedding_loaded"] and results["last_layer_loaded"]


def test_consecutive_skips_stop_the_run_before_the_step_is_saved(results):
    assert results["stop"] is not None, "the run went on through non-finite updates and saved them"
    assert results["stop"].startswith("step 2 mini-batch 1: 2 optimizer steps in a row were skipped"), results["stop"]
    assert "optim.max_consecutive_skipped=2" in results["stop"] and "0 = never stop" in results["stop"]
    assert results["stop_ckpts"] == ["step_000001"] and results["stop_latest"] == "step_000001"
    assert results["stop_counts"] == (2, 2)            # step 1: two applied; step 2: two skipped, then the stop


def test_skips_that_are_not_consecutive_do_not_stop_the_run(results):
    assert results["isolated"] is None, results["isolated"]
    assert results["isolated_counts"] == (2, 2, 4)    # skip, apply, skip, apply
    assert results["isolated_latest"] == "step_000002"
