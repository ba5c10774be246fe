"""The rollout engine contract: what the trainer and the weight sync may call on any engine.

Owns the :class:`RolloutEngine` protocol (its docstring states the semantics every engine keeps) and what the
engines share: ``iter_named_tensors`` and the prompt and seed validators. It imports no engine: the
implementations are ``rollout/local.py`` and ``rollout/sglang/``, the factory ``build_engine`` is in
``rollout/__init__.py``.

Example:
    engine = LocalEngine(cfg.model, seed=cfg.seed)          # or SGLangEngine.from_config(cfg)
    samples = engine.generate(prompts, params, seeds=[mix_seed(step, i) for i in range(len(prompts))])
    engine.pause(); engine.update_weights(hf_named_tensors(), version=step + 1); engine.resume()
    assert engine.health()["weight_version"] == step + 1
    engine.close()

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Union

import torch

from megatron_entcov.rollout.types import Sample, SamplingParams

__all__ = ["NamedTensors", "RolloutEngine", "iter_named_tensors", "validate_prompts",
           "validate_seeds"]

NamedTensors = Union[Iterable[tuple[str, torch.Tensor]], Iterable[list[tuple[str, torch.Tensor]]],
                     Mapping[str, torch.Tensor]]
"""What update_weights accepts: (name, tensor) pairs, buckets (lists of pairs), or a name -> tensor mapping."""


class RolloutEngine(abc.ABC):
    """Generates responses with log-probs and receives new weights.

    Subclasses implement the seven required members. The optional capabilities (``probe``, ``server_stats``,
    ``release_memory`` / ``resume_memory``) have defaults that are right for an engine without servers, so
    callers use them on any engine without ``hasattr`` checks.

    Semantics every engine keeps:
    - ``generate`` returns one :class:`Sample` per prompt entry, in the order given (``Sample.index`` is the
      position); a caller wanting n responses per prompt repeats the prompt n times. Token ids in, token ids
      and log-probs out: no re-tokenisation. Log-probs as defined in ``rollout/types.py`` (temperature-scaled,
      full vocabulary, before top-p/top-k).
    - ``generate(prompts, params, seeds=[...])`` gives each prompt entry its own seed (one integer >= 0 per
      entry; ``validate_seeds``): entry i's randomness is then a function of ``seeds[i]`` (and the weights)
      only, not of the other entries, their order, the batching or which replica/engine generates them (up to
      float rounding of batched kernels). The same seed on the same prompt repeats the same sample: callers
      give repeated prompts different seeds (e.g. ``mix_seed(step, prompt_id, k)``). ``params.seed`` is then
      not used. ``seeds=None`` keeps the per-call randomness: from ``params.seed`` when set, else from the
      engine seed and its call counter.
    - ``update_weights`` takes Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``), full
      (unsharded) tensors with the UNPADDED vocabulary, as an iterable of ``(name, tensor)`` pairs or of
      buckets (lists of pairs), possibly a generator that gathers tensors lazily. One call is one sync: when it
      returns, the new weights are live and ``weight_version == version``. Unknown names or wrong shapes raise
      ValueError naming the tensor. Callers serialise syncs with generation (pause, update, resume); engines
      must not mix weight versions within one sample.
    - ``pause`` stops generation: in-flight responses end with finish_reason 'abort' (partial, log-probs
      valid) and ``generate`` raises RuntimeError until ``resume``. Both are idempotent.
    - ``health`` returns at least ``{"ok": bool, "weight_version": int}``; it never raises for an unhealthy
      engine.
    - ``close`` releases the engine (servers, memory); any later call but ``close`` and ``health`` may raise.
    """

    # ---------------------------------------------------------------- required

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        """One Sample per prompt entry (token ids, no padding), in order.

        Args:
            prompts: token ids per entry; a prompt wanting n responses is repeated n times.
            params: sampling parameters for every entry.
            seeds: None, or one integer >= 0 per prompt entry (check with ``validate_seeds``): entry i's
                sample is then a function of (prompt i, seeds[i], weights) only, whatever the batching, order
                or split of the entries between calls, engines or replicas; ``params.seed`` is not used. None =
                per-call randomness from ``params.seed`` (else the engine's seed and call counter), as before.
        """

    @abc.abstractmethod
    def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load HF-named full tensors (pairs or buckets); afterwards weight_version == version."""

    @abc.abstractmethod
    def pause(self) -> None:
        """Stop generating: in-flight responses end with 'abort'; generate raises until resume()."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Allow generation again."""

    @abc.abstractmethod
    def health(self) -> dict:
        """{"ok": bool, "weight_version": int, ...engine-specific keys}."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights that generate() uses now (0 = initial weights)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; idempotent."""

    # ---------------------------------------------------------------- optional capabilities

    def probe(self, prompt: list[int], params: SamplingParams) -> list[tuple[str, Sample]]:
        """One response to ``prompt`` from every generating unit, as ``[(name, sample)]``: the post-sync
        check (weights/probe.py) compares each one's log-probs with the trainer's. Default: one ``generate``
        call, named 'embedded' (an engine without servers has one unit)."""
        return [("embedded", self.generate([prompt], params)[0])]

    def server_stats(self) -> list[dict]:
        """Cumulative per-server counters, cheap (no I/O): dicts with name, url, state, generated_tokens,
        requests, restarts. Default: [] (no servers)."""
        return []

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated GPU engines give their accelerator memory to the trainer between rollouts; generate
        raises until resume_memory(). Default: nothing to release."""

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back what release_memory gave (weights before a sync, the rest after). Default: nothing."""


def _is_pair(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def iter_named_tensors(named_tensors: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Flatten pairs, buckets (lists/tuples of pairs) or a mapping into (name, tensor) pairs, lazily.

    Raises TypeError for anything else, naming the offending item's position and type.
    """
    if isinstance(named_tensors, Mapping):
        yield from named_tensors.items()
        return
    for i, item in enumerate(named_tensors):
        if _is_pair(item):
            yield item
        elif isinstance(item, (list, tuple)) and all(_is_pair(p) for p in item):
            yield from item
        else:
            raise TypeError(f"update_weights: item {i} is a {type(item).__name__}; expected a (name, tensor) "
                            "pair or a bucket (list of such pairs)")


def validate_prompts(prompts, params: SamplingParams, model_cfg) -> list[list[int]]:
    """Prompts as lists of int token ids, checked against the vocabulary and the context length (ValueError
    naming the prompt otherwise). Shared by every engine."""
    vocab = model_cfg.vocab_size
    max_len = model_cfg.max_position_embeddings - params.max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        try:
            p = [operator.index(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
        except TypeError as err:
            raise ValueError(f"generate: prompt {i} is not a sequence of integer token ids ({err})") from None
        if not p:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab}) "
                             f"(min {min(p)}, max {max(p)})")
        if len(p) > max_len:
            raise ValueError(f"generate: prompt {i} has {len(p)} tokens; with max_new_tokens="
                             f"{params.max_new_tokens} at most {max_len} fit in "
                             f"max_position_embeddings={model_cfg.max_position_embeddings}")
        out.append(p)
    return out


def validate_seeds(seeds, num_prompts: int) -> list[int] | None:
    """``generate``'s per-entry ``seeds`` as a list of ints (None stays None): one integer >= 0 per prompt
    entry, else ValueError naming ``seeds``, the bad entry and the fix. Shared by every engine."""
    if seeds is None:
        return None
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes, Mapping)) or not isinstance(seeds, Iterable):
        raise ValueError(f"generate: seeds is a {type(seeds).__name__}; pass a sequence of integers >= 0, one per "
                         "prompt entry, or seeds=None")
    seeds = list(seeds)
    if len(seeds) != num_prompts:
        raise ValueError(f"generate: seeds has {len(seeds)} entries for {num_prompts} prompt entries; pass exactly "
                         "one seed per prompt entry (a repeated prompt needs its own seed per repeat), or "
                         "seeds=None")
    out = []
    for i, s in enumerate(seeds):
        if isinstance(s, torch.Tensor) and s.numel() == 1 and not s.is_floating_point():
            s = s.item()
        try:
            v = None if isinstance(s, bool) else operator.index(s)
        except TypeError:
            v = None
        if v is None or v < 0:
            raise ValueError(f"generate: seeds[{i}]={s!r} is invalid: every seed must be an integer >= 0 "
                             "(e.g. rollout.types.mix_seed(step, prompt_id, k), which is always >= 0)")
        out.append(v)
    return out
