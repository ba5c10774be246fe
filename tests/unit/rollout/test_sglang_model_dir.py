"""write_hf_model_dir writes a Qwen3-MoE model directory under the per-expert checkpoint names SGLang's loader takes
(``mlp.experts.<e>.gate_proj/up_proj/down_proj.weight``), each tensor the slice of transformers' fused expert
parameter it names; a state dict given under those names (or the fused ones) is written back unchanged, and
transformers loads the directory to the same fused parameters."""

from __future__ import annotations

import torch


def _moe_config():
    from megatron_entcov.config import load_config

    fields = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                  kv_channels=16, vocab_size=32, make_vocab_size_divisible_by=8, max_position_embeddings=128,
                  qk_layernorm="true", num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16)
    return load_config(None, [f"model.{k}={v}" for k, v in fields.items()] + ["model.moe_dense_layers=[1]"]).model


def _fused_reference(cfg, seed):
    """transformers' own parameters of the model write_hf_model_dir draws from ``seed``, by fused name."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(to_hf_config(cfg), dtype=torch.float32)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_moe_model_dir_holds_per_expert_checkpoint_names(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    cfg = _moe_config()
    saved = load_file(str(write_hf_model_dir(cfg, tmp_path / "a", seed=5) / "model.safetensors"))
    fused = _fused_reference(cfg, seed=5)
    ffn = 16
    expected = {}
    for name, t in fused.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[:-len("gate_up_proj")]
            for e in range(4):
                expected[f"{prefix}{e}.gate_proj.weight"] = t[e, :ffn]
                expected[f"{prefix}{e}.up_proj.weight"] = t[e, ffn:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[:-len("down_proj")]
            expected.update({f"{prefix}{e}.down_proj.weight": t[e] for e in range(4)})
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):     # tied: the embedding holds it
            expected[name] = t
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in saved)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in saved and "model.layers.1.mlp.up_proj.weight" in saved
    assert set(saved) == set(expected)
    for name, want in expected.items():
        assert torch.equal(saved[name], want), name

    # Given back under those names (as the weight sync tests do) or the fused ones: the same file.
    shifted = {n: t + 1.0 for n, t in saved.items()}
    again = load_file(str(write_hf_model_dir(cfg, tmp_path / "b", state_dict=shifted) / "model.safetensors"))
    assert set(again) == set(saved) and all(torch.equal(again[n], shifted[n]) for n in saved)
    from_fused = load_file(str(write_hf_model_dir(cfg, tmp_path / "c", state_dict=fused) / "model.safetensors"))
    assert all(torch.equal(from_fused[n], saved[n]) for n in saved)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for name, want in fused.items():
        assert torch.equal(loaded[name], want + 1.0), name
