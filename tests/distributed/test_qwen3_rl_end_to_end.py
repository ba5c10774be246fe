"""A tiny Qwen3 and a tiny Qwen3-MoE go Hugging Face -> Megatron -> two RL steps -> Hugging Face through the
command line, as a user runs them: ``convert hf-to-megatron --tp/--ep``, ``train --config configs/quickstart.yaml
--nproc 2`` from the converted checkpoint (Qwen3 with Clip-Cov at tp2, Qwen3-MoE with KL-Cov at dp2 x ep2), then
``convert megatron-to-hf`` of the run's checkpoint, loaded by transformers.

Checked by values: the run's TensorBoard shows mixed rewards and a Clip-Cov / KL-Cov selection that chose tokens in
both steps; the exported weights differ from the starting ones in every part of the model (the steps moved them);
and the exported model's log-probs of fixed sequences, computed by transformers in float64, equal those of the
run's Megatron checkpoint loaded by the trainer's builders (at one process, another layout than the run's), to
2e-5: a wrong layout of any tensor in either conversion (q/k/v split, q/k norms, gated MLP, router, an expert's
index over ep, tied or untied output) would change them.

Rewards: a random tiny model would never answer, so every reward and advantage would be 0 and no weight would move.
Every prompt of the data file (``data.source=file``) has the answer 1 and one token is generated; the starting
model's output row of the token '1' is set so that '1' gets about half of the probability after each prompt, as
for a model that answers right about half the time. Nothing else of the run is changed for the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_workers

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
T = 12                                   # test_qwen3_models._logprobs_entropy: ids [4, 12]
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6,
              rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
# kind -> (tied output, converter layout, the run's layout, loss settings, the loss's chosen-token share)
RUNS = {
    "dense": (True, ["--tp", "2"], ["parallel.tensor_model_parallel_size=2"],
              ["loss.name=clip_cov", "loss.clip_cov_ratio=0.2", "loss.clip_cov_lb=0.0", "loss.clip_cov_ub=5.0"],
              "train/clip_cov_frac"),
    "moe": (False, ["--ep", "2"], ["parallel.expert_model_parallel_size=2"],
            ["loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "loss.kl_cov_coef=1.0"], "train/kl_cov_frac"),
}
PROMPTS = [f"{a}+{b}=" for a in (0, 2, 3, 5, 7, 9) for b in (4, 6, 8)]


def _make_hf_dir(kind: str, path: Path) -> dict[str, torch.Tensor]:
    """The starting model (see the module docstring), with the character tokenizer; returns its state dict."""
    import transformers

    from megatron_entcov.tasks.tokenizer import CHAR_VOCAB, CHAR_VOCAB_SIZE, build_char_tokenizer

    torch.manual_seed(3)
    tied = RUNS[kind][0]
    if kind == "dense":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=CHAR_VOCAB_SIZE, tie_word_embeddings=tied, **COMMON))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=CHAR_VOCAB_SIZE, tie_word_embeddings=tied, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[1], **COMMON))
    model.eval()
    tok = build_char_tokenizer(path)
    ids = tok(PROMPTS, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.1)
        # The output row of '1' along the mean last hidden state, so that its logit equals the log-sum-exp of the
        # others' (no prompt holds a '1': with tied embeddings no input changes).
        hidden = model.model(input_ids=ids).last_hidden_state[:, -1]
        one = CHAR_VOCAB["1"]
        head = model.get_output_embeddings().weight
        head[one] = 0.0
        others = model.lm_head(hidden).logsumexp(-1).mean()
        mean = hidden.mean(0)
        head[one] = others * mean / mean.square().sum()
        p_one = model(input_ids=ids).logits[:, -1].softmax(-1)[:, one]
    assert 0.3 < p_one.mean() < 0.7, p_one
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(*args: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{args[:2]}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def _checkpoint_logprobs(rank, world_size, runs, ids):
    """Worker (one process): each run's last Megatron checkpoint loaded by the trainer's builders at tp1/ep1, and
    its log-probs of the next token of ``ids`` [2B, T] ([2B, T-1])."""
    import yaml
    from test_qwen3_models import _logprobs_entropy

    from megatron_entcov.config import ModelConfig, ParallelConfig
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model, check_loaded
    from megatron_entcov.run.checkpoint import find_latest, load_model

    out = {}
    for kind, run_dir in runs.items():
        model_cfg = ModelConfig(**yaml.safe_load((Path(run_dir) / "resolved_config.yaml").read_text())["model"])
        parallel = ParallelConfig()
        ps = init_parallel(parallel, seed=1)
        chunks = build_model(model_cfg, parallel, ps, load_weights=True)
        load_model(chunks, find_latest(Path(run_dir) / "checkpoints") / "model")
        check_loaded(chunks, "the run's checkpoint")
        with torch.no_grad():
            out[kind] = _logprobs_entropy(chunks, model_cfg, ps, ids)[0]
    return out


def _convert_train_export(kind: str, tmp: Path, data: Path) -> None:
    """One model's way through the command line from its HF directory: the converter, two RL steps on two
    processes, the export of the run's checkpoint."""
    tied, convert_layout, run_layout, loss, _ = RUNS[kind]
    hf, mcore = tmp / f"{kind}_hf", tmp / f"{kind}_mcore"
    _run("convert", "hf-to-megatron", "--hf-dir", str(hf), "--out", str(mcore), *convert_layout,
         "--make-vocab-size-divisible-by", "8", cwd=tmp)
    settings = [
        f"name={kind}", f"output_dir={tmp}", f"checkpoint.load={mcore}", f"model.hf_dir={hf}",
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.add_qkv_bias=false",
        f"model.tie_word_embeddings={str(tied).lower()}", "steps=2", "eval.interval=0",
        "data.source=file", f"data.path={data}", "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4",
        "sampling.max_new_tokens=1", "optim.micro_batch_size=4", "optim.lr=0.01", *run_layout, *loss]
    _run("train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--nproc", "2",
         *[x for s in settings for x in ("--set", s)], cwd=tmp)
    _run("convert", "megatron-to-hf", "--ckpt", str(tmp / kind / "checkpoints"), "--out", str(tmp / f"{kind}_export"),
         "--hf-config-dir", str(hf), cwd=tmp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("qwen3_rl")
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in PROMPTS))
    out = {kind: dict(initial=_make_hf_dir(kind, tmp / f"{kind}_hf"), export=tmp / f"{kind}_export",
                      run_dir=tmp / kind) for kind in RUNS}
    # The two models' commands run side by side: they wait mostly on imports, one core each.
    with ThreadPoolExecutor(len(RUNS)) as pool:
        for future in [pool.submit(_convert_train_export, kind, tmp, data) for kind in RUNS]:
            future.result()
    ids = torch.randint(0, 20, (4, T), generator=torch.Generator().manual_seed(5))
    got = run_workers(_checkpoint_logprobs, 1, args=({k: str(v["run_dir"]) for k, v in out.items()}, ids),
                      timeout=300)[0]
    for kind in out:
        out[kind].update(ids=ids, checkpoint_logprobs=got[kind])
    return out


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_run_took_clip_cov_or_kl_cov_steps_on_mixed_rewards(runs, kind):
    from megatron_entcov.monitor.metrics import read_scalars

    scalars = read_scalars(runs[kind]["run_dir"])
    rewards = [v for _, v in scalars["reward/mean"]]
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2] and all(0 < r < 1 for r in rewards), rewards
    chosen = scalars[RUNS[kind][4]]
    assert [s for s, _ in chosen] == [1, 2] and all(v > 0 for _, v in chosen), chosen


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_exported_weights_moved_in_every_part_of_the_model(runs, kind):
    from transformers import AutoModelForCausalLM

    run = runs[kind]
    model = AutoModelForCausalLM.from_pretrained(run["export"], dtype=torch.float32)
    got, initial = model.state_dict(), run["initial"]
    assert sorted(got) == sorted(initial)
    moved = {n: (got[n] - initial[n]).abs().max().item() for n in initial}
    parts = ["embed_tokens", "self_attn.q_proj", "self_attn.k_norm", "self_attn.o_proj", "layers.1.mlp.down_proj",
             "input_layernorm", "model.norm"]
    parts += [".mlp.experts.", ".mlp.gate."] if kind == "moe" else ["layers.0.mlp.up_proj"]
    for part in parts:
        most = max(v for n, v in moved.items() if part in n)
        assert most > 1e-6, f"{kind}: the run did not move the {part} weights: {moved}"


@pytest.mark.parametrize("kind", list(RUNS))
def test_the_exported_model_computes_the_checkpoint_logprobs(runs, kind):
    from transformers import AutoModelForCausalLM

    run = runs[kind]
    model = AutoModelForCausalLM.from_pretrained(run["export"], dtype=torch.float64).eval()
    if kind == "moe":
        model.set_experts_implementation("eager")      # torch's grouped_mm refuses float64
    ids = run["ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], dim=-1)
    want = logp.gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(run["checkpoint_logprobs"].double(), want, rtol=0, atol=2e-5)
