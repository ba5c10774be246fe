"""The wire format of SGLang's ``/generate``: the request the engine sends and the Sample it makes of the reply.

Token ids in (``input_ids``), token ids and log-probs out (``output_ids``, ``meta_info.output_token_logprobs``,
checked to name the same tokens), no re-tokenisation; SGLang keeps weight versions as strings ('default'
until set), ours are integers. Per-request sampling seeds (``request_seeds``): with the caller's per-entry
seeds, ``request_seed(seeds[i])``, a function of the entry's own seed only (not of its index, its call or its
replica: data-parallel replicas reproduce one process); without them, mixed from the call's seed and the
entry's index so repeated prompts differ.

Routing (model.moe_routing_source=rollout, :func:`routing_spec`): the request sets ``return_routed_experts``
and a server launched with ``--enable-return-routed-experts`` answers ``meta_info.routed_experts``: base64 of the
int32 bytes (``torch.Tensor.numpy().tobytes()``, little-endian) of an array [prompt + output tokens - 1,
num_hidden_layers, num_experts_per_tok] (SGLang 0.5.23: srt/state_capturer/routed_experts.py, the detokenizer's
``_b64_encode_per_request``): row p = the logical expert ids (before any expert-parallel placement) each layer
routed token p to; every layer has a column (SGLang's Qwen3-MoE makes every layer sparse); the last token,
sampled but never run, has no row. ``parse_generate`` decodes it into ``Sample.routed_experts``.

Example:
    payload = generate_payload(prompt, params, seed=request_seed(base, i))
    payloads = generate_payloads(prompts, params, base=base, seeds=seeds)     # what SGLangEngine.generate sends
    sample = parse_generate(http_json(url, "/generate", payload, timeout=60), prompt, index=i)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from megatron_entcov.rollout.sglang.http import ServerError
from megatron_entcov.rollout.types import Sample, SamplingParams, mix_seed

__all__ = ["request_seed", "request_seeds", "sampling_payload", "generate_payload", "generate_payloads",
           "parse_generate", "parse_version", "RoutingSpec", "routing_spec", "decode_routed_experts"]


class RoutingSpec(NamedTuple):
    """What the rollout's routing must look like for the policy: layers, experts per token, experts per layer."""

    num_layers: int
    topk: int
    num_experts: int


def routing_spec(model_cfg) -> RoutingSpec | None:
    """The routing the engine asks the servers for (model.moe_routing_source=rollout), else None."""
    if getattr(model_cfg, "moe_routing_source", "old_logprob") != "rollout" or not model_cfg.is_moe:
        return None
    return RoutingSpec(model_cfg.num_layers, model_cfg.moe_router_topk, model_cfg.num_experts)


def decode_routed_experts(text, rows: int, spec: RoutingSpec, *, where: str) -> np.ndarray:
    """SGLang's ``meta_info.routed_experts`` as int32 [rows, layers, top-k]; ServerError (not retryable) naming
    ``where`` when it is not base64 of that many int32 expert ids in [0, num_experts)."""
    try:
        raw = base64.b64decode(text.encode("ascii") if isinstance(text, str) else text, validate=True)
    except (binascii.Error, AttributeError, UnicodeEncodeError) as err:
        raise ServerError("?", "/generate", f"{where}: meta_info.routed_experts is not base64 ({err})",
                          retryable=False) from None
    want = (rows, spec.num_layers, spec.topk)
    if len(raw) != 4 * rows * spec.num_layers * spec.topk:
        raise ServerError("?", "/generate", f"{where}: meta_info.routed_experts holds {len(raw)} bytes, not the "
                          f"int32 array {list(want)} = [prompt + output tokens - 1, model.num_layers, "
                          "model.moe_router_topk]: the server's model has another num_hidden_layers or "
                          "num_experts_per_tok than the policy (serve the policy's checkpoint)", retryable=False)
    ids = np.frombuffer(raw, dtype="<i4").astype(np.int32).reshape(want)
    if ids.size and (ids.min() < 0 or ids.max() >= spec.num_experts):
        raise ServerError("?", "/generate", f"{where}: meta_info.routed_experts names experts in [{ids.min()}, "
                          f"{ids.max()}], outside [0, model.num_experts={spec.num_experts}): the server's model "
                          "has other experts than the policy", retryable=False)
    return ids


def request_seed(*parts: int) -> int:
    """A per-request sampling seed that fits SGLang's int32 seed tensors."""
    return mix_seed(*parts) & ((1 << 31) - 1)


def generate_payload(prompt: list[int], params: SamplingParams, *, seed: int, routing: bool = False) -> dict:
    """The /generate body for one prompt entry (n = 1), asking for the sampled tokens' log-probs (and with
    ``routing`` for every token's experts)."""
    payload = {"input_ids": list(prompt), "sampling_params": dict(sampling_payload(params), sampling_seed=int(seed)),
               "return_logprob": True, "logprob_start_len": -1}
    if routing:
        payload["return_routed_experts"] = True
    return payload


def request_seeds(num_prompts: int, *, base: int, seeds: Sequence[int] | None = None) -> list[int]:
    """The ``sampling_seed`` of each of a call's requests: ``request_seed(seeds[i])`` with per-entry seeds
    (validated by the caller, one per entry), else ``request_seed(base, i)`` (``base``: the call's seed)."""
    if seeds is None:
        return [request_seed(base, i) for i in range(num_prompts)]
    if len(seeds) != num_prompts:
        raise ValueError(f"request_seeds: seeds has {len(seeds)} entries for {num_prompts} prompt entries; pass "
                         "one seed per prompt entry, or seeds=None")
    return [request_seed(s) for s in seeds]


def generate_payloads(prompts: Sequence[list[int]], params: SamplingParams, *, base: int,
                      seeds: Sequence[int] | None = None, routing: bool = False) -> list[dict]:
    """The /generate bodies of one ``generate`` call, in order (seeds as in ``request_seeds``)."""
    return [generate_payload(p, params, seed=seed, routing=routing)
            for p, seed in zip(prompts, request_seeds(len(prompts), base=base, seeds=seeds))]


def sampling_payload(params: SamplingParams) -> dict:
    return {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "stop_token_ids": list(params.stop_token_ids)}


def parse_version(v) -> int:
    """SGLang keeps weight_version as a string ('default' until set); ours are integers."""
    if v is None or v == "default":
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"SGLang weight_version {v!r} is not an integer; was it set by another client?") from None


_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def parse_generate(out, prompt: list[int], index: int, routing: RoutingSpec | None = None) -> Sample:
    """A Sample from one /generate response; ServerError (not retryable) for a malformed one. ``routing``: the
    reply must carry ``meta_info.routed_experts`` of that shape (an aborted reply may lack it: then None)."""
    if isinstance(out, list):
        out = out[0] if len(out) == 1 else out
    try:
        meta = out["meta_info"]
        ids = [int(t) for t in out["output_ids"]]
        lps = meta["output_token_logprobs"]
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    except (KeyError, TypeError) as err:
        raise ServerError("?", "/generate", f"malformed response (missing {err}): {str(out)[:300]}",
                          retryable=False) from None
    if kind not in _FINISH:
        raise ServerError("?", "/generate", f"unknown finish_reason {fr!r}", retryable=False)
    logprobs = [float(e[0]) for e in lps][:len(ids)]
    if len(logprobs) != len(ids) or any(int(e[1]) != t for e, t in zip(lps, ids)):
        raise ServerError("?", "/generate", f"prompt {index}: {len(ids)} output_ids but {len(lps)} log-probs, or "
                          "their token ids differ", retryable=False)
    routed = None if routing is None else _routed_experts(meta, len(prompt) + len(ids) - 1, routing, index, kind)
    return Sample(prompt_ids=list(prompt), response_ids=ids, rollout_logprobs=logprobs, finish_reason=_FINISH[kind],
                  weight_version=parse_version(meta.get("weight_version")), index=index, routed_experts=routed)


def _routed_experts(meta: dict, rows: int, spec: RoutingSpec, index: int, kind: str) -> np.ndarray | None:
    text = meta.get("routed_experts")
    if text is None:
        if kind == "abort":
            return None               # cut short: its tokens are routed by the policy's own router
        raise ServerError("?", "/generate", f"prompt {index}: the reply has no meta_info.routed_experts, which "
                          "model.moe_routing_source=rollout needs: launch the server with "
                          "--enable-return-routed-experts (launched servers get it)", retryable=False)
    return decode_routed_experts(text, rows, spec, where=f"prompt {index}")
