"""Per-expert Hugging Face checkpoint names <-> the fused expert parameters of transformers' MoE models.

transformers (5.x) holds a Qwen3-MoE layer's experts as two 3-D parameters, ``mlp.experts.gate_up_proj``
[E, 2F, H] (each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` [E, H, F], and converts the
checkpoint's per-expert tensors (``mlp.experts.<e>.gate_proj.weight``, ``up_proj``, ``down_proj``: the names the
weight sync sends, as SGLang's loader takes them) on load. :func:`checkpoint_named_views` gives the embedded
engine one view per checkpoint name into those parameters, so a synced tensor is copied straight in place.

Example:
    params = checkpoint_named_views(dict(model.named_parameters()))
    params["model.layers.0.mlp.experts.3.up_proj.weight"].copy_(tensor)     # writes gate_up_proj[3, F:]
"""

from __future__ import annotations

import re

import torch

__all__ = ["checkpoint_named_views"]

_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)(?P<kind>gate_up_proj|down_proj)$")


def checkpoint_named_views(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with each fused expert parameter replaced by per-expert views under checkpoint names (other
    entries unchanged, in order). Views share storage with the parameters: copying into one sets the parameter."""
    out: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        m = _FUSED.match(name)
        if m is None or param.dim() != 3:
            out[name] = param
            continue
        prefix = m.group("prefix")
        if m.group("kind") == "down_proj":
            out.update({f"{prefix}{e}.down_proj.weight": param[e] for e in range(param.shape[0])})
            continue
        ffn = param.shape[1] // 2
        for e in range(param.shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = param[e, :ffn]
            out[f"{prefix}{e}.up_proj.weight"] = param[e, ffn:]
    return out
