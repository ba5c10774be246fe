"""Hugging Face model configs <-> :class:`ModelConfig` (Qwen2/Qwen2.5 and Llama families).

Used by checkpoint conversion, by the embedded rollout engine (which runs a Hugging Face copy of the policy)
and by SGLang servers (which load a Hugging Face directory).

Example:
    hf_cfg = to_hf_config(cfg.model)                     # transformers.Qwen2Config or LlamaConfig
    fields = model_fields_from_hf(AutoConfig.from_pretrained(d))   # dict for ModelConfig(**fields)
"""

from __future__ import annotations

from typing import Any

from megatron_entcov.config import ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "to_hf_config", "model_fields_from_hf", "hf_architecture"]

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


def hf_architecture(model: ModelConfig) -> str:
    """Qwen2 when the QKV projection has a bias, Llama otherwise (the two differ only there)."""
    return "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"


def _rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{type(hf_cfg).__name__} has no rope_theta")
    scaling = params.get("rope_type", "default")
    if scaling not in ("default", None):
        raise ValueError(f"rope_type={scaling!r} (RoPE scaling) is not supported; only plain RoPE")
    return float(theta)


def to_hf_config(model: ModelConfig, *, torch_dtype: str | None = None, **extra: Any):
    """A transformers config describing the same network as ``model`` (unpadded vocabulary)."""
    import transformers

    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    common = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_word_embeddings,
        hidden_act="silu",
        rope_parameters={"rope_theta": float(model.rotary_base), "rope_type": "default"},
        torch_dtype=torch_dtype or model.params_dtype,
        **extra,
    )
    if model.add_qkv_bias:
        if head_dim * model.num_attention_heads != model.hidden_size:
            raise ValueError(f"model.kv_channels={model.kv_channels}: Qwen2 needs head_dim * heads == hidden_size")
        return transformers.Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    return transformers.LlamaConfig(**common, head_dim=head_dim, attention_bias=False, mlp_bias=False,
                                    architectures=["LlamaForCausalLM"])


def model_fields_from_hf(hf_cfg) -> dict[str, Any]:
    """ModelConfig fields for a Hugging Face config; ValueError for an unsupported architecture."""
    archs = list(getattr(hf_cfg, "architectures", None) or [])
    model_type = getattr(hf_cfg, "model_type", None)
    if not (set(archs) & set(SUPPORTED_ARCHITECTURES) or model_type in ("qwen2", "llama")):
        raise ValueError(f"unsupported architecture {archs or model_type!r}: supported are "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    is_qwen2 = model_type == "qwen2" or "Qwen2ForCausalLM" in archs
    if not is_qwen2 and (getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False)):
        raise ValueError("Llama with attention_bias/mlp_bias is not supported")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_cfg.hidden_act!r} is not supported (SwiGLU with silu only)")
    heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads
    return dict(
        num_layers=hf_cfg.num_hidden_layers,
        hidden_size=hf_cfg.hidden_size,
        ffn_hidden_size=hf_cfg.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_cfg, "num_key_value_heads", None) or heads,
        kv_channels=None if head_dim * heads == hf_cfg.hidden_size else head_dim,
        vocab_size=hf_cfg.vocab_size,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        rotary_base=_rope_theta(hf_cfg),
        norm_epsilon=hf_cfg.rms_norm_eps,
        add_qkv_bias=is_qwen2,
        tie_word_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
    )
