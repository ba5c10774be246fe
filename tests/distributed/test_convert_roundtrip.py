"""Hugging Face <-> Megatron conversion on CPU with gloo, on tiny random models built from transformers configs.

- qwen2: QKV bias, GQA (4 heads, 2 kv heads), tied embeddings, vocab 250 (padded to 256).
- llama: no bias, 4 kv heads, untied output layer, vocab 301 (odd; imported for tp=2 -> padded 512, loaded at
  tp=1 where the model pads to 384: Megatron loads vocab tensors with allow_shape_mismatch).

One spawn of 4 ranks runs every layout (each spawn costs ~10 s of imports): import HF -> Megatron, load the
checkpoint at tp in {1, 2} x pp in {1, 2}, compare logits with transformers, re-save at that layout. The
parent then exports every re-saved checkpoint back to HF and compares every tensor with torch.equal.

Tolerance: float32; Megatron and transformers sum attention/matmuls in different orders, so logits agree to
~1e-6 relative; we require 1e-4 relative (max |diff| / max |logit|).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import read_safetensors, run_workers

pytestmark = pytest.mark.distributed

B, T = 2, 16
REL_TOL = 1e-4
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MODELS = {"qwen2": dict(vocab=250, import_tp=1), "llama": dict(vocab=301, import_tp=2)}


def _make_hf_model(name: str, vocab: int):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=128, rms_norm_eps=1e-6)
    if name == "qwen2":
        cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                       rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    # Larger than the default init (std 0.02) so that every layer moves the logits measurably.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    models = {}
    for name, spec in MODELS.items():
        model = _make_hf_model(name, spec["vocab"])
        hf_dir = tmp / f"{name}_hf"
        model.save_pretrained(hf_dir)
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, spec["vocab"], (2 * B, T), generator=g)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        models[name] = dict(hf_dir=str(hf_dir), import_tp=spec["import_tp"], ids=ids, logits=logits)
    results = run_workers(_worker, 4, args=(str(tmp), models), timeout=420)
    return tmp, models, results


def _full_logits(chunks, ps, cfg, ids):
    """Forward two micro-batches through the pipeline schedule; gather vocab shards over tp, strip padding,
    broadcast from the last stage: every rank returns [2B, T, V]."""
    import torch.distributed as dist

    from megatron_entcov.policy.pipeline import ModelInput, run_microbatches

    pos = torch.arange(T).expand(2 * B, T).contiguous()
    mbs = [ModelInput(input_ids=ids[i * B:(i + 1) * B], position_ids=pos[i * B:(i + 1) * B]) for i in range(2)]

    def loss_fn(batch, logits):
        return logits.sum() * 0.0, {"logits": logits.detach().float()}

    outs = run_microbatches(chunks, mbs, loss_fn, ps=ps, forward_only=True)
    full = torch.zeros(2 * B, T, cfg.vocab_size)
    if ps.is_last_stage:
        local = torch.cat([o["logits"] for o in outs])
        shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
        dist.all_gather(shards, local, group=ps.tp_group)
        full = torch.cat(shards, dim=-1)[..., :cfg.vocab_size].contiguous()
    if ps.pp_size > 1:
        dist.broadcast(full, src=dist.get_global_rank(ps.pp_group, ps.pp_size - 1), group=ps.pp_group)
    return full


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _worker(rank, world_size, tmp, models):
    import yaml

    from megatron_entcov.config import ModelConfig, ParallelConfig
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model, check_loaded
    from megatron_entcov.run.checkpoint import load_model, save_model
    from megatron_entcov.weights.shards import iter_hf_weights, load_hf_weights
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    res = {}
    for name, m in models.items():
        convert_hf_to_megatron(m["hf_dir"], f"{tmp}/{name}_mcore", tp=m["import_tp"], pp=1, progress=False)
    convert_hf_to_megatron(models["llama"]["hf_dir"], f"{tmp}/llama_bf16_mcore", dtype="bfloat16", progress=False)

    for name, m in models.items():
        cfg_file = Path(tmp) / f"{name}_mcore" / "step_000000" / "model_config.yaml"
        model_cfg = ModelConfig(**yaml.safe_load(cfg_file.read_text())["model"])
        for tp, pp in LAYOUTS:
            parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            ps = init_parallel(parallel, seed=3)
            # Built as the trainer builds a model it loads: no random init, NaN until loaded.
            chunks = build_model(model_cfg, parallel, ps, load_weights=True)
            load_model(chunks, f"{tmp}/{name}_mcore/step_000000/model")
            check_loaded(chunks, "the converted checkpoint")
            res[f"{name}_tp{tp}pp{pp}"] = _rel_err(_full_logits(chunks, ps, model_cfg, m["ids"]), m["logits"])
            save_model(chunks, f"{tmp}/{name}_tp{tp}pp{pp}")
            if (tp, pp) == (2, 2):
                # Weight sync: every rank gets every tensor, in buckets of bounded bytes.
                bucket_bytes = 40_000
                got, sizes = {}, []
                for bucket in iter_hf_weights(chunks, model_cfg, ps, bucket_bytes=bucket_bytes):
                    sizes.append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
                    for hf_name, tensor in bucket:
                        assert hf_name not in got, f"{hf_name} yielded twice"
                        got[hf_name] = tensor.clone()
                res[f"{name}_iter"] = got
                res[f"{name}_iter_sizes"] = sizes
                # Hugging Face weights straight into a tp=2 x pp=2 model (no dist checkpoint).
                chunks = build_model(model_cfg, parallel, ps, load_weights=True)
                load_hf_weights(chunks, model_cfg, m["hf_dir"], ps)
                check_loaded(chunks, "model.hf_dir")
                res[f"{name}_direct_tp2pp2"] = _rel_err(_full_logits(chunks, ps, model_cfg, m["ids"]), m["logits"])
        # Interleaved pipeline (2 chunks per stage): layer numbers are global, not per chunk.
        parallel = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
        ps = init_parallel(parallel, seed=3)
        chunks = build_model(model_cfg, parallel, ps)
        load_model(chunks, f"{tmp}/{name}_mcore/step_000000/model")
        res[f"{name}_iter_vpp"] = {k: t.clone() for b in iter_hf_weights(chunks, model_cfg, ps) for k, t in b}
    return res


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_logits_match_transformers(setup, name, tp, pp):
    _, _, results = setup
    for rank, res in enumerate(results):
        err = res[f"{name}_tp{tp}pp{pp}"]
        assert err < REL_TOL, f"rank {rank}: {name} tp={tp} pp={pp} logits differ by {err:.3g} (relative)"


@pytest.mark.parametrize("name", list(MODELS))
def test_load_hf_weights_directly_at_tp2_pp2(setup, name):
    _, _, results = setup
    for rank, res in enumerate(results):
        assert res[f"{name}_direct_tp2pp2"] < REL_TOL, f"rank {rank}: {res[f'{name}_direct_tp2pp2']:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_round_trip_is_bitwise_equal(setup, name, tp, pp):
    """HF -> Megatron -> (load and re-save at tp x pp) -> HF gives back every tensor exactly."""
    from megatron_entcov.weights.to_hf import convert_megatron_to_hf

    tmp, models, _ = setup
    want = read_safetensors(Path(models[name]["hf_dir"]))
    out = tmp / f"{name}_tp{tp}pp{pp}_hf"
    convert_megatron_to_hf(tmp / f"{name}_tp{tp}pp{pp}", out, max_shard_size="60KB", progress=False,
                           model_config=tmp / f"{name}_mcore" / "step_000000" / "model_config.yaml",
                           hf_config_dir=models[name]["hf_dir"])
    got = read_safetensors(out)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert different == [], f"tensors differ after the round trip: {different}"
    # Shards are bounded and indexed; config and tokenizer files are copied.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("name", list(MODELS))
def test_iter_hf_weights_at_tp2_pp2_reproduces_hf_state_dict(setup, name):
    tmp, models, results = setup
    want = read_safetensors(Path(models[name]["hf_dir"]))
    for rank, res in enumerate(results):
        got = res[f"{name}_iter"]
        assert sorted(got) == sorted(want), f"rank {rank}: names differ: {set(got) ^ set(want)}"
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert different == [], f"rank {rank}: {different}"
        vpp = res[f"{name}_iter_vpp"]
        assert sorted(vpp) == sorted(want) and all(torch.equal(vpp[k], want[k]) for k in want), f"rank {rank}: vpp"
        for count, nbytes in res[f"{name}_iter_sizes"]:
            assert nbytes <= 40_000 or count == 1, f"rank {rank}: a bucket of {count} tensors has {nbytes} bytes"


def test_export_from_root_with_dtype_loads_in_transformers(setup):
    """The import's checkpoint root exports on its own (config and tokenizer from its hf/ copy), in bf16."""
    import transformers

    from megatron_entcov.weights.to_hf import convert_megatron_to_hf

    tmp, models, _ = setup
    # Imported in bf16 (--dtype), exported with the checkpoint's dtype: the bf16 cast of the original.
    out = tmp / "llama_bf16_back"
    convert_megatron_to_hf(tmp / "llama_bf16_mcore", out, progress=False)
    want = read_safetensors(Path(models["llama"]["hf_dir"]))
    got = read_safetensors(out)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    # A bare dist checkpoint + its ModelConfig only: config.json is generated, and transformers loads it.
    out = tmp / "llama_generated_config"
    convert_megatron_to_hf(tmp / "llama_tp2pp2", out, progress=False,
                           model_config=tmp / "llama_mcore" / "step_000000" / "model_config.yaml")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=models["llama"]["ids"]).logits
    assert torch.equal(logits, models["llama"]["logits"])
    out = tmp / "llama_bf16"
    convert_megatron_to_hf(tmp / "llama_mcore", out, dtype="bfloat16", progress=False)
    want = read_safetensors(Path(models["llama"]["hf_dir"]))
    got = read_safetensors(out)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    # float32 export of the tied model loads in transformers and reproduces its logits.
    out32 = tmp / "qwen2_f32"
    convert_megatron_to_hf(tmp / "qwen2_mcore" / "step_000000", out32, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out32).eval()
    with torch.no_grad():
        logits = model(input_ids=models["qwen2"]["ids"]).logits
    assert torch.equal(logits, models["qwen2"]["logits"])


def test_export_errors(setup):
    import yaml

    from megatron_entcov.weights.to_hf import convert_megatron_to_hf, main_megatron_to_hf

    tmp, models, _ = setup
    ckpt = tmp / "qwen2_mcore"
    data = yaml.safe_load((ckpt / "step_000000" / "model_config.yaml").read_text())
    resaved = tmp / "qwen2_tp2pp2"  # a bare dist checkpoint (saved at tp=2, pp=2): no config beside it

    def variant(**changes):
        path = tmp / f"variant_{len(list(tmp.glob('variant_*')))}.yaml"
        path.write_text(yaml.safe_dump({"model": {**data["model"], **changes}}))
        return path

    # Missing tensor: the config says untied but the checkpoint has no output layer.
    with pytest.raises(ValueError, match="missing tensor 'output_layer.weight'"):
        convert_megatron_to_hf(resaved, tmp / "e1", model_config=variant(tie_word_embeddings=False), progress=False)
    # Shape mismatch: the config's MLP width differs from the checkpoint's.
    with pytest.raises(ValueError, match="shape mismatch for 'decoder.layers.mlp.linear_fc1.weight'"):
        convert_megatron_to_hf(resaved, tmp / "e2", model_config=variant(ffn_hidden_size=128), progress=False)
    # The stored hf/ config and an explicit model config disagree.
    with pytest.raises(ValueError, match="describes another model"):
        convert_megatron_to_hf(ckpt, tmp / "e2b", model_config=variant(ffn_hidden_size=128), progress=False)
    # No model config anywhere.
    with pytest.raises(ValueError, match="no model config"):
        convert_megatron_to_hf(resaved, tmp / "e2c", progress=False)
    # Unsupported architecture in the config directory given for config.json.
    bad = tmp / "bad_arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert_megatron_to_hf(ckpt, tmp / "e3", hf_config_dir=bad, progress=False)
    # Not a checkpoint.
    with pytest.raises(ValueError, match="is not a Megatron checkpoint"):
        convert_megatron_to_hf(bad, tmp / "e4", progress=False)
    # An existing output: refused without --force, replaced with it.
    out = tmp / "existing_hf"
    convert_megatron_to_hf(ckpt, out, progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --force"):
        convert_megatron_to_hf(ckpt, out, progress=False)
    assert main_megatron_to_hf(["--ckpt", str(ckpt), "--out", str(out)]) == 2
    (out / "stale.safetensors").write_bytes(b"")
    assert main_megatron_to_hf(["--ckpt", str(ckpt), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.safetensors").exists() and (out / "model.safetensors").is_file()
