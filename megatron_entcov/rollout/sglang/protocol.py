"""The wire format of SGLang's ``/generate``: the request the engine sends and the Sample it makes of the reply.

Token ids in (``input_ids``), token ids and log-probs out (``output_ids``, ``meta_info.output_token_logprobs``,
checked to name the same tokens), no re-tokenisation; SGLang keeps weight versions as strings ('default'
until set), ours are integers. Per-request sampling seeds (``request_seeds``): with the caller's per-entry
seeds, ``request_seed(seeds[i])``, a function of the entry's own seed only (not of its index, its call or its
replica: data-parallel replicas reproduce one process); without them, mixed from the call's seed and the
entry's index so repeated prompts differ.

Example:
    payload = generate_payload(prompt, params, seed=request_seed(base, i))
    payloads = generate_payloads(prompts, params, base=base, seeds=seeds)     # what SGLangEngine.generate sends
    sample = parse_generate(http_json(url, "/generate", payload, timeout=60), prompt, index=i)
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_entcov.rollout.sglang.http import ServerError
from megatron_entcov.rollout.types import Sample, SamplingParams, mix_seed

__all__ = ["request_seed", "request_seeds", "sampling_payload", "generate_payload", "generate_payloads",
           "parse_generate", "parse_version"]


def request_seed(*parts: int) -> int:
    """A per-request sampling seed that fits SGLang's int32 seed tensors."""
    return mix_seed(*parts) & ((1 << 31) - 1)


def generate_payload(prompt: list[int], params: SamplingParams, *, seed: int) -> dict:
    """The /generate body for one prompt entry (n = 1), asking for the sampled tokens' log-probs."""
    return {"input_ids": list(prompt), "sampling_params": dict(sampling_payload(params), sampling_seed=int(seed)),
            "return_logprob": True, "logprob_start_len": -1}


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
                      seeds: Sequence[int] | None = None) -> list[dict]:
    """The /generate bodies of one ``generate`` call, in order (seeds as in ``request_seeds``)."""
    return [generate_payload(p, params, seed=seed)
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


def parse_generate(out, prompt: list[int], index: int) -> Sample:
    """A Sample from one /generate response; ServerError (not retryable) for a malformed one."""
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
    return Sample(prompt_ids=list(prompt), response_ids=ids, rollout_logprobs=logprobs, finish_reason=_FINISH[kind],
                  weight_version=parse_version(meta.get("weight_version")), index=index)
