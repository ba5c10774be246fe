"""The declarative map between Hugging Face (Qwen2/Qwen2.5, Qwen3, Qwen3-MoE, Llama) and Megatron-Core GPTModel
weights.

One :class:`WeightRule` per Megatron tensor says which Hugging Face tensors it is made of, how they combine
(``kind``), which dim is split over tensor-parallel ranks and under which key it is stored in a Megatron dist
checkpoint. The functions below are pure tensor moves (no arithmetic), so a round trip is bitwise exact. The
Megatron layouts they follow (fused QKV by query group, fused [gate; up] fc1, padded vocabulary rows, the norm
names of the local and Transformer Engine specs) are written out in the design notes. Expert rules carry an
``{expert}`` index (the rank's local expert in Megatron names, the global expert in Hugging Face names and in
checkpoints); a rule applies to a layer as :meth:`WeightRule.applies_to_layer` says (MoE or dense MLP).

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
    "match_megatron_param",
    "layer_slots",
    "checkpoint_location",
    "checkpoint_shape",
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
    """Only for models with this feature: 'qkv_bias' (Qwen2), 'untied' (separate output layer), 'qk_layernorm'
    (Qwen3), 'moe' (the MoE layers of Qwen3-MoE) or 'dense_mlp' (the dense MLP layers)."""

    def __post_init__(self) -> None:
        assert self.kind in _KINDS, f"{self.megatron}: kind={self.kind!r} not in {_KINDS}"

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    @property
    def per_expert(self) -> bool:
        """One tensor per expert (``{expert}`` in the names)."""
        return "{expert}" in self.megatron

    def megatron_name(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.megatron.format(layer=layer, expert=expert) if self.per_layer else self.megatron

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [n.format(layer=layer, expert=expert) for n in self.hf] if self.per_layer else list(self.hf)

    def applies_to(self, cfg: "ModelConfig") -> bool:
        """Whether the model has this tensor in any layer."""
        if self.when == "qkv_bias":
            return cfg.add_qkv_bias
        if self.when == "untied":
            return not cfg.tie_word_embeddings
        if self.when == "qk_layernorm":
            return cfg.qk_layernorm
        if self.when in ("moe", "dense_mlp"):
            return any(self.applies_to_layer(cfg, layer) for layer in range(cfg.num_layers))
        return True

    def applies_to_layer(self, cfg: "ModelConfig", layer: int) -> bool:
        """Whether ``layer`` (0-based, global) has this tensor: MoE rules in MoE layers, dense-MLP rules in the
        others (cfg.moe_layer_pattern())."""
        if self.when == "moe":
            return bool(cfg.moe_layer_pattern()[layer])
        if self.when == "dense_mlp":
            return not cfg.moe_layer_pattern()[layer]
        return self.applies_to(cfg)


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
    WeightRule(megatron=_L + "self_attention.q_layernorm.weight", hf=(_H + "self_attn.q_norm.weight",), kind="copy",
               tp_dim=None, ckpt_key="decoder.layers.self_attention.q_layernorm.weight", when="qk_layernorm"),
    WeightRule(megatron=_L + "self_attention.k_layernorm.weight", hf=(_H + "self_attn.k_norm.weight",), kind="copy",
               tp_dim=None, ckpt_key="decoder.layers.self_attention.k_layernorm.weight", when="qk_layernorm"),
    WeightRule(megatron=_L + "pre_mlp_layernorm.weight", hf=(_H + "post_attention_layernorm.weight",),
               kind="copy", tp_dim=None, ckpt_key="decoder.layers.mlp.linear_fc1.layer_norm_weight",
               aliases=(_L + "mlp.linear_fc1.layer_norm_weight",)),
    WeightRule(megatron=_L + "mlp.linear_fc1.weight", hf=(_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
               kind="gate_up", tp_dim=0, ckpt_key="decoder.layers.mlp.linear_fc1.weight", when="dense_mlp"),
    WeightRule(megatron=_L + "mlp.linear_fc2.weight", hf=(_H + "mlp.down_proj.weight",), kind="copy",
               tp_dim=1, ckpt_key="decoder.layers.mlp.linear_fc2.weight", when="dense_mlp"),
    # Qwen3-MoE: the router and each expert's SwiGLU, whole on every tp rank (expert tensor parallelism is 1; the
    # experts are split over the expert-parallel ranks instead).
    WeightRule(megatron=_L + "mlp.router.weight", hf=(_H + "mlp.gate.weight",), kind="copy", tp_dim=None,
               ckpt_key="decoder.layers.mlp.router.weight", when="moe"),
    WeightRule(megatron=_L + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
               hf=(_H + "mlp.experts.{expert}.gate_proj.weight", _H + "mlp.experts.{expert}.up_proj.weight"),
               kind="gate_up", tp_dim=None, ckpt_key="decoder.layers.mlp.experts.experts.linear_fc1.weight",
               when="moe"),
    WeightRule(megatron=_L + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
               hf=(_H + "mlp.experts.{expert}.down_proj.weight",), kind="copy", tp_dim=None,
               ckpt_key="decoder.layers.mlp.experts.experts.linear_fc2.weight", when="moe"),
    WeightRule(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",), kind="copy", tp_dim=None,
               ckpt_key="decoder.final_layernorm.weight"),
    WeightRule(megatron="output_layer.weight", hf=("lm_head.weight",), kind="vocab", tp_dim=0,
               ckpt_key="output_layer.weight", when="untied"),
)

EMBEDDING_RULE = RULES[0]
"""The input embedding (vocabulary-parallel); a tied output layer reads it too."""


def _pattern(template: str) -> re.Pattern:
    text = re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    return re.compile("^" + text.replace(re.escape("{expert}"), r"(?P<expert>\d+)") + "$")


_PATTERNS: tuple[tuple[re.Pattern, WeightRule], ...] = tuple(
    (_pattern(name), rule) for rule in RULES for name in (rule.megatron, *rule.aliases))


def active_rules(cfg: "ModelConfig") -> list[WeightRule]:
    """The rules that apply to this model (QKV bias only for Qwen2, output layer only when untied, ...)."""
    return [r for r in RULES if r.applies_to(cfg)]


def match_megatron_param(name: str) -> tuple[WeightRule, int | None, int | None] | None:
    """(rule, layer index, local expert index) as written in a Megatron parameter name (None where the name has
    none), or None for a name with no rule (e.g. _extra_state). Local-spec and Transformer Engine names; a
    DDP/Float16Module prefix ``module.`` is stripped."""
    while name.startswith("module."):
        name = name[len("module."):]
    for pattern, rule in _PATTERNS:
        m = pattern.match(name)
        if m:
            found = m.groupdict()
            layer, expert = found.get("layer"), found.get("expert")
            return rule, (int(layer) if layer is not None else None), (int(expert) if expert is not None else None)
    return None


def match_megatron_name(name: str) -> tuple[WeightRule, int | None] | None:
    """(rule, layer index as written in the name) for a Megatron parameter name, or None (e.g. _extra_state);
    :func:`match_megatron_param` also gives an expert's index."""
    match = match_megatron_param(name)
    return None if match is None else match[:2]


def layer_slots(cfg: "ModelConfig", layer: int) -> list[tuple[WeightRule, int | None]]:
    """(rule, global expert or None) of every tensor of ``layer``, in checkpoint order (experts by index)."""
    rules = [r for r in active_rules(cfg) if r.per_layer and r.applies_to_layer(cfg, layer)]
    slots = [(r, None) for r in rules if not r.per_expert]
    experts = cfg.num_experts if any(r.per_expert for r in rules) else 0
    slots += [(r, e) for e in range(experts) for r in rules if r.per_expert]
    return slots


def hf_names(cfg: "ModelConfig") -> list[str]:
    """Every Hugging Face tensor name this model needs, in checkpoint order (embeddings, layers, norm, head)."""
    rules = active_rules(cfg)
    names = [n for r in rules if r.megatron.startswith("embedding.") for n in r.hf_names()]
    for layer in range(cfg.num_layers):
        names += [n for r, e in layer_slots(cfg, layer) for n in r.hf_names(layer, e)]
    names += [n for r in rules if not r.per_layer and not r.megatron.startswith("embedding.") for n in r.hf_names()]
    return names


def checkpoint_location(rule: WeightRule, cfg: "ModelConfig", layer: int | None,
                        expert: int | None = None) -> tuple[str, int | None]:
    """(key, index along its dim 0 or None) of one tensor in a Megatron dist checkpoint. Dense models stack each
    layer tensor over layers (``rule.ckpt_key``, index = layer); Megatron keys an MoE model's layers one by one
    (its layers differ: ``decoder.layers.<layer>.``...) and stacks each layer's experts (index = global expert)."""
    if not rule.per_layer:
        return rule.ckpt_key, None
    if not cfg.is_moe:
        return rule.ckpt_key, layer
    return rule.ckpt_key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1), expert


def checkpoint_shape(rule: WeightRule, cfg: "ModelConfig", padded_vocab: int) -> tuple[int, ...]:
    """The shape of :func:`checkpoint_location`'s key: the layer stack (dense) or expert stack (MoE) included."""
    shape = megatron_shape(rule, cfg, padded_vocab)
    if rule.per_expert:
        return (cfg.num_experts,) + shape
    if rule.per_layer and not cfg.is_moe:
        return (cfg.num_layers,) + shape
    return shape


def _head_dim(cfg: "ModelConfig") -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


_EXPERT_INDEX = re.compile(r"experts\.\d+\.")


def _hf_shape(cfg: "ModelConfig", name: str) -> tuple[int, ...]:
    """The shape of the Hugging Face tensor ``name`` (any layer, any expert) of this model."""
    h, d = cfg.hidden_size, _head_dim(cfg)
    q, kv, f, fe = cfg.num_attention_heads * d, cfg.num_query_groups * d, cfg.ffn_hidden_size, cfg.expert_ffn_hidden_size
    fixed = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
             "lm_head.weight": (cfg.vocab_size, h)}
    if name in fixed:
        return fixed[name]
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        "mlp.gate.weight": (cfg.num_experts or 0, h),
        "mlp.experts.E.gate_proj.weight": (fe, h), "mlp.experts.E.up_proj.weight": (fe, h),
        "mlp.experts.E.down_proj.weight": (h, fe),
    }
    return per_layer[_EXPERT_INDEX.sub("experts.E.", name.split(".", 3)[3])]


def expected_hf_shapes(cfg: "ModelConfig") -> dict[str, tuple[int, ...]]:
    """The shape of every Hugging Face tensor of this model (unpadded vocabulary)."""
    return {name: _hf_shape(cfg, name) for name in hf_names(cfg)}


def megatron_shape(rule: WeightRule, cfg: "ModelConfig", padded_vocab: int) -> tuple[int, ...]:
    """Full (tp=1-shaped) shape of the Megatron tensor of ``rule``, one layer and one expert (no stacking dim)."""
    parts = [_hf_shape(cfg, n) for n in rule.hf_names(0, 0)]
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
