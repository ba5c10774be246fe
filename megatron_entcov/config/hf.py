"""Hugging Face model configs <-> :class:`ModelConfig` (Qwen2/Qwen2.5, Qwen3, Qwen3-MoE and Llama families), for
the converters, the embedded rollout engine and SGLang servers.

With ``model.hf_dir`` set, the config loader fills the ``model.*`` fields the user did not set from
:func:`read_hf_model_fields` and checks those they set with :func:`hf_mismatches`; the Actor checks the whole
ModelConfig again at start (:func:`check_model_matches_hf`), for configs built without the loader.

Example:
    hf_cfg = to_hf_config(cfg.model)                     # transformers.Qwen2Config, Qwen3Config, ... LlamaConfig
    fields = model_fields_from_hf(AutoConfig.from_pretrained(d))   # dict for ModelConfig(**fields)
    fields = read_hf_model_fields(d)                     # the same from d/config.json, with its checks
    check_model_matches_hf(cfg.model)                    # ValueError naming each field that differs

Design notes: docs/design/config.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_entcov.config.schema import ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "HF_KEYS", "to_hf_config", "model_fields_from_hf", "hf_architecture",
           "read_hf_model_fields", "hf_mismatches", "check_model_matches_hf"]

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                           "Qwen3MoeForCausalLM": "qwen3_moe", "LlamaForCausalLM": "llama"}


def hf_architecture(model: ModelConfig) -> str:
    """The Hugging Face architecture of ``model``: Qwen3-MoE with experts, Qwen3 with q/k norms, Qwen2 with a QKV
    bias, Llama otherwise (the families differ only there)."""
    if model.num_experts is not None:
        return "Qwen3MoeForCausalLM"
    if model.qk_layernorm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"


def _check_family(model: ModelConfig) -> None:
    """The combinations no supported architecture has (each family differs from Llama by one feature)."""
    if model.num_experts is not None and not model.qk_layernorm:
        raise ValueError(f"model.num_experts={model.num_experts} needs model.qk_layernorm=true (Qwen3-MoE is the "
                         "only mixture-of-experts architecture supported)")
    if model.qk_layernorm and model.add_qkv_bias:
        raise ValueError("model.qk_layernorm=true with model.add_qkv_bias=true is no supported architecture "
                         "(Qwen3 has no QKV bias); set one of them false")


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
    _check_family(model)
    if model.num_experts is not None:
        return transformers.Qwen3MoeConfig(
            **common, head_dim=head_dim, attention_bias=False, num_experts=model.num_experts,
            num_experts_per_tok=model.moe_router_topk, moe_intermediate_size=model.expert_ffn_hidden_size,
            norm_topk_prob=model.moe_norm_topk_prob, decoder_sparse_step=model.moe_layer_freq,
            mlp_only_layers=sorted(model.moe_dense_layers),
            router_aux_loss_coef=model.moe_aux_loss_coeff, architectures=["Qwen3MoeForCausalLM"])
    if model.qk_layernorm:
        return transformers.Qwen3Config(**common, head_dim=head_dim, attention_bias=False,
                                        architectures=["Qwen3ForCausalLM"])
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
    if not (set(archs) & set(SUPPORTED_ARCHITECTURES) or model_type in SUPPORTED_ARCHITECTURES.values()):
        raise ValueError(f"unsupported architecture {archs or model_type!r}: supported are "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), model_type)
    is_qwen2 = family == "qwen2"
    if not is_qwen2 and (getattr(hf_cfg, "attention_bias", False) or getattr(hf_cfg, "mlp_bias", False)):
        raise ValueError(f"{family} with attention_bias/mlp_bias is not supported")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_cfg.hidden_act!r} is not supported (SwiGLU with silu only)")
    heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads
    fields = dict(
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
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
    )
    fields.update(_moe_fields_from_hf(hf_cfg) if family == "qwen3_moe" else dict(num_experts=None))
    return fields


def _moe_fields_from_hf(hf_cfg) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE config (shared experts, which Qwen3-MoE has none of, are
    not supported)."""
    if getattr(hf_cfg, "shared_expert_intermediate_size", 0):
        raise ValueError("shared experts (shared_expert_intermediate_size > 0) are not supported")
    experts = getattr(hf_cfg, "num_experts", None) or getattr(hf_cfg, "num_local_experts", None)
    if not experts:
        raise ValueError("a Qwen3-MoE config without num_experts")
    return dict(
        num_experts=int(experts),
        moe_router_topk=int(hf_cfg.num_experts_per_tok),
        moe_ffn_hidden_size=int(hf_cfg.moe_intermediate_size),
        moe_norm_topk_prob=bool(getattr(hf_cfg, "norm_topk_prob", False)),
        moe_layer_freq=int(getattr(hf_cfg, "decoder_sparse_step", 1) or 1),
        moe_dense_layers=sorted(int(i) for i in (getattr(hf_cfg, "mlp_only_layers", None) or [])),
    )


HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rope_theta",
    "norm_epsilon": "rms_norm_eps",
    "add_qkv_bias": "architectures",
    "tie_word_embeddings": "tie_word_embeddings",
    "qk_layernorm": "architectures",
    "num_experts": "num_experts",
    "moe_router_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_norm_topk_prob": "norm_topk_prob",
    "moe_layer_freq": "decoder_sparse_step",
    "moe_dense_layers": "mlp_only_layers",
}
"""ModelConfig field -> the config.json key it comes from (the fields :func:`model_fields_from_hf` returns)."""


def read_hf_model_fields(hf_dir: str | Path, *, field: str = "model.hf_dir") -> dict[str, Any]:
    """The ModelConfig fields of ``hf_dir/config.json`` (:func:`model_fields_from_hf`).

    ValueError, naming ``field`` and the directory, when there is no config.json, it is not JSON, or it
    describes an architecture the trainer cannot build (not Qwen2/Llama, sliding-window attention, ...).
    """
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ValueError(f"{field}={str(hf_dir)!r} is not a directory: point it at a Hugging Face model directory "
                         "(config.json, tokenizer, safetensors weights)")
    if not cfg_file.is_file():
        raise ValueError(f"{field}={str(hf_dir)!r} has no config.json: point it at a Hugging Face model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}={str(hf_dir)!r}: {str(cfg_file)!r} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{field}={str(hf_dir)!r}: {str(cfg_file)!r} is not a JSON object")
    archs = raw.get("architectures") or []
    if not (set(archs) & set(SUPPORTED_ARCHITECTURES) or raw.get("model_type") in SUPPORTED_ARCHITECTURES.values()):
        raise ValueError(f"unsupported architecture {archs or raw.get('model_type')!r} in {str(cfg_file)!r}: "
                         f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    if raw.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true in {str(cfg_file)!r} is not supported (Megatron attends to the "
                         "whole context)")
    from transformers import AutoConfig

    try:
        return model_fields_from_hf(AutoConfig.from_pretrained(hf_dir))
    except ValueError as exc:
        raise ValueError(f"{str(cfg_file)!r}: {exc}") from None


def _yaml(value: Any) -> str:
    """A value as it is written in a config file or after --set (true/false, null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def hf_mismatches(values: dict[str, Any], hf_fields: dict[str, Any], cfg_file: str | Path) -> list[str]:
    """One message for each ``model.<field>`` in ``values`` that contradicts ``hf_fields`` (config.json's).

    Every field must equal config.json's, except ``max_position_embeddings``, which may be smaller (the run's
    context; no weight depends on it), and ``kv_channels``, which compares as the per-head dimension (null means
    hidden_size // num_attention_heads).
    """
    problems = []
    hf_head_dim = hf_fields["hidden_size"] // hf_fields["num_attention_heads"]
    for name, value in values.items():
        if name not in hf_fields:
            continue
        want, key, shown = hf_fields[name], HF_KEYS[name], value
        if name == "kv_channels":
            value, want = value or hf_head_dim, want or hf_head_dim
        if isinstance(want, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            same = math.isclose(value, want, rel_tol=1e-9, abs_tol=0.0)
        else:
            same = value == want
        if name == "max_position_embeddings" and value <= want:
            continue
        if same:
            continue
        has = f"{key}={_yaml(want)}"
        fix = f"set model.{name}={_yaml(want)} or remove it"
        if name == "add_qkv_bias":
            family = "Qwen3" if hf_fields.get("qk_layernorm") else "Llama"
            has = "a Qwen2 architecture (QKV bias)" if want else f"a {family} architecture (no QKV bias)"
        elif name == "qk_layernorm":
            has = "a Qwen3 architecture (q/k norms)" if want else "an architecture without q/k norms (Qwen2/Llama)"
        elif name == "max_position_embeddings":
            fix = (f"set model.max_position_embeddings <= {want} (the run's context may be shorter, not longer) "
                   "or remove it")
        problems.append(f"model.{name}={_yaml(shown)} but {cfg_file} has {has}: {fix}")
    return problems


def check_model_matches_hf(model: ModelConfig) -> None:
    """When ``model.hf_dir`` is set, every architecture field of ``model`` agrees with its config.json
    (:func:`hf_mismatches`); ValueError naming each field that does not, both values and the fix."""
    if not model.hf_dir:
        return
    fields = read_hf_model_fields(model.hf_dir)
    values = {name: getattr(model, name) for name in fields}
    problems = hf_mismatches(values, fields, Path(model.hf_dir) / "config.json")
    if problems:
        raise ValueError("; ".join(problems))
