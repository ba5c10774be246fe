"""The HF <-> Megatron key map and tensor moves, and the bad inputs the converters reject (no process group).

The distributed round trips and logit checks are in tests/distributed/test_convert_roundtrip.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.weights.hf_map import (
    RULES,
    active_rules,
    expected_hf_shapes,
    hf_names,
    match_megatron_name,
    pack_qkv,
    to_hf,
    to_megatron,
    tp_shard,
    tp_unshard,
    unpack_qkv,
)

QWEN = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=4, num_query_groups=2,
                   vocab_size=10, add_qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=64)
LLAMA = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=4, num_query_groups=4,
                    vocab_size=10, add_qkv_bias=False, tie_word_embeddings=False, max_position_embeddings=64)


def _rule(name):
    return next(r for r in RULES if r.megatron.endswith(name))


def test_qkv_is_packed_per_query_group():
    # head_dim 2, 4 heads in 2 groups: rows of group g = [q heads 2g, 2g+1; k_g; v_g].
    q = torch.arange(8.0)
    k = 100 + torch.arange(4.0)
    v = 200 + torch.arange(4.0)
    packed = pack_qkv(q, k, v, QWEN)
    expected = [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert packed.tolist() == expected
    # A tp=2 shard is whole groups: the same layout for the rank's groups.
    assert tp_shard(_rule("linear_qkv.bias"), packed, 1, 2).tolist() == expected[8:]


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["gqa", "mha"])
def test_qkv_round_trip(cfg):
    g = torch.Generator().manual_seed(0)
    shapes = expected_hf_shapes(cfg)
    q, k, v = (torch.randn(shapes[f"model.layers.0.self_attn.{p}_proj.weight"], generator=g) for p in "qkv")
    out = unpack_qkv(pack_qkv(q, k, v, cfg), cfg)
    assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip((q, k, v), out))


@pytest.mark.parametrize("suffix", ["linear_qkv.weight", "linear_fc1.weight", "linear_proj.weight",
                                    "linear_fc2.weight", "word_embeddings.weight", "input_layernorm.weight"])
def test_tp_shard_and_unshard_are_inverse(suffix):
    rule = _rule(suffix)
    hf = [torch.randn(s) for s in (expected_hf_shapes(QWEN)[n] for n in rule.hf_names(0))]
    full = to_megatron(rule, hf, QWEN, padded_vocab=16)
    shards = [tp_shard(rule, full, r, 2) for r in range(2)]
    assert torch.equal(tp_unshard(rule, shards), full)
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, full, QWEN), hf))


def test_gate_up_shard_holds_its_gate_and_up_slices():
    rule = _rule("linear_fc1.weight")
    gate, up = torch.arange(12.0).reshape(12, 1), 100 + torch.arange(12.0).reshape(12, 1)
    full = to_megatron(rule, [gate, up], QWEN, 0)
    assert torch.equal(tp_shard(rule, full, 1, 2), torch.cat([gate[6:], up[6:]]))


def test_vocab_is_padded_with_zeros_and_stripped():
    rule = _rule("word_embeddings.weight")
    emb = torch.randn(10, 8)
    full = to_megatron(rule, [emb], QWEN, padded_vocab=16)
    assert full.shape == (16, 8) and torch.equal(full[10:], torch.zeros(6, 8))
    assert torch.equal(to_hf(rule, full, QWEN)[0], emb)
    with pytest.raises(ValueError, match="padded vocabulary 8 < vocab_size 10"):
        to_megatron(rule, [emb], QWEN, padded_vocab=8)


@pytest.mark.parametrize("name,rule_suffix,layer", [
    ("decoder.layers.3.input_layernorm.weight", "input_layernorm.weight", 3),
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", 3),  # TE spec
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight", 0),  # TE spec
    ("module.module.decoder.layers.11.mlp.linear_fc2.weight", "linear_fc2.weight", 11),  # DDP + Float16Module
    ("output_layer.weight", "output_layer.weight", None),
])
def test_megatron_names_match_local_and_te_spec(name, rule_suffix, layer):
    rule, got_layer = match_megatron_name(name)
    assert rule is _rule(rule_suffix) and got_layer == layer


def test_unmapped_names_are_none():
    assert match_megatron_name("decoder.layers.0.self_attention.linear_qkv._extra_state") is None
    assert match_megatron_name("decoder.layers.0.self_attention.linear_q.weight") is None


def test_hf_names_follow_the_features():
    qwen, llama = hf_names(QWEN), hf_names(LLAMA)
    assert "model.layers.1.self_attn.q_proj.bias" in qwen and "lm_head.weight" not in qwen
    assert "model.layers.1.self_attn.q_proj.bias" not in llama and llama[-1] == "lm_head.weight"
    assert len(qwen) == 1 + 2 * 12 + 1 and len(llama) == 1 + 2 * 9 + 2
    assert len(active_rules(QWEN)) == 9 and len(active_rules(LLAMA)) == 9


def test_parse_size():
    from megatron_entcov.weights.to_hf import _parse_size

    assert _parse_size("5GB") == 5 * 10**9 and _parse_size("2GiB") == 2 * 2**30
    assert _parse_size("500kb") == 500_000 and _parse_size("123") == 123
    with pytest.raises(ValueError, match="--max-shard-size"):
        _parse_size("five gigs")


# --------------------------------------------------------------------------------------------------
# Bad inputs to HF -> Megatron: all rejected before any process group or model is built.
# --------------------------------------------------------------------------------------------------


def _write_hf(directory, cfg=QWEN, drop=None, reshape=None):
    from safetensors.torch import save_file

    from megatron_entcov.config.hf import to_hf_config

    directory.mkdir(parents=True, exist_ok=True)
    to_hf_config(cfg).save_pretrained(directory)
    tensors = {n: torch.zeros(s) for n, s in expected_hf_shapes(cfg).items() if n != drop}
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_unsupported_architecture(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron, main_hf_to_megatron

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"],
                                                             "model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"unsupported architecture \['MistralForCausalLM'\]"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert main_hf_to_megatron(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_sliding_window_and_rope_scaling_are_refused(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    hf = _write_hf(tmp_path / "hf")
    raw = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**raw, "use_sliding_window": True}))
    with pytest.raises(ValueError, match="use_sliding_window=true .* is not supported"):
        convert_hf_to_megatron(hf, tmp_path / "out")
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (hf / "config.json").write_text(json.dumps({**raw, "rope_parameters": rope}))
    with pytest.raises(ValueError, match="RoPE scaling"):
        convert_hf_to_megatron(hf, tmp_path / "out")


def test_missing_tensor(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    hf = _write_hf(tmp_path / "hf", drop="model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        convert_hf_to_megatron(hf, tmp_path / "out")


def test_shape_mismatch(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    hf = _write_hf(tmp_path / "hf", reshape="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.mlp.up_proj.weight'.*\(12, 8\)"):
        convert_hf_to_megatron(hf, tmp_path / "out")


def test_layout_must_fit_the_model(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    hf = _write_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match="--tp=3 must divide num_attention_heads=4"):
        convert_hf_to_megatron(hf, tmp_path / "out", tp=3)
    with pytest.raises(ValueError, match="--pp=4 must divide num_layers=2"):
        convert_hf_to_megatron(hf, tmp_path / "out", pp=4)


def test_pytorch_bin_weights_are_refused(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    hf = _write_hf(tmp_path / "hf")
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors are supported"):
        convert_hf_to_megatron(hf, tmp_path / "out")


def test_existing_output_directory(tmp_path):
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    hf = _write_hf(tmp_path / "hf")
    out = tmp_path / "out"
    (out / "step_000000").mkdir(parents=True)
    (out / "latest").write_text("step_000000")
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --force"):
        convert_hf_to_megatron(hf, out)
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no checkpoint; refusing to replace it"):
        convert_hf_to_megatron(hf, other, force=True)
    assert (other / "notes.txt").read_text() == "keep me"
