"""A real SGLang CPU server serves a tiny random Qwen3 (dense) model and takes the trainer's weight sync; the
post-sync probe (weights/probe.py) passes after a right sync and fails after a deliberately wrong weight.

The trainer (one process) loads Hugging Face weights 'a' (model.hf_dir); the server starts from other weights 'b',
both directories written by the project's own ``write_hf_model_dir``. The trainer's initial sync (the default
'disk' method, as the engine tests' servers use) must make the server compute with 'a': the probe passes, and the
server's probe log-probs equal a float64 transformers forward of the trainer's own weights (gathered under their
Hugging Face names) to 1e-4, the tolerance of the other SGLang tests. Then one tensor (a Qwen3 q-norm, which
Qwen2 has not) is pushed negated: the server's log-probs now equal transformers' with that tensor negated, and
the probe raises SyncVerificationError; pushing it back makes the probe pass again.

Qwen3-MoE: SGLang 0.5.23 cannot serve it on CPU (why: the docstring of
test_qwen3_moe_synced_tensors_load_into_sglangs_model_class). The check that replaces the server test: SGLang's own Qwen3MoeForCausalLM, built on CPU in a subprocess with the
SGLang venv's python, loads the tensors the trainer's weight sync sends (per-expert names) and then holds exactly
them in its own layout. What it cannot show: a forward (generation, log-probs, the probe) with them.

Run: make test-sglang   (or: .venv/bin/python -m pytest -m sglang tests/sglang/test_sglang_qwen3.py -s)
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_workers, tiny_model

pytestmark = pytest.mark.sglang

# head_dim 16 with hidden 32 and 4 heads: the explicit head_dim (not hidden / heads) must reach the server too.
QWEN3 = tiny_model(qk_layernorm=True, kv_channels=16)
STEP = ["rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "steps=1"]
LOGPROB_TOL = 1e-4      # float32 server vs float64 transformers forward (as in test_sglang_engine.py)


def _config(model: list[str], extra: list[str] = ()):
    from megatron_entcov.config import load_config

    return load_config(None, model + STEP + list(extra)).resolve(1)


def _peaky_dir(model_cfg, out_dir, seed: int):
    """A model directory (write_hf_model_dir) with large random weights: peaked next-token distributions, so a
    wrong tensor moves the probe's log-probs far above rounding (HF's 0.02 init leaves them near uniform)."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(to_hf_config(model_cfg)).named_parameters()}
    state = {n: (1.0 + 0.1 * torch.randn(s, generator=gen)) if n.endswith("norm.weight")
             else 0.3 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    return write_hf_model_dir(model_cfg, out_dir, state_dict=state)


def _sync_and_probe_worker(rank, world_size, run_dir, model, bad_name):
    """The trainer syncs 'a' to a server started from 'b' (its probe runs in Trainer()); then ``bad_name`` is pushed
    negated and back. Returns the trainer's HF weights, the probe samples and verdicts."""
    from sglang_utils import buckets, cpu_servers

    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.rollout.sglang import SGLangEngine
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.probe import SyncVerificationError, probe_params, probe_prompt, verify_sync
    from megatron_entcov.weights.shards import iter_hf_weights

    cfg = _config(model, [f"model.hf_dir={run_dir}/a", f"output_dir={run_dir}/out", "name=qwen3"])
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    engine = SGLangEngine(cfg.model, cpu_servers(num_servers=1, max_inflight=32, request_timeout_s=120),
                          model_dir=f"{run_dir}/b", seed=cfg.seed, log_dir=f"{run_dir}/sglang_logs")
    trainer = None
    try:
        trainer = Trainer(cfg, ps, engine=engine)       # the initial sync (version 0) and its probe
        v = trainer.weight_version
        vocab_limit = min(len(trainer.tokenizer), cfg.model.vocab_size)
        prompt, params = probe_prompt(vocab_limit, seed=cfg.seed), probe_params(cfg, v)
        weights = {n: t.detach().clone() for bucket in iter_hf_weights(trainer.actor.chunks, cfg.model, ps)
                   for n, t in bucket}

        def probe(version):
            (_, sample), = engine.probe(prompt, params)
            try:
                verdict = verify_sync(engine, trainer.actor.policy, ps, cfg, version=version, vocab_limit=vocab_limit)
            except SyncVerificationError as e:
                verdict = str(e)
            return sample.to_dict(), verdict

        out = {"weights": weights, "right": probe(v)}
        bad = dict(weights, **{bad_name: -weights[bad_name]})
        engine.update_weights(buckets(bad), version=v + 1)
        out["wrong"] = probe(v + 1)
        engine.update_weights(buckets(weights), version=v + 2)
        out["restored"] = probe(v + 2)
        out["verify_tol"] = cfg.weight_sync.verify_tol
        # numpy, not tensors: a tensor sent back is a shared-memory handle that dies with the rank (a race)
        out["weights"] = {n: t.numpy().copy() for n, t in weights.items()}
        return out
    finally:
        if trainer is not None:
            trainer.close()                             # closes the engine too
        else:
            engine.close()


def _hf_logprobs(model_cfg, weights: dict, sample: dict, tmp_dir) -> torch.Tensor:
    """Log-probs of the sample's response tokens under a float64 transformers forward of ``weights`` (HF names,
    written by write_hf_model_dir and loaded by transformers' own loader)."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    model_dir = write_hf_model_dir(model_cfg, tmp_dir, state_dict=weights)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    prompt, response = sample["prompt_ids"], sample["response_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _check_sync_and_probe(tmp_path, model, bad_name):
    from sglang_utils import load_state_dict

    cfg = _config(model)
    a, b = _peaky_dir(cfg.model, tmp_path / "a", seed=0), _peaky_dir(cfg.model, tmp_path / "b", seed=1)
    (res,) = run_workers(_sync_and_probe_worker, 1, args=(str(tmp_path), model, bad_name), timeout=600)
    weights, tol = {n: torch.from_numpy(a) for n, a in res["weights"].items()}, res["verify_tol"]
    # The trainer's weights are 'a' bit for bit (under the checkpoint names the files carry), and not 'b'.
    on_disk = load_state_dict(a)
    assert set(on_disk) <= set(weights) and all(torch.equal(weights[n], t) for n, t in on_disk.items())
    assert not torch.equal(weights[bad_name], load_state_dict(b)[bad_name])

    gaps = {}
    for case, expected in (("right", weights), ("wrong", dict(weights, **{bad_name: -weights[bad_name]})),
                           ("restored", weights)):
        sample, verdict = res[case]
        assert len(sample["response_ids"]) > 0, case
        ref = _hf_logprobs(cfg.model, expected, sample, tmp_path / f"hf_{case}")
        gaps[case] = float((torch.tensor(sample["rollout_logprobs"], dtype=torch.float64) - ref).abs().max())
        print(f"\n[sglang] {case}: max |server - transformers| {gaps[case]:.2e} over {len(ref)} probe tokens; "
              f"probe: {verdict}")
        assert gaps[case] < LOGPROB_TOL, (case, gaps[case])
        if case == "wrong":
            # The server computes with the negated tensor, far from the trainer's weights: the probe refuses.
            assert isinstance(verdict, str) and "failed its probe" in verdict, verdict
            right = _hf_logprobs(cfg.model, weights, sample, tmp_path / "hf_wrong_vs_right")
            lp = torch.tensor(sample["rollout_logprobs"], dtype=torch.float64)
            assert float((lp - right).abs().median()) > tol
        else:
            assert isinstance(verdict, dict), verdict
            assert verdict["sync/probe_gap"] < LOGPROB_TOL and verdict["sync/probe_tokens"] == len(ref), verdict


def test_qwen3_sync_and_probe_on_a_real_server(tmp_path):
    _check_sync_and_probe(tmp_path, QWEN3, "model.layers.0.self_attn.q_norm.weight")


# ------------------------------------------------------------------------------------------------ Qwen3-MoE
# Untied embeddings, as the released Qwen3-MoE models have: SGLang 0.5.23's Qwen3MoeForCausalLM ignores
# tie_word_embeddings (its lm_head is its own parameter, loaded from lm_head.weight only), and the sync sends no
# lm_head.weight for a tied model.
QWEN3_MOE = QWEN3 + ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=16",
                     "model.tie_word_embeddings=false"]

# Run by the SGLang venv's python: SGLang's own Qwen3MoeForCausalLM (the class its GPU servers load; CPU servers
# cannot serve the model, see test_qwen3_moe_synced_tensors_load_into_sglangs_model_class) built on CPU, every
# parameter set to NaN, then load_weights() of the synced tensors; the parameters are written back out.
SGLANG_LOAD = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
from sglang.srt.runtime_context import SpawnRanks, publish
from sglang.srt.server_args import ServerArgs

model_dir, synced, out, port = sys.argv[1:5]
publish(ServerArgs(model_path=model_dir, device="cpu", skip_tokenizer_init=True), role="scheduler",
        ranks=SpawnRanks(world_rank=0))
init_distributed_environment(backend="gloo", world_size=1, rank=0, local_rank=0,
                             distributed_init_method=f"tcp://127.0.0.1:{port}")
initialize_model_parallel(backend="gloo")
# The rotary embedding (no weights) takes vllm's kernel on a host it does not know as CPU (SGLANG_USE_CPU_ENGINE=1
# would need sgl_kernel's CPU build): mark the host as CPU for that module only.
import sglang.srt.layers.rotary_embedding.base as rope_base
rope_base._is_cpu = True
from transformers import AutoConfig
from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

model = Qwen3MoeForCausalLM(config=AutoConfig.from_pretrained(model_dir))
with torch.no_grad():
    for p in model.parameters():
        p.fill_(float("nan"))
model.load_weights(list(load_file(synced).items()))
save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, out)
"""


def _synced_tensors_worker(rank, world_size, run_dir):
    """What the trainer's weight sync sends (WeightSync.push into a recording engine) for the weights in 'a'."""
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    class Recorder:
        weight_version = 0

        def update_weights(self, buckets, version):
            self.tensors = {n: t.detach().numpy().copy() for bucket in buckets for n, t in bucket}
            self.weight_version = version

    cfg = _config(QWEN3_MOE, [f"model.hf_dir={run_dir}/a", f"output_dir={run_dir}/out", "name=qwen3_moe"])
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)                          # the embedded engine: its own initial sync and probe
    try:
        recorder = Recorder()
        trainer.weight_sync.push(recorder, 1)
        return recorder.tensors                         # numpy: plain pickles back to the test process
    finally:
        trainer.close()


def _sglang_params(synced: dict) -> dict:
    """SGLang's Qwen3-MoE parameters as its loader must build them from the synced (checkpoint-named) tensors:
    q/k/v stacked into qkv_proj, each expert's gate and up rows into w13_weight[e], its down into w2_weight[e]."""
    out, experts = {}, {}
    for name, t in synced.items():
        prefix, _, rest = name.partition(".mlp.experts.")
        if rest:
            e, kind = rest.split(".")[:2]
            experts.setdefault(prefix, {})[(int(e), kind)] = t
        elif ".self_attn.q_proj." in name:
            qkv = [synced[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(qkv)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = t
    for prefix, ex in experts.items():
        n = 1 + max(e for e, _ in ex)
        out[f"{prefix}.mlp.experts.w13_weight"] = torch.stack([torch.cat([ex[e, "gate_proj"], ex[e, "up_proj"]])
                                                               for e in range(n)])
        out[f"{prefix}.mlp.experts.w2_weight"] = torch.stack([ex[e, "down_proj"] for e in range(n)])
    return out


def test_qwen3_moe_synced_tensors_load_into_sglangs_model_class(tmp_path):
    """SGLang 0.5.23 cannot serve Qwen3-MoE on CPU, so this check replaces the real-server test for it: SGLang's own
    Qwen3MoeForCausalLM (from the SGLang venv, in a subprocess with its python) loads the tensors the trainer's
    weight sync sends, under their per-expert names, and every one of its parameters then equals the synced
    tensors in SGLang's layout (stacked q/k/v, each expert's gate and up in w13_weight[e], down in w2_weight[e]),
    bit for bit: each name was taken and each shape matched (the parameters start as NaN, so a skipped tensor
    cannot pass).

    Why not a server: with --model-impl transformers (the CPU servers' path) the Transformers backend builds the
    experts' router weight on the meta device and materialises it with sglang.srt.utils.common.get_device(), which
    raises "No accelerator (CUDA, XPU, HPU, NPU, MUSA, MPS) or platform plugin is available." on CPU; with SGLang's
    native model class (--model-impl sglang) the rotary embedding imports vllm._custom_ops ("No module named
    'vllm'"), and SGLANG_USE_CPU_ENGINE=1 needs sgl_kernel's CPU build, which is not on PyPI.
    """
    import subprocess

    from safetensors.torch import load_file, save_file
    from sglang_utils import load_state_dict

    from megatron_entcov.distributed.net import free_port
    from megatron_entcov.rollout.sglang.server import default_server_python

    cfg = _config(QWEN3_MOE)
    a = _peaky_dir(cfg.model, tmp_path / "a", seed=0)
    (synced,) = run_workers(_synced_tensors_worker, 1, args=(str(tmp_path),), timeout=600)
    synced = {n: torch.from_numpy(t) for n, t in synced.items()}
    # The sync sends each expert under its own checkpoint name, and exactly the tensors of 'a'.
    layers, experts = cfg.model.num_layers, cfg.model.num_experts
    expert_names = {f"model.layers.{i}.mlp.experts.{e}.{k}.weight" for i in range(layers) for e in range(experts)
                    for k in ("gate_proj", "up_proj", "down_proj")}
    assert expert_names <= set(synced)
    on_disk = load_state_dict(a)
    assert set(synced) == set(on_disk) and all(torch.equal(synced[n], t) for n, t in on_disk.items())

    save_file({n: t.contiguous() for n, t in synced.items()}, str(tmp_path / "synced.safetensors"))
    proc = subprocess.run([default_server_python(), "-c", SGLANG_LOAD, str(a), str(tmp_path / "synced.safetensors"),
                           str(tmp_path / "sglang_params.safetensors"), str(free_port())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "not found in params_dict" not in proc.stderr and "skipped" not in proc.stderr, proc.stderr[-4000:]
    loaded, expected = load_file(str(tmp_path / "sglang_params.safetensors")), _sglang_params(synced)
    assert set(loaded) == set(expected), sorted(set(loaded) ^ set(expected))
    for name, want in expected.items():
        got = loaded[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            # SGLang pads the vocabulary (to a multiple of 64); the padding rows are no checkpoint's.
            assert got.shape[1:] == want.shape[1:] and got.shape[0] >= want.shape[0], (name, got.shape, want.shape)
            got = got[: want.shape[0]]
        assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
        assert torch.equal(got, want), (name, float((got - want).abs().max()))
    print(f"\n[sglang] SGLang's Qwen3MoeForCausalLM took all {len(synced)} synced tensors "
          f"({len(expert_names)} per-expert) into its {len(loaded)} parameters, bit for bit")
