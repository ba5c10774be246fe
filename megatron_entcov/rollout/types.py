"""Rollout data types shared by every engine: :class:`SamplingParams` (what to sample), :class:`Sample` (what
came back) and ``mix_seed``. Plain, validated dataclasses with a JSON-able ``to_dict``/``from_dict``, shipped
between ranks or over HTTP unchanged.

Rollout log-probs have one definition for every engine, the trainer's recomputation:
    rollout_logprobs[t] = log_softmax(logits_t / temperature)[response_ids[t]]
over the full (unpadded) vocabulary, at the sampled token, in float32, BEFORE any top-p/top-k truncation (with
truncation they are biased against the sampling distribution: ``SamplingParams.truncates``).

A Sample may carry the rollout's routing (``routed_experts``, MoE models with model.moe_routing_source=rollout):
the experts the engine routed each token to, in the compact form SGLang returns them.

Example:
    params = SamplingParams.from_config(cfg.sampling, seed=cfg.seed + step)
    samples = engine.generate(prompt_ids, params)            # list[Sample], one per prompt entry, in order
    wire = [s.to_dict() for s in samples]; back = [Sample.from_dict(d) for d in wire]

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FINISH_REASONS", "SamplingParams", "Sample", "mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, stable across processes and Python versions (every engine's
    per-call and per-request seeds come from here)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

FINISH_REASONS = ("stop", "length", "abort")
"""Why a response ended: 'stop' = a stop token was generated (and is the last entry of response_ids);
'length' = max_new_tokens reached; 'abort' = the engine was paused (or a server lost) mid-generation, the
partial response is kept with valid log-probs."""


def _fail(field_name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field_name}={value!r} is invalid: {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-call sampling parameters (every prompt of a ``generate`` call is sampled the same way).

    Built from the run config with :meth:`from_config`; validated like ``SamplingConfig`` (ValueError naming the
    field, the value and the fix).
    """

    temperature: float = 1.0
    """Softmax temperature in (0, 100]; the trainer divides its logits by the same value. Greedy = top_k=1."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]: keep the most likely tokens whose mass first reaches top_p; 1 = off."""
    top_k: int = -1
    """Keep the top_k most likely tokens; -1 = off; 1 = greedy. Applied before top_p."""
    max_new_tokens: int = 32
    """Longest response in tokens (>= 1); a response that reaches it ends with finish_reason 'length'."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (finish_reason 'stop'); the stop token is part of the response."""
    seed: int | None = None
    """Seed of the sampling randomness (>= 0): with the same weights and prompts, the same samples (callers
    vary it per call). None = the engine's own seed mixed with its call counter (fresh samples per call)."""

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or math.isnan(t) or not 0.0 < t <= 100.0:
            _fail("SamplingParams.temperature", t, "must lie in (0, 100]; for greedy decoding use top_k=1")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or math.isnan(p) or not 0.0 < p <= 1.0:
            _fail("SamplingParams.top_p", p, "must lie in (0, 1]; 1 turns nucleus sampling off")
        if not _is_int(self.top_k) or (self.top_k != -1 and self.top_k < 1):
            _fail("SamplingParams.top_k", self.top_k, "must be -1 (off) or an integer >= 1")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            _fail("SamplingParams.max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not isinstance(self.stop_token_ids, tuple):
            # A list from YAML/JSON is fine; store a tuple so the frozen dataclass stays hashable.
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for i, tok in enumerate(self.stop_token_ids):
            if not _is_int(tok) or tok < 0:
                _fail(f"SamplingParams.stop_token_ids[{i}]", tok, "must be a non-negative token id")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _fail("SamplingParams.seed", self.seed, "must be None or an integer >= 0")

    @property
    def truncates(self) -> bool:
        """True when top-p or top-k makes the sampling distribution differ from the reported log-probs'."""
        return self.top_p < 1.0 or self.top_k != -1

    @classmethod
    def from_config(cls, cfg, *, seed: int | None = None, **overrides: Any) -> SamplingParams:
        """From a ``SamplingConfig`` (``cfg.sampling``); ``overrides`` replace single fields (e.g. for evaluation:
        ``top_k=1``)."""
        fields = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                      max_new_tokens=cfg.max_new_tokens, stop_token_ids=tuple(cfg.stop_token_ids), seed=seed)
        unknown = set(overrides) - set(fields)
        if unknown:
            raise TypeError(f"SamplingParams.from_config: unknown fields {sorted(unknown)}; "
                            f"expected some of {sorted(fields)}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (stop_token_ids as a list)."""
        d = dataclasses.asdict(self)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"SamplingParams.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass(kw_only=True)
class Sample:
    """One response to one prompt entry of a ``generate`` call."""

    prompt_ids: list[int]
    """The prompt's token ids, as passed in (no padding)."""
    response_ids: list[int]
    """Generated token ids; ends with the stop token when finish_reason is 'stop'."""
    rollout_logprobs: list[float]
    """One per response token: log_softmax(logits / temperature)[token] over the full vocabulary, before
    top-p/top-k truncation (module docstring)."""
    finish_reason: str
    """'stop', 'length' or 'abort' (FINISH_REASONS)."""
    weight_version: int
    """Engine weight version that produced every token of this response."""
    index: int
    """Position of the prompt entry in the generate() call."""
    routed_experts: np.ndarray | None = dataclasses.field(default=None, compare=False)
    """The rollout's routing, or None (not part of ``==``: compare it with numpy): int32 [len(prompt_ids) + len(response_ids) - 1, MoE-model layers, top-k],
    row p = the (logical, global) experts each layer routed token p of prompt + response to (the last token was
    never run through the model, so it has no row); SGLang's ``meta_info.routed_experts`` decoded
    (rollout/sglang/protocol.py). Only with model.moe_routing_source=rollout."""

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.rollout_logprobs):
            raise ValueError(f"Sample(index={self.index}): {len(self.response_ids)} response_ids but "
                             f"{len(self.rollout_logprobs)} rollout_logprobs; expected one log-prob per token")
        if self.finish_reason not in FINISH_REASONS:
            _fail(f"Sample(index={self.index}).finish_reason", self.finish_reason,
                  f"choose one of {', '.join(map(repr, FINISH_REASONS))}")
        r = self.routed_experts
        rows = len(self.prompt_ids) + len(self.response_ids) - 1
        if r is not None and not (isinstance(r, np.ndarray) and r.dtype == np.int32 and r.ndim == 3
                                  and r.shape[0] == rows):
            shape = getattr(r, "shape", None)
            _fail(f"Sample(index={self.index}).routed_experts", f"{type(r).__name__} {getattr(r, 'dtype', '')} "
                  f"{shape}", f"must be None or an int32 array [prompt + response tokens - 1 = {rows}, layers, top-k]")

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with the dataclass fields (lists copied)."""
        d = dict(prompt_ids=list(self.prompt_ids), response_ids=list(self.response_ids),
                 rollout_logprobs=list(self.rollout_logprobs), finish_reason=self.finish_reason,
                 weight_version=self.weight_version, index=self.index)
        if self.routed_experts is not None:
            # Compact and JSON-able: the int32 bytes (little-endian) in base64, as SGLang sends them, and the shape.
            r = self.routed_experts
            d["routed_experts"] = {"shape": list(r.shape),
                                   "int32_b64": base64.b64encode(r.astype("<i4", copy=False).tobytes()).decode()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        """Inverse of :meth:`to_dict`; ValueError for missing or unknown keys (``routed_experts`` is optional)."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = names - set(d) - {"routed_experts"}, set(d) - names
        if missing or unknown:
            raise ValueError(f"Sample.from_dict: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        routed = d.get("routed_experts")
        if routed is not None:
            routed = np.frombuffer(base64.b64decode(routed["int32_b64"]), dtype="<i4").astype(np.int32)
            routed = routed.reshape(d["routed_experts"]["shape"])
        return cls(prompt_ids=[int(t) for t in d["prompt_ids"]], response_ids=[int(t) for t in d["response_ids"]],
                   rollout_logprobs=[float(x) for x in d["rollout_logprobs"]], finish_reason=d["finish_reason"],
                   weight_version=int(d["weight_version"]), index=int(d["index"]), routed_experts=routed)
