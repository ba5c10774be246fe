"""The embedded rollout engine: a Hugging Face copy of the policy that generates in the trainer's own process.

:class:`LocalEngine` implements ``RolloutEngine`` for any tensor/pipeline layout (it loads the full HF-named
tensors of the weight sync): KV cache, length-sorted left-padded batches, finished rows dropped; it never touches
``torch.distributed`` or the training state. Sampling is Gumbel-max (``sample_tokens``); with per-entry seeds,
entry i's noise at position t comes from ``mix_seed(seeds[i], weight_version, t)`` only, whatever its batch.
The cost: one full, unsharded copy of the model per generating process (CPU quickstart, tiny models).

Example:
    engine = LocalEngine(cfg.model, seed=cfg.seed)
    engine.update_weights(hf_named_tensors, version=0)       # pairs or buckets, HF names, full tensors
    samples = engine.generate([[1, 5, 7], [1, 5, 7], [1, 9]], SamplingParams(max_new_tokens=16), seeds=[3, 4, 5])
    engine.pause(); engine.update_weights(new_tensors, version=1); engine.resume(); engine.close()

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.config.dtypes import dtype_name, torch_dtype
from megatron_entcov.rollout.engine import (
    NamedTensors,
    RolloutEngine,
    iter_named_tensors,
    validate_prompts,
    validate_seeds,
)
from megatron_entcov.rollout.expert_names import checkpoint_named_views
from megatron_entcov.rollout.types import Sample, SamplingParams, mix_seed

__all__ = ["LocalEngine", "sample_tokens", "truncate_logits"]

logger = logging.getLogger(__name__)


def truncate_logits(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then top-p (on the top-k renormalised distribution), as -inf outside the kept set.

    Args:
        logits: [B, V] float (already temperature-scaled).
        top_k: keep exactly the k largest (ties broken by sort order); -1 = off.
        top_p: keep the most likely tokens whose cumulative probability first reaches top_p (the most likely
            token is always kept); 1 = off.
    Returns:
        [B, V], a new tensor, or ``logits`` itself when nothing is truncated.
    """
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        remove[:, top_k:] = True
    if top_p < 1.0:
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs      # mass of the strictly more likely tokens
        remove |= mass_before >= top_p                  # position 0 has mass_before 0 < top_p: always kept
    kept = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, sorted_idx, kept)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None, *,
                  row_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return its rollout log-prob.

    Args:
        logits: [B, V] raw logits of the full (unpadded) vocabulary, any float dtype.
        params: temperature, top_k, top_p are used.
        generator: source of randomness (on logits' device); None = torch's global generator (or a fresh one
            with ``row_seeds``).
        row_seeds: None, or one seed per row: row r's noise is then drawn from ``generator`` reseeded with
            ``row_seeds[r]`` (its state is overwritten), so each row's token is a function of its own logits and
            seed only, whatever the other rows are.
    Returns:
        tokens [B] int64 and logprobs [B] float32 = log_softmax(logits / temperature)[token] over the full
        vocabulary, BEFORE top-k/top-p truncation (the trainer's recomputation; see rollout/types.py).
    """
    if row_seeds is not None and len(row_seeds) != logits.shape[0]:
        raise ValueError(f"sample_tokens: {len(row_seeds)} row_seeds for {logits.shape[0]} rows; pass one per row")
    scaled = logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    if params.top_k == 1:
        tokens = scaled.argmax(dim=-1)                  # greedy: no randomness consumed
    else:
        candidates = truncate_logits(scaled, params.top_k, params.top_p)
        # Gumbel-max: argmax(z + G) with G = -log(-log U) is a draw from softmax(z); -inf stays excluded.
        # U is kept inside (0, 1) so that G is finite.
        if row_seeds is None:
            u = torch.rand(candidates.shape, generator=generator, device=candidates.device)
        else:
            if generator is None:
                generator = torch.Generator(device=candidates.device)
            vocab = candidates.shape[-1]
            u = torch.empty_like(candidates)
            for r, seed in enumerate(row_seeds):    # the same draw as torch.rand(V) from a fresh generator
                generator.manual_seed(seed)
                u[r] = torch.rand(vocab, generator=generator, device=candidates.device)
        u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
        tokens = (candidates - torch.log(-torch.log(u))).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The prefill inputs of a batch of prompts: input_ids, attention_mask, position_ids [B, width] and the RoPE
    position of each row's next token [B].

    Left padding: every row's last prompt token sits in the last column, so one decode step appends one column
    for all rows. Pad positions get token 0 and mask 0; they are never attended to. Positions are counted from
    the mask, so padding does not shift them.
    """
    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
    attention_mask = torch.arange(width)[None, :] >= (width - lens)[:, None]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device), lens.to(device)


class LocalEngine(RolloutEngine):
    """Embedded rollout engine on a Hugging Face copy of the policy (docs/design/rollout.md). Thread-safe:
    generate and update_weights hold one lock; pause() may be called from another thread to abort a running
    generate."""

    def __init__(self, model_cfg: ModelConfig, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str = torch.float32, max_batch_size: int = 64, seed: int = 0,
                 attn_implementation: str = "sdpa") -> None:
        """
        Args:
            model_cfg: the policy's architecture (vocab_size is the unpadded tokenizer vocabulary).
            device: where the copy lives and generates.
            dtype: parameter dtype of the copy (torch dtype or 'float32'/'bfloat16'/'float16'); log-probs are
                always computed in float32 from the logits.
            max_batch_size: most sequences decoded together (bounds KV-cache memory).
            seed: engine seed: random initial weights, and sampling when params.seed is None.
            attn_implementation: transformers attention backend ('sdpa' or 'eager').
        """
        from transformers import AutoModelForCausalLM

        from megatron_entcov.config.hf import to_hf_config

        dtype = torch_dtype(dtype, field="LocalEngine dtype")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"LocalEngine max_batch_size={max_batch_size!r} is invalid: must be an integer >= 1")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"LocalEngine seed={seed!r} is invalid: must be an integer >= 0")
        self.model_cfg = model_cfg
        self.device = device if isinstance(device, torch.device) else torch.device(device)   # keep ps.device itself
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.seed = seed
        hf_cfg = to_hf_config(model_cfg, torch_dtype=dtype_name(dtype))
        # Random init drawn from `seed` on the CPU RNG, without disturbing the caller's RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=attn_implementation)
        self._model = model.to(self.device).eval().requires_grad_(False)
        # named_parameters() lists a tied lm_head once, under model.embed_tokens.weight; fused MoE experts are
        # addressed by their per-expert checkpoint names (the names the weight sync sends).
        self._params = checkpoint_named_views(dict(self._model.named_parameters()))
        self._tied = bool(model_cfg.tie_word_embeddings)
        self._unset = set(self._params)     # parameters not yet set by update_weights
        self._weight_version = 0
        self._calls = 0
        self._generated_tokens = 0
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._closed = False
        n_params = sum(p.numel() for p in self._params.values())
        logger.info("LocalEngine: %s (%.2fM params, %s, %s), max_batch_size=%d, seed=%d, attention=%s",
                    type(model).__name__, n_params / 1e6, dtype_name(dtype), self.device, max_batch_size, seed,
                    attn_implementation)

    # ------------------------------------------------------------------------------------------------ state

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def model(self):
        """The Hugging Face model (read-only use: tests, evaluation)."""
        self._check_open()
        return self._model

    def pause(self) -> None:
        """Running generate() ends its unfinished responses with 'abort'; new calls raise until resume()."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def health(self) -> dict:
        return {"ok": not self._closed, "weight_version": self._weight_version, "engine": "local",
                "paused": self._paused.is_set(), "device": str(self.device), "num_calls": self._calls,
                "num_generated_tokens": self._generated_tokens, "weights_complete": not self._unset}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._model = None
            self._params = {}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LocalEngine is closed")

    # ------------------------------------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Copy HF-named full tensors into the model, then set ``weight_version = version``.

        Accepts (name, tensor) pairs, buckets (lists of pairs) or a mapping, lazily (a generator that gathers one
        tensor at a time is consumed as it goes). Tensors may be of any dtype/device; they are converted.

        Checks: an unknown name, a wrong shape or a non-tensor raises ValueError/TypeError naming the tensor, the
        version is then not changed, and tensors before it in the same call stay loaded. The error is raised
        only after the iterable is exhausted (nothing more is loaded): the producer may be a generator that runs
        gather collectives with other ranks, which would hang if this rank stopped consuming it. With tied
        embeddings, ``lm_head.weight`` is shape-checked and ignored (``model.embed_tokens.weight`` is the shared
        tensor), as SGLang does. At the end of each call every parameter must have been set at least once since
        construction: the first sync must be complete, later ones may be partial; otherwise ValueError names the
        missing tensors.
        """
        self._check_open()
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"update_weights: version={version!r} is invalid: must be an integer >= 0")
        with self._lock, torch.no_grad():
            self._check_open()
            n_loaded, error, n_errors = 0, None, 0
            for name, tensor in iter_named_tensors(named_tensors):
                if error is not None:           # drain: keep a collective producer going, load nothing
                    n_errors += 1
                    continue
                try:
                    param = self._target(name, tensor)
                except (TypeError, ValueError) as err:
                    error, n_errors = err, 1
                    continue
                if param is not None:
                    param.copy_(tensor)
                    self._unset.discard(name)
                    n_loaded += 1
            if error is not None:
                if n_errors > 1:
                    error.args = (f"{error.args[0]} (and {n_errors - 1} more tensors after it were not loaded)",)
                raise error
            if self._unset:
                missing = sorted(self._unset)
                raise ValueError(f"update_weights(version={version}): {len(missing)} parameters have never been set "
                                 f"since the engine was built, e.g. {missing[:4]}; the first sync must send every "
                                 "tensor")
            self._weight_version = version
        logger.debug("LocalEngine: loaded %d tensors, weight_version=%d", n_loaded, version)

    def _target(self, name: str, tensor) -> torch.Tensor | None:
        """The parameter ``name`` loads into (None: accepted and ignored); raises for a bad name/shape/type."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}; expected a tensor")
        param = self._params.get(name)
        if param is None and self._tied and name == "lm_head.weight":
            self._check_shape(name, tensor, self._params["model.embed_tokens.weight"])
            return None
        if param is None:
            raise ValueError(f"update_weights: unknown tensor {name!r}; expected Hugging Face names of "
                             f"{type(self._model).__name__}, e.g. {next(iter(self._params))!r} "
                             f"({len(self._params)} parameters)")
        self._check_shape(name, tensor, param)
        return param

    def _check_shape(self, name: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
        if tuple(tensor.shape) == tuple(param.shape):
            return
        hint = ""
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            hint = f" (full vocabulary, UNPADDED: {self.model_cfg.vocab_size} rows)"
        raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}; expected "
                         f"{tuple(param.shape)}{hint}, the full unsharded tensor")

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        """One Sample per prompt entry, in order (``Sample.index`` = position in ``prompts``).

        Args:
            prompts: token ids per entry (no padding, at least one token, ids in [0, vocab_size)); a prompt wanting
                n responses is repeated n times. len(prompt) + max_new_tokens must not exceed
                model_cfg.max_position_embeddings.
            params: sampling parameters for every entry.
            seeds: None, or one integer >= 0 per entry: entry i's noise at response position t then comes from
                ``mix_seed(seeds[i], weight_version, t)`` only (docs/design/rollout.md, Determinism), and
                ``params.seed`` is not used. None = one generator per call (params.seed, else the call counter).
        Raises:
            ValueError for a bad prompt (naming its index) or bad seeds, RuntimeError when paused or closed.
        """
        self._check_open()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params is a {type(params).__name__}; expected SamplingParams")
        prompts = validate_prompts(prompts, params, self.model_cfg)
        seeds = validate_seeds(seeds, len(prompts))
        if self._paused.is_set():
            raise RuntimeError("generate: the engine is paused; call resume() first")
        if not prompts:
            return []
        with self._lock, torch.inference_mode():
            self._check_open()
            version = self._weight_version
            generator = torch.Generator(device=self.device)
            # Per-entry seeds: the generator is reseeded per row and step (_generate_batch). Else an explicit
            # params.seed makes the call a pure function of (seed, weights, prompts): a resumed run repeats it
            # exactly. Without one, successive calls differ through the call counter.
            if seeds is None:
                generator.manual_seed(mix_seed(self.seed, version, self._calls) if params.seed is None
                                      else mix_seed(params.seed, version))
            self._calls += 1
            # Similar lengths together: less padding. The stable sort keeps the batching deterministic.
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            samples: list[Sample | None] = [None] * len(prompts)
            for start in range(0, len(order), self.max_batch_size):
                idx = order[start:start + self.max_batch_size]
                results = self._generate_batch([prompts[i] for i in idx], params, generator,
                                               None if seeds is None else [seeds[i] for i in idx], version)
                for i, (response, logprobs, reason) in zip(idx, results):
                    samples[i] = Sample(prompt_ids=list(prompts[i]), response_ids=response,
                                        rollout_logprobs=logprobs, finish_reason=reason, weight_version=version,
                                        index=i)
                    self._generated_tokens += len(response)
        return samples

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Logits [B, V] of the last position, in float32."""
        out = self._model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator,
                        seeds: list[int] | None = None,
                        version: int = 0) -> list[tuple[list[int], list[float], str]]:
        """``seeds``: per-row seeds (aligned with ``prompts``), or None for the call's ``generator`` state."""
        from transformers import DynamicCache

        dev = self.device
        batch = len(prompts)
        input_ids, attention_mask, position_ids, next_pos = _left_pad(prompts, dev)
        max_new = params.max_new_tokens
        out_tokens = torch.zeros(batch, max_new, dtype=torch.long, device=dev)
        out_logprobs = torch.zeros(batch, max_new, dtype=torch.float32, device=dev)
        lengths = [max_new] * batch
        reasons = ["length"] * batch
        rows = torch.arange(batch, device=dev)          # original row of each still-active row
        active_seeds = None if seeds is None else list(seeds)      # the seed of each still-active row
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=dev)

        if self._paused.is_set():
            return [([], [], "abort") for _ in range(batch)]
        cache = DynamicCache(config=self._model.config)
        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        for step in range(max_new):
            if self._paused.is_set():                   # pause() from another thread: abort the rest
                for r in rows.tolist():
                    lengths[r], reasons[r] = step, "abort"
                break
            row_seeds = None
            if active_seeds is not None and params.top_k != 1:    # greedy draws no noise: skip the hashing
                row_seeds = [mix_seed(seed, version, step) for seed in active_seeds]
            tokens, logprobs = sample_tokens(logits, params, generator, row_seeds=row_seeds)
            out_tokens[rows, step] = tokens
            out_logprobs[rows, step] = logprobs
            if stop_ids.numel():
                stopped = torch.isin(tokens, stop_ids)
                if bool(stopped.any()):                 # one host sync per step; needed to shrink the batch
                    for r in rows[stopped].tolist():
                        lengths[r], reasons[r] = step + 1, "stop"
                    keep = (~stopped).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        break
                    # Drop finished rows from the cache and the batch: they cost nothing from here on.
                    cache.batch_select_indices(keep)
                    rows, tokens = rows[keep], tokens[keep]
                    if active_seeds is not None:
                        active_seeds = [active_seeds[k] for k in keep.tolist()]
                    attention_mask, next_pos = attention_mask[keep], next_pos[keep]
            if step == max_new - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            logits = self._forward(tokens[:, None], attention_mask, next_pos[:, None], cache)
            next_pos = next_pos + 1

        token_lists, logprob_lists = out_tokens.tolist(), out_logprobs.tolist()
        return [(token_lists[r][:lengths[r]], logprob_lists[r][:lengths[r]], reasons[r]) for r in range(batch)]
