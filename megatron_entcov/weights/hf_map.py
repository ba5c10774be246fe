"""The declarative map between Hugging Face (Qwen2/Qwen2.5, Llama) and Megatron-Core GPTModel weights.

One :class:`WeightRule` per Megatron tensor says which Hugging Face tensors it is made of, how they combine
(``kind``), which dim is split over tensor-parallel ranks and under which key it is stored in a Megatron dist
checkpoint. The functions below are pure tensor moves (no arithmetic), so a round trip is bitwise exact. The
Megatron layouts they follow (fused QKV by query group, fused [gate; up] fc1, padded vocabulary rows, the norm
names of the local and Transformer Engine specs) are written out in the design notes.

Example:
    rule, layer = match_megatron_name("decoder.layers.3.self_attention.linear_qkv.weight")
    full = to_megatron(rule, [q, k, v], model_cfg, padded_vocab)    # tp=1-shaped Megatron tensor
    q, k, v = to_hf(rule, full, model_cfg)
    shard = tp_shard(rule, full, tp_rank, tp_size)                   # this rank's slice

Design notes: docs/design/weights.md
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_entcov.config import ModelConfig

__all__ = [
    "WeightRule",
    "RULES",
    "EMBEDDING_RULE",
    "active_rules",
    "match_megatron_name",
    "hf_names",
    "expected_hf_shapes",
    "megatron_shape",
    "to_megatron",
    "to_hf",
    "tp_shard",
    "tp_unshard",
    "pack_qkv",
    "unpack_qkv",
]

_KINDS = ("copy", "qkv", "gate_up", "vocab")


@dataclass(frozen=True)
class WeightRule:
    """How one Megatron tensor is built from Hugging Face tensors."""

    megatron: str
    """Megatron-Core parameter name in the local spec; ``{layer}`` is a layer index (0-based)."""
    hf: tuple[str, ...]
    """Hugging Face tensor names it combines, in order; ``{layer}`` is the global layer index."""
    kind: str
    """'copy' (one tensor as is), 'qkv' (q, k, v -> grouped fused QKV), 'gate_up' ([gate; up]),
    'vocab' (rows padded to the padded vocabulary)."""
    tp_dim: int | None
    """Dim split over tensor-parallel ranks; None = replicated on every tp rank."""
    ckpt_key: str
    """Key of this tensor in a Megatron dist checkpoint (layer rules: stacked over layers along dim 0)."""
    aliases: tuple[str, ...] = ()
    """Other Megatron names of the same tensor (Transformer Engine spec)."""
    when: str | None = None
    """Only for models with this feature: 'qkv_bias' (Qwen2) or 'untied' (separate output layer)."""

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, f"{self.megatron}: kind={self.kind!r} not in {_KINDS}"

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    def megatron_name(self, layer: int | None = None) -> str:
        return self.megatron.format(layer=layer) if self.per_layer else self.megatron

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [n.format(layer=layer) for n in self.hf] if self.per_layer else list(self.hf)

    def applies_to(self, cfg: "ModelConfig") -> bool:
        if self.when == "qkv_bias":
            return cfg.add_qkv_bias
        if self.when == "untied":
            return not cfg.tie_word_embeddings
        return True


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

RULES: tuple[WeightRule, ...] = (
    WeightRule(megatron="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",), kind="vocab",
               tp_dim=0, ckpt_key="embedding.word_embeddings.weight"),
    WeightRule(megatron=_L + "input_layernorm.weight", hf=(_H + "input_layernorm.weight",), kind="copy",
               tp_dim=None, ckpt_key="decoder.layers.self_attention.linear_qkv.layer_norm_weight",
               aliases=(_L + "self_attention.linear_qkv.layer_norm_weight",)),
    WeightRule(megatron=_L + "self_attention.linear_qkv.weight",
               hf=(_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
               kind="qkv", tp_dim=0, ckpt_key="decoder.layers.self_attention.linear_qkv.weight"),
    WeightRule(megatron=_L + "self_attention.linear_qkv.bias",
               hf=(_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
               kind="qkv", tp_dim=0, ckpt_key="decoder.layers.self_attention.linear_qkv.bias", when="qkv_bias"),
    WeightRule(megatron=_L + "self_attention.linear_proj.weight", hf=(_H + "self_attn.o_proj.weight",),
               kind="copy", tp_dim=1, ckpt_key="decoder.layers.self_attention.linear_proj.weight"),
    WeightRule(megatron=_L + "pre_mlp_layernorm.weight", hf=(_H + "post_attention_layernorm.weight",),
               kind="copy", tp_dim=None, ckpt_key="decoder.layers.mlp.linear_fc1.layer_norm_weight",
               aliases=(_L + "mlp.linear_fc1.layer_norm_weight",)),
    WeightRule(megatron=_L + "mlp.linear_fc1.weight", hf=(_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
               kind="gate_up", tp_dim=0, ckpt_key="decoder.layers.mlp.linear_fc1.weight"),
    WeightRule(megatron=_L + "mlp.linear_fc2.weight", hf=(_H + "mlp.down_proj.weight",), kind="copy",
               tp_dim=1, ckpt_key="decoder.layers.mlp.linear_fc2.weight"),
    WeightRule(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",), kind="copy", tp_dim=None,
               ckpt_key="decoder.final_layernorm.weight"),
    WeightRule(megatron="output_layer.weight", hf=("lm_head.weight",), kind="vocab", tp_dim=0,
               ckpt_key="output_layer.weight", when="untied"),
)

EMBEDDING_RULE = RULES[0]
"""The input embedding (vocabulary-parallel); a tied output layer reads it too."""


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")


_PATTERNS: tuple[tuple[re.Pattern, WeightRule], ...] = tuple(
    (_pattern(name), rule) for rule in RULES for name in (rule.megatron, *rule.aliases))


def active_rules(cfg: "ModelConfig") -> list[WeightRule]:
    """The rules that apply to this model (QKV bias only for Qwen2, output layer only when untied)."""
    return [r for r in RULES if r.applies_to(cfg)]


def match_megatron_name(name: str) -> tuple[WeightRule, int | None] | None:
    """(rule, layer index as written in the name) for a Megatron parameter name, or None (e.g. _extra_state).

    Accepts local-spec and Transformer Engine names; a DDP/Float16Module prefix ``module.`` is stripped.
    """
    while name.startswith("module."):
        name = name[len("module."):]
    for pattern, rule in _PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    return None


def hf_names(cfg: "ModelConfig") -> list[str]:
    """Every Hugging Face tensor name this model needs, in checkpoint order (embeddings, layers, norm, head)."""
    rules = active_rules(cfg)
    names = [n for r in rules if r.megatron.startswith("embedding.") for n in r.hf_names()]
    for layer in range(cfg.num_layers):
        names += [n for r in rules if r.per_layer for n in r.hf_names(layer)]
    names += [n for r in rules if not r.per_layer and not r.megatron.startswith("embedding.") for n in r.hf_names()]
    return names


def _head_dim(cfg: "ModelConfig") -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def expected_hf_shapes(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """The shape of every Hugging Face tensor of this model (unpadded vocabulary)."""
    h, d = cfg.hidden_size, _head_dim(cfg)
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h), "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, cfg.ffn_hidden_size),
    }
    fixed = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
             "lm_head.weight": (cfg.vocab_size, h)}
    shapes = {}
    for name in hf_names(cfg):
        if name in fixed:
            shapes[name] = fixed[name]
        else:
            shapes[name] = per_layer[name.split(".", 3)[3]]
    return shapes


def megatron_shape(rule: WeightRule, cfg: "ModelConfig", padded_vocab: int) -> tuple[int, ...]:
    """Full (tp=1-shaped) shape of the Megatron tensor of ``rule``, one layer (no stacking dim)."""
    shapes = expected_hf_shapes(cfg)
    parts = [shapes[n] for n in rule.hf_names(0)]
    if rule.kind == "vocab":
        return (padded_vocab,) + parts[0][1:]
    if rule.kind in ("qkv", "gate_up"):
        return (sum(p[0] for p in parts),) + parts[0][1:]
    return parts[0]


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: "ModelConfig") -> torch.Tensor:
    """Hugging Face q/k/v projections (weights [n*d, H] or biases [n*d]) -> Megatron grouped fused QKV."""
    groups, d = cfg.num_query_groups, _head_dim(cfg)
    per_group = cfg.num_attention_heads // groups
    rest = tuple(q.shape[1:])
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *rest)


def unpack_qkv(qkv: torch.Tensor, cfg: "ModelConfig") -> list[torch.Tensor]:
    """Inverse of :func:`pack_qkv`: [q, k, v] as contiguous tensors."""
    groups, d = cfg.num_query_groups, _head_dim(cfg)
    per_group = cfg.num_attention_heads // groups
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return [q.reshape(groups * per_group * d, *rest).contiguous(), k.reshape(groups * d, *rest).contiguous(),
            v.reshape(groups * d, *rest).contiguous()]


def to_megatron(rule: WeightRule, hf_tensors: list[torch.Tensor], cfg: "ModelConfig",
                padded_vocab: int) -> torch.Tensor:
    """Combine the Hugging Face tensors of ``rule`` into the full (unsharded) Megatron tensor."""
    if rule.kind == "copy":
        return hf_tensors[0]
    if rule.kind == "qkv":
        return pack_qkv(*hf_tensors, cfg)
    if rule.kind == "gate_up":
        return torch.cat(hf_tensors, dim=0)
    (emb,) = hf_tensors
    if padded_vocab < emb.shape[0]:
        raise ValueError(f"{rule.megatron}: padded vocabulary {padded_vocab} < vocab_size {emb.shape[0]}")
    # Padding rows are zeros: never looked up (token ids < vocab_size) and stripped again on export.
    pad = emb.new_zeros((padded_vocab - emb.shape[0],) + tuple(emb.shape[1:]))
    return torch.cat([emb, pad], dim=0)


def to_hf(rule: WeightRule, full: torch.Tensor, cfg: "ModelConfig") -> list[torch.Tensor]:
    """Split a full Megatron tensor into the Hugging Face tensors of ``rule`` (contiguous, padding stripped)."""
    if rule.kind == "copy":
        return [full.contiguous()]
    if rule.kind == "qkv":
        return unpack_qkv(full, cfg)
    if rule.kind == "gate_up":
        return [t.contiguous() for t in torch.chunk(full, 2, dim=0)]
    return [full[: cfg.vocab_size].contiguous()]


def tp_shard(rule: WeightRule, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full Megatron tensor (a view where possible)."""
    if rule.tp_dim is None or tp_size == 1:
        return full
    if rule.kind == "gate_up":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, dim=0)[tp_rank], torch.chunk(up, tp_size, dim=0)[tp_rank]])
    return torch.chunk(full, tp_size, dim=rule.tp_dim)[tp_rank]


def tp_unshard(rule: WeightRule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_shard`: the full Megatron tensor from every tp rank's slice, in rank order."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=rule.tp_dim)
