"""The embedded engine generates with Qwen3 and Qwen3-MoE: built from the ModelConfig that config.json gives, loaded
with the checkpoint's tensors under their Hugging Face names (per-expert names for the experts, as the weight sync
sends them), its logits equal transformers' own load of the same directory, and its rollout log-probs are the
reference model's log-probs of the tokens it generated (float32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 48


def _save(tmp_path, kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    if kind == "dense":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            norm_topk_prob=True, mlp_only_layers=[1]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_local_engine_generates_with_qwen3(tmp_path, kind):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_entcov.rollout.local import LocalEngine
    from megatron_entcov.rollout.types import SamplingParams
    from megatron_entcov.weights.hf_checkpoint import load_hf_model_config

    hf_dir = _save(tmp_path, kind)
    cfg = load_hf_model_config(hf_dir)
    engine = LocalEngine(cfg, seed=1)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    if kind == "moe":
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in tensors
    engine.update_weights(tensors, version=1)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(engine.model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6, rtol=0)
    samples = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6), seeds=[0, 1])
    for s in samples:
        seq = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=seq).logits[0, :-1].double(), dim=-1)
        want = logp[len(s.prompt_ids) - 1:].gather(-1, seq[0, len(s.prompt_ids):, None])[:, 0]
        assert len(s.response_ids) == 6
        assert torch.allclose(torch.tensor(s.rollout_logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)
