"""Run configuration: nested dataclasses, YAML loading, ``--set`` overrides, validation, resolved dump.

One ``@dataclass(kw_only=True)`` per component, nested in :class:`RunConfig`. A YAML file is a sparse
override of the defaults; unknown keys, wrong types and out-of-range values raise ``ValueError`` naming the
field (as a dotted path), the value and the fix; a float field must be finite (``.inf``/``nan`` fail). With
``model.hf_dir`` set, the architecture fields of ``model`` the config does not set are taken from that directory's
config.json and the ones it sets are checked against it (:func:`config_from_dict`). Checks that need the world size
(parallel layout) live in :meth:`RunConfig.resolve`.

Example:
    cfg = load_config("configs/quickstart.yaml", overrides=["loss.name=kl_cov", "optim.lr=1e-5"])
    cfg.resolve(world_size=4)
    dump_config(cfg, run_dir / "resolved_config.yaml")
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "RolloutConfig",
    "SGLangConfig",
    "WeightSyncConfig",
    "SamplingConfig",
    "ScheduleConfig",
    "LossConfig",
    "OptimConfig",
    "DataConfig",
    "CheckpointConfig",
    "MetricsConfig",
    "SFTConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "dump_config",
    "source_revision",
    "server_tp",
    "MOVED_KEYS",
]


# --------------------------------------------------------------------------------------------------
# Validation helpers: every message names the field, the value and the fix.
# --------------------------------------------------------------------------------------------------


def _fail(field_name: str, value: Any, fix: str) -> None:
    raise ValueError(f"{field_name}={value!r} is invalid: {fix}")


def _check_positive(field_name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        _fail(field_name, value, f"must be {'>= 0' if allow_zero else '> 0'}")


def _check_range(field_name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above or (isinstance(value, float) and math.isnan(value)):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        _fail(field_name, value, f"must lie in {lb}{lo}, {hi}{rb}")


def _check_choice(field_name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(field_name, value, f"choose one of {', '.join(repr(c) for c in choices)}")


SYNC_PROBE_PROMPT_LEN = 8
"""Tokens in the post-sync probe's prompt (weights/probe.py)."""

# --------------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelConfig:
    """A Qwen2/Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA) built as a Megatron-Core GPTModel."""

    num_layers: int = 2
    """Number of transformer layers; divisible by pipeline size (times virtual pipeline size)."""
    hidden_size: int = 64
    """Model width; divisible by num_attention_heads."""
    ffn_hidden_size: int = 128
    """Width of the SwiGLU MLP (the size of gate and of up, each)."""
    num_attention_heads: int = 4
    """Query heads; divisible by tensor-parallel size."""
    num_query_groups: int = 2
    """Key/value heads (GQA); divides num_attention_heads and is divisible by tensor-parallel size."""
    kv_channels: int | None = None
    """Per-head dimension; None means hidden_size // num_attention_heads."""
    vocab_size: int = 128
    """Tokenizer vocabulary size (unpadded). Derived padding: see padded_vocab_size()."""
    make_vocab_size_divisible_by: int = 128
    """The embedding rows are padded to a multiple of this times the tensor-parallel size (Megatron rule)."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + response) the model is run on, in tokens."""
    rotary_base: float = 10000.0
    """RoPE base (theta); Qwen2.5 uses 1e6, Llama-3 5e5."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection (True for Qwen2/Qwen2.5, False for Llama)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer (Qwen2.5 <= 3B: True; 7B+: False; Llama-3 8B: False)."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter and activation dtype; float32 on CPU, bfloat16 on GPU. float16 describes converted checkpoints
    only: a run rejects it (training has no loss scaling)."""
    init_method_std: float = 0.02
    """Standard deviation of the random initialisation (ignored when weights are loaded)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: 'auto' uses Transformer Engine when importable and a GPU is present, else the local spec."""
    hf_dir: str | None = None
    """Hugging Face model directory (config, tokenizer, weights) the run starts from; None = random init. Its
    config.json gives the architecture fields above that the config leaves out; those it sets must agree
    (max_position_embeddings may be smaller)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.kv_channels is not None:
            _check_positive("model.kv_channels", self.kv_channels)
        elif self.hidden_size % self.num_attention_heads:
            _fail("model.hidden_size", self.hidden_size,
                  f"must be divisible by model.num_attention_heads={self.num_attention_heads}, or set kv_channels")
        if self.num_attention_heads % self.num_query_groups:
            _fail("model.num_query_groups", self.num_query_groups,
                  f"must divide model.num_attention_heads={self.num_attention_heads}")
        _check_positive("model.rotary_base", self.rotary_base)
        _check_range("model.norm_epsilon", self.norm_epsilon, 0.0, 1.0, lo_open=True)
        _check_choice("model.params_dtype", self.params_dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model.transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        _check_positive("model.init_method_std", self.init_method_std)

    def padded_vocab_size(self, tp_size: int) -> int:
        """Derived: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp_size."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron model-parallel layout. Data-parallel size is derived: world // (tp * pp * cp)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (tp): splits heads, MLP and vocabulary."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (pp): splits layers into stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage (interleaved schedule); None = not interleaved."""
    context_parallel_size: int = 1
    """Context-parallel size (cp); only 1 is supported by the trainer today."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: 'auto' picks nccl when CUDA is available, else gloo."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer; Adam only)."""
    data_parallel_size: int = 0
    """Derived: world_size // (tp * pp * cp), set by RunConfig.resolve()."""

    def __post_init__(self) -> None:
        _check_positive("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        _check_positive("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        _check_positive("parallel.context_parallel_size", self.context_parallel_size)
        if self.context_parallel_size != 1:
            _fail("parallel.context_parallel_size", self.context_parallel_size, "only 1 is supported; set it to 1")
        if self.virtual_pipeline_model_parallel_size is not None:
            _check_positive("parallel.virtual_pipeline_model_parallel_size",
                            self.virtual_pipeline_model_parallel_size)
            if self.pipeline_model_parallel_size < 2:
                _fail("parallel.virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size,
                      "needs parallel.pipeline_model_parallel_size >= 2; set it to null")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            _fail("parallel.sequence_parallel", True, "needs parallel.tensor_model_parallel_size > 1; set false")
        _check_choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


def server_tp(server_args: list[str] | tuple[str, ...]) -> int:
    """GPUs per launched SGLang server: the ``--tp-size`` (or ``--tp``) in its launch flags; 1 when absent.

    Raises ValueError naming ``rollout.sglang.server_args`` when the value is not a positive integer."""
    args = list(server_args)
    value = None
    for i, a in enumerate(args):
        if a in ("--tp-size", "--tp") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(("--tp-size=", "--tp=")):
            value = a.split("=", 1)[1]
        else:
            continue
        break
    if value is None:
        return 1
    try:
        tp = int(value)
    except ValueError:
        tp = 0
    if tp < 1:
        _fail("rollout.sglang.server_args", args, f"its --tp-size {value!r} must be a positive integer")
    return tp


@dataclass(kw_only=True)
class SGLangConfig:
    """The SGLang rollout engine (rollout.engine=sglang): where its servers are, how they are launched and
    reached, and how the weights travel to them (docs/sglang.md)."""

    server_urls: list[str] = field(default_factory=list)
    """URLs of running servers, split between data-parallel replicas (replica r gets every dp-th from r);
    empty = each replica launches num_servers locally (or uses router_url's workers)."""
    router_url: str = ""
    """An sglang-router in front of the servers; generation goes through it, weight syncs go to its workers
    (server_urls, else the router's /workers). dp=1 only."""
    num_servers: int = 1
    """Servers each replica launches when server_urls is empty."""
    request_timeout_s: float = 600.0
    """Time-out of one generate request, in seconds; a timed-out request is retried on another server."""
    server_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of launched servers; 'auto' = cuda when this process sees a GPU, else cpu."""
    server_args: list[str] = field(default_factory=list)
    """More sglang.launch_server flags for launched servers, e.g. ["--tp-size", "2", "--mem-fraction-static",
    "0.4"]."""
    max_total_tokens: int = 0
    """KV-cache tokens per launched server; 0 = 4096 on CPU, SGLang's own choice on GPU."""
    max_inflight: int = 64
    """Most generate requests in flight over one replica's servers."""
    max_server_restarts: int = 2
    """Restarts of a launched server that dies (it rejoins after the next weight sync); 0 = off."""
    release_memory: bool = False
    """Colocated GPU servers: release their GPU memory while the trainer trains and resume it around the
    weight sync (launches with --enable-memory-saver; needs CUDA)."""
    sync_method: Literal["disk", "distributed", "tensor"] = "disk"
    """Weight transport: 'disk' (safetensors + update_weights_from_disk; any topology), 'distributed'
    (gloo/NCCL broadcast group; servers on other nodes), 'tensor' (serialized tensors; colocated)."""
    sync_master_addr: str = ""
    """sync_method='distributed': the address of this (the generating) process that the servers connect to
    when the weight-update group forms, an IP address or host name without port. '' = chosen then: 127.0.0.1
    when every server is on this host, else the local address of the route to the servers' host (never a
    loopback address: a loopback value with servers on another host is replaced, with a warning). Set it when
    the servers reach this host at another address (e.g. another network)."""

    def __post_init__(self) -> None:
        _check_positive("rollout.sglang.num_servers", self.num_servers)
        _check_positive("rollout.sglang.request_timeout_s", self.request_timeout_s)
        _check_choice("rollout.sglang.server_device", self.server_device, ("auto", "cpu", "cuda"))
        _check_positive("rollout.sglang.max_total_tokens", self.max_total_tokens, allow_zero=True)
        _check_positive("rollout.sglang.max_inflight", self.max_inflight)
        _check_positive("rollout.sglang.max_server_restarts", self.max_server_restarts, allow_zero=True)
        _check_choice("rollout.sglang.sync_method", self.sync_method, ("disk", "distributed", "tensor"))
        if self.sync_master_addr:
            addr = str(self.sync_master_addr)
            if any(c.isspace() or c in "/@[]" for c in addr) or "://" in addr or addr.count(":") == 1:
                _fail("rollout.sglang.sync_master_addr", self.sync_master_addr,
                      "must be an IP address or host name of this machine, without scheme or port, e.g. 10.0.0.5 "
                      "(or '' to choose it from the route to the servers)")
            if self.sync_method != "distributed":
                _fail("rollout.sglang.sync_master_addr", self.sync_master_addr,
                      f"applies to rollout.sglang.sync_method=distributed (got {self.sync_method!r}); unset it "
                      "(rollout.sglang.sync_master_addr='')")
        for i, arg in enumerate(self.server_args):
            if not isinstance(arg, str):
                _fail(f"rollout.sglang.server_args[{i}]", arg, "must be a string (one command-line token)")
        server_tp(self.server_args)
        if self.router_url and not str(self.router_url).startswith(("http://", "https://")):
            _fail("rollout.sglang.router_url", self.router_url,
                  "must be an http(s):// URL, e.g. http://router-node:30000")
        for i, url in enumerate(self.server_urls):
            if not str(url).startswith(("http://", "https://")):
                _fail(f"rollout.sglang.server_urls[{i}]", url,
                      "must be an http(s):// URL, e.g. http://rollout-node:30000")
        if self.release_memory and self.server_device == "cpu":
            _fail("rollout.sglang.release_memory", self.release_memory,
                  "needs GPU servers (SGLang's memory saver is CUDA-only); set rollout.sglang.server_device=cuda "
                  "or false")


@dataclass(kw_only=True)
class RolloutConfig:
    """Where rollouts come from and how many."""

    engine: Literal["local", "sglang"] = "local"
    """'local' = embedded engine in the trainer processes (default, CPU ok); 'sglang' = SGLang servers."""
    prompts_per_step: int = 8
    """Prompts sampled per RL step (global, over all data-parallel ranks)."""
    n_samples_per_prompt: int = 4
    """Responses per prompt (the GRPO group size)."""
    max_prompt_len: int = 64
    """Longest prompt in tokens: longer prompts in a file are skipped and counted (data/skipped_prompts); the
    arithmetic task's longest prompt must fit (checked at start)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (no signal) and refill from new prompts (DAPO)."""
    max_refill_rounds: int = 4
    """With dynamic_sampling, the most extra generation rounds per step before training on what is there."""
    overlap: bool = False
    """Generate step t+1's rollouts in a background thread while step t trains (one step off-policy: they use
    the weights from before step t's update; the sync still happens at the step boundary, after the wait).
    Logs rollout/staleness(_max) and perf/overlap_wait(s); pair it with loss.tis_cap (e.g. 2.0) to correct
    the rollout/trainer mismatch. A checkpoint stores the loader as of the experience trained, so a resumed
    run regenerates the prefetched prompts (overlap.py). Works with both engines; not with
    rollout.sglang.release_memory (colocated servers cannot generate while the trainer holds the GPU)."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """The SGLang engine's servers and weight transport (used when engine is 'sglang')."""
    sync_dir: str = ""
    """Directory the 'disk' weight transport (rollout.sglang.sync_method=disk) writes each sync's safetensors
    to, for the servers to load: an absolute path on storage the trainer and every server node mount at the
    same path (servers on other nodes cannot read the trainer's temporary directory). '' = the system
    temporary directory (servers on the trainer's node only)."""

    def __post_init__(self) -> None:
        _check_choice("rollout.engine", self.engine, ("local", "sglang"))
        for name in ("prompts_per_step", "n_samples_per_prompt", "max_prompt_len"):
            _check_positive(f"rollout.{name}", getattr(self, name))
        _check_positive("rollout.max_refill_rounds", self.max_refill_rounds, allow_zero=True)
        if self.sync_dir:
            if not str(self.sync_dir).startswith("/") or any(ord(c) < 32 for c in str(self.sync_dir)):
                _fail("rollout.sync_dir", self.sync_dir,
                      "must be an absolute path that the trainer and every server node mount at the same place, "
                      "e.g. /shared/scratch/entcov-sync (or '' for servers on the trainer's node)")
            if self.engine != "sglang" or self.sglang.sync_method != "disk":
                _fail("rollout.sync_dir", self.sync_dir,
                      f"applies to rollout.engine=sglang with rollout.sglang.sync_method=disk (got engine="
                      f"{self.engine!r}, sync_method={self.sglang.sync_method!r}); unset it (rollout.sync_dir='')")
        if self.sglang.release_memory and self.engine != "sglang":
            _fail("rollout.sglang.release_memory", self.sglang.release_memory,
                  "applies to rollout.engine=sglang only; set false")
        if self.overlap and self.sglang.release_memory:
            _fail("rollout.overlap", self.overlap,
                  "contradicts rollout.sglang.release_memory=true: colocated servers give the GPU to the trainer "
                  "while it trains, so they cannot generate the next step's rollouts meanwhile; set "
                  "rollout.overlap=false, or run the servers on GPUs of their own and set "
                  "rollout.sglang.release_memory=false")


@dataclass(kw_only=True)
class WeightSyncConfig:
    """Pushing the trainer's weights to the rollout engine after each step, and checking they arrived."""

    bucket_mb: float = 256.0
    """The most megabytes of full (gathered) tensors held and sent at once."""
    verify: Literal["probe", "version"] = "probe"
    """Check of every sync: 'version' = each server reports the trainer's weight version; 'probe' = that, and
    each server's log-probs on a fixed probe prompt match the trainer's within verify_tol (weights/probe.py)."""
    verify_tol: float = 1e-3
    """Largest |server - trainer| log-prob gap the probe accepts. float32 servers on CPU agree to ~1e-6; bf16
    GPU servers differ by up to ~0.05 per token, so raise it there (0.1 still catches a tensor not loaded)."""
    probe_tokens: int = 16
    """Tokens each server generates for the probe."""

    def __post_init__(self) -> None:
        _check_positive("weight_sync.bucket_mb", self.bucket_mb)
        _check_choice("weight_sync.verify", self.verify, ("probe", "version"))
        _check_positive("weight_sync.verify_tol", self.verify_tol)
        _check_positive("weight_sync.probe_tokens", self.probe_tokens)


@dataclass(kw_only=True)
class SamplingConfig:
    """Sampling of responses at rollout time."""

    temperature: float = 1.0
    """Softmax temperature; the trainer applies the same temperature to its logits. Released setting: 1.0."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]. Released setting: 1.0."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 = off."""
    max_new_tokens: int = 32
    """Longest response in tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response (the tokenizer's end-of-sequence id is added by the trainer)."""

    def __post_init__(self) -> None:
        _check_range("sampling.temperature", self.temperature, 0.0, 100.0, lo_open=True)
        _check_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k != -1 and self.top_k < 1:
            _fail("sampling.top_k", self.top_k, "must be -1 (off) or >= 1")
        _check_positive("sampling.max_new_tokens", self.max_new_tokens)
        for i, tok in enumerate(self.stop_token_ids):
            if not isinstance(tok, int) or tok < 0:
                _fail(f"sampling.stop_token_ids[{i}]", tok, "must be a non-negative token id")


SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Annealing of one coefficient from its base value (the LossConfig field) to ``end``.

    value(step) = base for step < start_step; then it moves from base to ``end`` over ``steps`` steps
    (linearly, along a half cosine, or geometrically) and stays at ``end``. Annealing the covariance
    controls to 0 makes them asymptotically unbiased (reference, section 5).
    """

    kind: Literal["constant", "linear", "cosine", "exponential"] = "constant"
    """Shape of the schedule; 'constant' ignores end/steps."""
    end: float = 0.0
    """Final value (same unit as the coefficient); 'exponential' needs end > 0 and base > 0."""
    steps: int = 0
    """Number of optimizer steps from start_step to reach end; > 0 unless kind is 'constant'."""
    start_step: int = 0
    """Step at which annealing begins."""

    def __post_init__(self) -> None:
        _check_choice("schedule.kind", self.kind, SCHEDULE_KINDS)
        _check_positive("schedule.steps", self.steps, allow_zero=True)
        _check_positive("schedule.start_step", self.start_step, allow_zero=True)
        _check_positive("schedule.end", self.end, allow_zero=True)
        if self.kind != "constant" and self.steps == 0:
            _fail("schedule.steps", self.steps, f"kind={self.kind!r} needs steps > 0 (or use kind='constant')")
        if self.kind == "exponential" and self.end <= 0:
            _fail("schedule.end", self.end, "kind='exponential' needs end > 0; use 'linear' or 'cosine' to reach 0")


LOSS_NAMES = ("ppo", "clip_cov", "kl_cov")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


@dataclass(kw_only=True)
class LossConfig:
    """Policy loss and entropy control (Cui et al. 2025, arXiv 2505.22617, sections 3 and 4 of the reference).

    Defaults are the released Qwen2.5-7B settings where the paper gives one.
    """

    name: Literal["ppo", "clip_cov", "kl_cov"] = "ppo"
    """'ppo' (clipped surrogate, with clip-higher/dual clip), 'clip_cov' (Clip-Cov) or 'kl_cov' (KL-Cov)."""
    clip_ratio_low: float = 0.2
    """PPO lower clip epsilon: ratio >= 1 - clip_ratio_low. Clip-Cov released setting: 1.0 (ratio in [0, 2])."""
    clip_ratio_high: float = 0.28
    """PPO upper clip epsilon (clip-higher, DAPO): ratio <= 1 + clip_ratio_high. Clip-Cov released: 1.0."""
    clip_ratio_c: float = 10.0
    """Dual-clip constant (> 1): for A < 0 the loss is capped at -A * clip_ratio_c. Released: 10."""
    clip_cov_dual_clip: bool = False
    """Clip-Cov only: also apply the dual clip (loss.clip_ratio_c) and keep dual-clipped tokens out of the
    candidates. Off = as released (the paper's code and verl's clip_cov apply no dual clip: a token with A < 0
    and ratio > clip_ratio_c keeps its gradient)."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: share r of valid tokens whose gradient is detached; chosen = max(int(r * N_valid), 1)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound omega_low (exclusive) of the candidate tokens. Released: 1."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound omega_high (exclusive) of the candidate tokens. Released: 5."""
    kl_cov_ratio: float = 2e-3
    """KL-Cov: share k of valid tokens (top by covariance) that get the |log-ratio| penalty. 7B: 2e-3, 32B: 2e-4."""
    kl_cov_coef: float = 1.0
    """KL-Cov: penalty weight beta on |log pi - log pi_old|. Released: 1."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (loss -= entropy_coef * H); 0 in the released runs. Biased: moves the optimum."""
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Group baseline (losses/advantages.py): 'grpo' (group mean, / std + eps when advantage_norm_std;
    released), 'dr_grpo' (mean only; pair with agg='seq-mean-token-sum'), 'rloo' (leave-one-out)."""
    advantage_norm_std: bool = True
    """GRPO only: divide the centred rewards by the group std + eps."""
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """Loss aggregation: mean over all valid tokens of the optimizer batch (released), or per-sequence."""
    compile_logprob_kernels: bool = False
    """torch.compile the streaming log-prob/entropy kernels (ops/vocab_parallel.py): 3-6x a memcpy and 12-18x
    faster than the naive form on CPU, vs 6-12x / 6-10x eager; costs ~15 s of compilation per process.
    Worth it for real vocabularies; off for the tiny quickstart vocabulary."""
    selection_logprobs: Literal["current", "old"] = "current"
    """Log-probs the covariance (token selection) uses on mini-batches after the first: 'current' runs one extra
    no-grad forward per mini-batch (exact, as in the paper); 'old' reuses the rollout-batch log-probs (free;
    identical on the first, fully on-policy mini-batch)."""
    clip_cov_ratio_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Annealing of clip_cov_ratio (base = clip_cov_ratio). At 0 no token is chosen."""
    kl_cov_ratio_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Annealing of kl_cov_ratio (base = kl_cov_ratio). At 0 no token is chosen."""
    kl_cov_coef_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Annealing of kl_cov_coef (base = kl_cov_coef)."""
    entropy_coef_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Annealing of entropy_coef (base = entropy_coef)."""
    tis_cap: float = 0.0
    """Truncated importance sampling (TIS) of the rollout/trainer mismatch: the policy-gradient surrogate of each
    token is weighted by w = min(exp(old_logprob - rollout_logprob), tis_cap), detached, where old_logprob is the
    trainer's recomputed log pi_old and rollout_logprob the engine's (the tokens were sampled by the engine's
    numerics, e.g. SGLang in bf16). Penalties (KL-Cov, entropy bonus) are not reweighted. 0 = off (default);
    > 0 = the cap C, e.g. 2.0. Logged as train/is_ratio_mean, train/tis_weight_mean, train/tis_clip_frac."""

    def __post_init__(self) -> None:
        _check_choice("loss.name", self.name, LOSS_NAMES)
        _check_choice("loss.agg", self.agg, AGG_MODES)
        _check_choice("loss.selection_logprobs", self.selection_logprobs, ("current", "old"))
        _check_choice("loss.advantage_estimator", self.advantage_estimator, ("grpo", "dr_grpo", "rloo"))
        _check_range("loss.clip_ratio_low", self.clip_ratio_low, 0.0, 1.0, lo_open=True)
        _check_positive("loss.clip_ratio_high", self.clip_ratio_high)
        if not self.clip_ratio_c > 1.0:
            _fail("loss.clip_ratio_c", self.clip_ratio_c, "the dual-clip constant must be > 1 (released: 10)")
        _check_range("loss.clip_cov_ratio", self.clip_cov_ratio, 0.0, 1.0, lo_open=True)
        _check_range("loss.kl_cov_ratio", self.kl_cov_ratio, 0.0, 1.0, lo_open=True)
        if not self.clip_cov_lb < self.clip_cov_ub:
            _fail("loss.clip_cov_lb", self.clip_cov_lb,
                  f"must be < loss.clip_cov_ub={self.clip_cov_ub} (released: lb=1, ub=5)")
        _check_positive("loss.kl_cov_coef", self.kl_cov_coef, allow_zero=True)
        _check_positive("loss.entropy_coef", self.entropy_coef, allow_zero=True)
        for coef in ("clip_cov_ratio", "kl_cov_ratio", "kl_cov_coef", "entropy_coef"):
            sched = getattr(self, f"{coef}_schedule")
            if sched.kind == "exponential" and getattr(self, coef) <= 0:
                _fail(f"loss.{coef}_schedule.kind", sched.kind, f"'exponential' needs loss.{coef} > 0")
            if coef.endswith("_ratio") and sched.kind != "constant" and sched.end > 1.0:
                _fail(f"loss.{coef}_schedule.end", sched.end, "a token share must lie in [0, 1]")
        if not (isinstance(self.tis_cap, (int, float)) and math.isfinite(self.tis_cap) and self.tis_cap >= 0):
            _fail("loss.tis_cap", self.tis_cap, "must be a finite number >= 0: 0 turns truncated importance "
                  "sampling off, > 0 is the cap on the weight (e.g. 2.0)")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer, learning rate and batch split of one RL step."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Megatron optimizer type."""
    lr: float = 1e-6
    """Peak learning rate. Released: 5e-7 (7B), 1e-6 (32B), constant."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up over run.steps."""
    lr_warmup_steps: int = 0
    """Linear warm-up in optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay. Released: 0."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 = off. Released: 1.0."""
    num_mini_batches: int = 1
    """Optimizer steps per rollout batch (KL-Cov needs > 1 to act). Released: 8."""
    micro_batch_size: int = 4
    """Sequences per forward/backward micro-batch on one data-parallel rank (unused when
    max_tokens_per_micro_batch > 0)."""
    max_tokens_per_micro_batch: int = 0
    """Token budget of a micro-batch: > 0 packs each rank's samples back to back into rows of at most this many
    tokens (THD packed sequences; balanced first-fit, so the number of micro-batches varies per step and rank)
    instead of micro_batch_size padded rows; 0 = off. Must hold the longest sample (rollout.max_prompt_len +
    sampling.max_new_tokens) and be a multiple of parallel.tensor_model_parallel_size."""
    max_consecutive_skipped: int = 5
    """Stop the run with an error after this many optimizer steps in a row were skipped (non-finite loss or
    gradient norm), before the step is checkpointed; 0 = never stop."""

    def __post_init__(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, ("adam", "sgd"))
        _check_choice("optim.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            _fail("optim.min_lr", self.min_lr, f"must be <= optim.lr={self.lr}")
        _check_positive("optim.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _check_range("optim.adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        _check_range("optim.adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        _check_positive("optim.adam_eps", self.adam_eps)
        _check_positive("optim.clip_grad", self.clip_grad, allow_zero=True)
        _check_positive("optim.num_mini_batches", self.num_mini_batches)
        _check_positive("optim.micro_batch_size", self.micro_batch_size)
        _check_positive("optim.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, allow_zero=True)
        _check_positive("optim.max_consecutive_skipped", self.max_consecutive_skipped, allow_zero=True)


@dataclass(kw_only=True)
class DataConfig:
    """Prompt source and verifier."""

    source: Literal["arithmetic", "countdown", "file"] = "arithmetic"
    """'arithmetic' = the synthetic verifiable task generated from a seed; 'countdown' = the generated search task
    with a scratchpad (rewards/countdown.py; SFT trains on its reference traces); 'file' = jsonl/parquet at path."""
    path: str | None = None
    """jsonl or parquet file with prompt/answer columns (e.g. DAPO-Math-17k); needed when source='file'."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or a chat message list)."""
    answer_key: str = "answer"
    """Column holding the reference answer."""
    reward: Literal["arithmetic", "countdown", "math"] = "arithmetic"
    """Verifier from the rewards registry: 'arithmetic' (exact integer), 'countdown' (the steps of a countdown
    solution, simulated) or 'math' (math-verify, boxed)."""
    reward_timeout_s: float = 5.0
    """Per-sample verifier time-out in seconds; a time-out scores 0 and is counted."""
    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template."""
    arithmetic_digits: int = 2
    """Synthetic task difficulty: operands have up to this many digits."""
    arithmetic_ops: str = "+-"
    """Synthetic task operators drawn from this string (subset of '+-*')."""
    arithmetic_operands: int = 2
    """Synthetic task difficulty: operands per problem (>= 2)."""
    countdown_numbers: int = 4
    """Countdown task: numbers given per problem, 2..6 (num_numbers - 1 steps per solution)."""
    countdown_max_number: int = 9
    """Countdown task: the given numbers are drawn from 1..this, 2..99."""
    countdown_max_value: int = 99
    """Countdown task: bound of every intermediate value of the generating path and the SFT traces (>= the
    largest number); the verifier accepts any non-negative intermediate value."""
    shuffle: bool = True
    """Shuffle the prompt order (with the top-level seed) every epoch."""
    held_out_share: float = 0.1
    """Arithmetic task: share of the problem space held out by content (a hash of the problem text, the same
    for every seed) for evaluation; SFT and RL never train on these problems."""
    held_out_rows: int = 0
    """File source: the last this many rows of data.path are held out for evaluation (never trained on);
    0 = no held-out split (evaluate on a separate file: eval.source='file')."""

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("arithmetic", "countdown", "file"))
        _check_range("data.held_out_share", self.held_out_share, 0.0, 1.0, hi_open=True)
        _check_positive("data.held_out_rows", self.held_out_rows, allow_zero=True)
        _check_choice("data.reward", self.reward, ("arithmetic", "countdown", "math"))
        if self.source == "file" and not self.path:
            _fail("data.path", self.path, "data.source='file' needs a jsonl or parquet path")
        _check_positive("data.reward_timeout_s", self.reward_timeout_s)
        _check_range("data.arithmetic_digits", self.arithmetic_digits, 1, 18)
        _check_range("data.arithmetic_operands", self.arithmetic_operands, 2, 16)
        if not self.arithmetic_ops or set(self.arithmetic_ops) - set("+-*"):
            _fail("data.arithmetic_ops", self.arithmetic_ops, "use a non-empty subset of '+-*'")
        _check_range("data.countdown_numbers", self.countdown_numbers, 2, 6)
        _check_range("data.countdown_max_number", self.countdown_max_number, 2, 99)
        if self.countdown_max_value < self.countdown_max_number:
            _fail("data.countdown_max_value", self.countdown_max_value,
                  f"use a value >= data.countdown_max_number={self.countdown_max_number}")
        if self.source == "countdown" and self.reward != "countdown":
            _fail("data.reward", self.reward, "data.source='countdown' is scored by its own verifier: set "
                  "data.reward=countdown")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and when checkpoints are written, and what a run starts from."""

    save_interval: int = 0
    """Save every this many RL steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a new one is complete."""
    load: str | None = None
    """Checkpoint directory to start from (a run's checkpoints/ dir or one step dir); None = fresh."""
    resume: bool = False
    """Continue from the latest complete checkpoint in the run directory if one exists."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint.save_interval", self.save_interval, allow_zero=True)
        _check_positive("checkpoint.keep_last", self.keep_last)


@dataclass(kw_only=True)
class MetricsConfig:
    """TensorBoard and console logging."""

    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tensorboard."""
    log_interval: int = 1
    """Console line every this many steps."""
    law_fit_min_points: int = 5
    """Fit R = -a*exp(H) + b online once this many (H, R) points exist."""
    measure_entropy_change: bool = True
    """After each step, recompute the entropy of (a subset of) the step's own tokens with the updated weights
    to log the measured entropy change beside the covariance prediction (one extra forward)."""
    entropy_change_samples: int = 0
    """Samples of the step (global; the first ones of every data-parallel replica's share) the measured entropy
    change uses; 0 = all. A subset bounds the extra forward's cost on large batches."""
    law_reward: Literal["auto", "eval", "train"] = "auto"
    """What the online R = -a*exp(H) + b fit uses as R: 'eval' = held-out eval/accuracy (as the paper fits
    downstream accuracy; needs eval.interval > 0), 'train' = every sample's training reward
    (reward/mean_all), 'auto' = eval when evaluation runs, else train."""

    histogram_tokens: int = 4096
    """Tokens per step whose covariance and entropy TensorBoard shows as histograms (cov/tokens, entropy/tokens;
    cov/chosen_tokens, entropy/chosen_tokens for the tokens Clip-Cov detached or KL-Cov penalised): a uniform
    sample of the global batch, the same for every parallel layout (token_histograms.py); 0 = no histograms.
    Nothing is sampled with metrics.tensorboard=false."""
    law_image_interval: int = 10
    """Draw the law's (H, R) points with the fitted R = -a*exp(H) + b and its ceiling as a TensorBoard image
    (law/fit) every this many steps and after the last one; 0 = never."""

    def __post_init__(self) -> None:
        _check_positive("metrics.log_interval", self.log_interval)
        _check_positive("metrics.histogram_tokens", self.histogram_tokens, allow_zero=True)
        _check_positive("metrics.law_image_interval", self.law_image_interval, allow_zero=True)
        _check_positive("metrics.entropy_change_samples", self.entropy_change_samples, allow_zero=True)
        _check_choice("metrics.law_reward", self.law_reward, ("auto", "eval", "train"))
        _check_range("metrics.law_fit_min_points", self.law_fit_min_points, 3, 10**9)


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic held-out evaluation during RL (evaluation.py): greedy accuracy, pass@k, entropy, length."""

    interval: int = 0
    """Evaluate before the first step, every this many steps and after the last; 0 = never."""
    source: Literal["held_out", "file"] = "held_out"
    """'held_out' = the data set's held-out split (data.held_out_share / data.held_out_rows: disjoint from
    training), 'file' = eval.path (same format and keys as data.path)."""
    path: str | None = None
    """jsonl or parquet evaluation file (eval.source='file')."""
    num_prompts: int = 64
    """Evaluation prompts (the first ones of the split or file)."""
    n_samples: int = 8
    """Sampled responses per prompt for pass@k (unbiased estimator from n samples), besides the greedy one."""
    temperature: float = 1.0
    """Sampling temperature of the n samples (top_p/top_k from the sampling section)."""
    pass_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """k values of eval/pass@k; each in [1, eval.n_samples]."""
    seed: int | None = None
    """Generated tasks (data.source arithmetic or countdown): the seed of the problem stream whose held-out
    problems are evaluated; null = the run's seed. Fix it to evaluate runs of different seeds on the same
    problems (the held-out split itself is by content, the same for every seed)."""

    def __post_init__(self) -> None:
        _check_positive("eval.interval", self.interval, allow_zero=True)
        _check_choice("eval.source", self.source, ("held_out", "file"))
        if self.source == "file" and not self.path:
            _fail("eval.path", self.path, "eval.source='file' needs a jsonl or parquet path")
        _check_positive("eval.num_prompts", self.num_prompts)
        _check_positive("eval.n_samples", self.n_samples)
        _check_positive("eval.temperature", self.temperature)
        if not self.pass_k:
            _fail("eval.pass_k", self.pass_k, "list at least one k, e.g. [1, 4, 8]")
        for k in self.pass_k:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_samples:
                _fail("eval.pass_k", self.pass_k, f"every k must be an integer in [1, eval.n_samples={self.n_samples}]")


@dataclass(kw_only=True)
class SFTConfig:
    """Supervised warm start on the task's reference answers (teacher forcing), before RL."""

    steps: int = 0
    """Optimizer steps of SFT; 0 = no warm start."""
    batch_size: int = 64
    """Sequences per SFT step (global, over data-parallel ranks)."""
    lr: float = 1e-3
    """SFT learning rate (Adam; after warm-up constant, or decayed to 0 by sft.lr_decay_style)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up of SFT."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: 'constant' at sft.lr, or 'linear' / 'cosine' decay to 0 at the last of sft.steps (a decayed
    run ends on an averaged, not a noisy, iterate: a better model for the same steps)."""
    eval_size: int = 64
    """Held-out prompts (the data set's held-out split, never trained on) decoded greedily at the end of SFT to
    report accuracy; 0 = skip."""

    def __post_init__(self) -> None:
        _check_positive("sft.steps", self.steps, allow_zero=True)
        _check_positive("sft.batch_size", self.batch_size)
        _check_positive("sft.lr", self.lr)
        _check_positive("sft.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_choice("sft.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        _check_positive("sft.eval_size", self.eval_size, allow_zero=True)


RUN_NAME_RULE = ("a run name is one directory name under output_dir: not empty, not '.' or '..', without '/', "
                 "'\\' or control characters, not starting with '-'")
"""The rule :attr:`RunConfig.name` follows, quoted in its error message."""


def _is_run_name(name: str) -> bool:
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and not name.startswith("-")
            and not any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name))


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: every component config plus run-level settings."""

    name: str = "run"
    """Run name, used in the run directory and logs."""
    output_dir: str = "runs"
    """Parent directory of run directories; the run writes to <output_dir>/<name>."""
    seed: int = 1234
    """Seed of model init, data order, sampling and Clip-Cov/KL-Cov selection."""
    steps: int = 10
    """RL steps (rollout batches) to run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine and batch shape."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Weight push to the rollout engine after each step, and its check."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling parameters."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy loss and entropy control."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and batch split."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and verifier."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Monitoring."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic held-out evaluation during RL."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Optional supervised warm start (megatron-entcov sft / quickstart)."""

    def __post_init__(self) -> None:
        if not _is_run_name(self.name):
            _fail("name", self.name, f"{RUN_NAME_RULE}; e.g. name=qwen2.5-7b-kl-cov")
        _check_positive("steps", self.steps)
        self.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self) -> None:
        """Cross-section checks that do not need the world size."""
        m, p = self.model, self.parallel
        if m.params_dtype == "float16":
            _fail("model.params_dtype", m.params_dtype,
                  "set model.params_dtype=bfloat16 on GPU (or float32): training in float16 needs loss scaling, which "
                  "this trainer does not do (Megatron would unscale the unscaled gradients by 2^-32); float16 stays "
                  "available for exported checkpoints (convert --dtype float16)")
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if m.num_attention_heads % tp:
            _fail("parallel.tensor_model_parallel_size", tp,
                  f"must divide model.num_attention_heads={m.num_attention_heads}")
        if m.num_query_groups % tp:
            _fail("parallel.tensor_model_parallel_size", tp,
                  f"must divide model.num_query_groups={m.num_query_groups}")
        if m.ffn_hidden_size % tp:
            _fail("parallel.tensor_model_parallel_size", tp, f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
        chunks = pp * (p.virtual_pipeline_model_parallel_size or 1)
        if m.num_layers % chunks:
            _fail("model.num_layers", m.num_layers,
                  f"must be divisible by pipeline_model_parallel_size * virtual_pipeline_model_parallel_size = {chunks}")
        if self.rollout.max_prompt_len + self.sampling.max_new_tokens > m.max_position_embeddings:
            _fail("model.max_position_embeddings", m.max_position_embeddings,
                  f"must be >= rollout.max_prompt_len + sampling.max_new_tokens = "
                  f"{self.rollout.max_prompt_len + self.sampling.max_new_tokens}")
        budget, longest = self.optim.max_tokens_per_micro_batch, self.rollout.max_prompt_len + self.sampling.max_new_tokens
        if budget and budget < longest:
            _fail("optim.max_tokens_per_micro_batch", budget,
                  f"a micro-batch must hold the longest sample, rollout.max_prompt_len + sampling.max_new_tokens = "
                  f"{longest}; set it to >= {longest} (or 0 for row micro-batches)")
        if budget and budget % tp:
            _fail("optim.max_tokens_per_micro_batch", budget,
                  f"must be a multiple of parallel.tensor_model_parallel_size={tp} (sequence parallelism splits the "
                  f"packed row); use {budget - budget % tp + tp}")
        w = self.weight_sync
        if w.verify == "probe" and SYNC_PROBE_PROMPT_LEN + w.probe_tokens > m.max_position_embeddings:
            _fail("weight_sync.probe_tokens", w.probe_tokens,
                  f"the probe ({SYNC_PROBE_PROMPT_LEN} prompt tokens + probe_tokens) must fit in "
                  f"model.max_position_embeddings={m.max_position_embeddings}; lower it")
        if self.metrics.law_reward == "eval" and not self.eval.interval:
            _fail("metrics.law_reward", "eval", "fitting the law on eval accuracy needs evaluation: set eval.interval > 0 "
                  "(or metrics.law_reward=train)")
        if self.eval.interval and self.eval.source == "held_out" and self.data.source == "file" \
                and not self.data.held_out_rows:
            _fail("eval.source", "held_out", "a data file has no held-out split unless data.held_out_rows > 0; set "
                  "data.held_out_rows=<rows> (they are then never trained on) or eval.source=file with eval.path")
        if self.eval.seed is not None and (self.eval.source != "held_out" or self.data.source == "file"):
            _fail("eval.seed", self.eval.seed, "it picks the problem stream of a generated task's held-out split "
                  f"(data.source arithmetic or countdown with eval.source=held_out; here data.source="
                  f"{self.data.source!r}, eval.source={self.eval.source!r}); set eval.seed=null")
        r, sg = self.rollout, self.rollout.sglang
        if r.engine == "sglang" and sg.server_device == "cuda" and not sg.server_urls and not sg.router_url:
            need = sg.num_servers * server_tp(sg.server_args)
            if need > tp * pp:
                _fail("rollout.sglang.num_servers", sg.num_servers,
                      f"launched GPU servers go on their replica's own GPUs: {sg.num_servers} servers x "
                      f"{server_tp(sg.server_args)} GPUs (rollout.sglang.server_args --tp-size) = {need} > the "
                      f"replica's parallel.tensor_model_parallel_size * pipeline_model_parallel_size = {tp * pp}; "
                      "launch fewer or smaller servers, or start them elsewhere (rollout.sglang.server_urls)")

    def resolve(self, world_size: int) -> "RunConfig":
        """Check the layout against the world size and fill the derived fields. Returns self."""
        p = self.parallel
        if world_size < 1:
            _fail("world_size", world_size, "must be >= 1")
        if world_size % p.model_parallel_size:
            _fail("parallel.tensor_model_parallel_size * pipeline_model_parallel_size", p.model_parallel_size,
                  f"must divide the world size {world_size}; change tp/pp or launch a multiple of "
                  f"{p.model_parallel_size} processes")
        p.data_parallel_size = world_size // p.model_parallel_size
        dp = p.data_parallel_size
        total = self.rollout.prompts_per_step * self.rollout.n_samples_per_prompt
        per_mini = total // self.optim.num_mini_batches
        if total % self.optim.num_mini_batches:
            _fail("optim.num_mini_batches", self.optim.num_mini_batches,
                  f"must divide rollout.prompts_per_step * n_samples_per_prompt = {total}")
        if self.optim.max_tokens_per_micro_batch and per_mini % dp:
            _fail("optim.num_mini_batches", self.optim.num_mini_batches,
                  f"a mini-batch of {per_mini} sequences does not split over data_parallel_size={dp}")
        if not self.optim.max_tokens_per_micro_batch and per_mini % (dp * self.optim.micro_batch_size):
            _fail("optim.micro_batch_size", self.optim.micro_batch_size,
                  f"a mini-batch of {per_mini} sequences must split evenly over data_parallel_size={dp} "
                  f"ranks of micro_batch_size sequences; choose a divisor of {per_mini // dp}"
                  if per_mini % dp == 0 else
                  f"a mini-batch of {per_mini} sequences does not split over data_parallel_size={dp}")
        if p.use_distributed_optimizer and self.optim.optimizer != "adam":
            _fail("parallel.use_distributed_optimizer", True, "the distributed optimizer supports optim.optimizer='adam' only")
        return self


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; convert int -> float where a float is expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{path}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{path}={value!r} is invalid: choose one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{path}={value!r} has the wrong type: expected a list of {_type_name(item_tp)}")
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{path}={value!r} has the wrong type: expected a mapping for {tp.__name__}")
        return _build(tp, value, path)
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where "1e-6" (no dot) is a string, not a float.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r} has the wrong type: expected a number")
        value = float(value)
        if not math.isfinite(value) and _ITEM_INDEX.sub("", path) not in NON_FINITE_FLOAT_FIELDS:
            raise ValueError(f"{path}={value!r} is invalid: must be a finite number (not inf or nan)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} has the wrong type: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} has the wrong type: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


NON_FINITE_FLOAT_FIELDS: frozenset[str] = frozenset()
"""Dotted float fields that may be inf or nan (list items without their [i]); every other float field must be
finite. None today: no field gives inf a meaning (use 0 where a field documents 0 as off)."""

_ITEM_INDEX = re.compile(r"\[\d+\]")


MOVED_KEYS = {
    **{f"rollout.{k}": f"rollout.sglang.{k}" for k in (
        "server_urls", "router_url", "num_servers", "request_timeout_s", "server_device", "server_args",
        "max_total_tokens", "max_inflight", "max_server_restarts", "release_memory", "sync_method")},
    "rollout.sync_bucket_mb": "weight_sync.bucket_mb",
    "rollout.sync_verify": "weight_sync.verify",
    "rollout.sync_verify_tol": "weight_sync.verify_tol",
    "rollout.sync_probe_tokens": "weight_sync.probe_tokens",
}
"""Old dotted key -> its new place; a config (YAML or --set) still using an old key fails naming the new one."""


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    moved = [f"{prefix}.{k}" if prefix else k for k in unknown]
    moved = [(old, MOVED_KEYS[old]) for old in moved if old in MOVED_KEYS]
    if moved:
        raise ValueError("; ".join(f"{old} moved: use {new}" for old, new in moved)
                         + " (the config sections were regrouped; see configs/README.md)")
    if unknown:
        where = prefix or "top level"
        raise ValueError(f"unknown config key(s) {', '.join(repr(k) for k in unknown)} in {where}; "
                         f"valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(path, value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # Schedules validate with a generic prefix; give them their full dotted path.
        msg = str(exc)
        if prefix and msg.startswith("schedule."):
            msg = f"{prefix}.{msg[len('schedule.'):]}"
        raise ValueError(msg) from None


def config_from_dict(data: dict | None) -> RunConfig:
    """Build a RunConfig from a (sparse) nested dict, validating every field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    return _build(RunConfig, _with_hf_model_fields(data))


def _with_hf_model_fields(data: dict) -> dict:
    """With ``model.hf_dir`` set: the architecture fields the (sparse) config leaves out come from the directory's
    config.json, and those it sets must agree with it (ValueError naming each field, both values and the fix).

    A directory that does not exist here is left to the start of the run (the Actor checks the whole
    ModelConfig: weights/hf_config.py ``check_model_matches_hf``), so a config for another machine still loads.
    """
    model = data.get("model")
    hf_dir = model.get("hf_dir") if isinstance(model, dict) else None
    if not hf_dir or not isinstance(hf_dir, str) or not Path(hf_dir).exists():
        return data
    from megatron_entcov.config.hf import hf_mismatches, read_hf_model_fields   # transformers, lazily

    hf_fields = read_hf_model_fields(hf_dir)
    hints = typing.get_type_hints(ModelConfig)
    given = {k: _coerce(f"model.{k}", model[k], hints[k]) for k in hf_fields if k in model}
    problems = hf_mismatches(given, hf_fields, Path(hf_dir) / "config.json")
    if problems:
        raise ValueError("; ".join(problems))
    return {**data, "model": {**{k: v for k, v in hf_fields.items() if k not in model}, **model}}


def config_to_dict(cfg: Any) -> dict:
    """The full nested dict of a config (every field, defaults included)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` strings to a nested dict; values are parsed as YAML (1e-6, true, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is invalid: use dotted.key=value, e.g. loss.name=kl_cov")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set {item!r} is invalid: the key is empty")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        _set_dotted(data, key, value)
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A YAML config; a top-level ``base: other.yaml`` (relative to this file) is loaded first and overridden."""
    if not path.is_file():
        raise ValueError(f"--config {str(path)!r}: no such file")
    if path.resolve() in seen:
        raise ValueError(f"--config {str(path)!r}: 'base' files form a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--config {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"{str(path)!r}: base={base!r} must be a file name")
        data = _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (sparse overrides of the defaults, optionally on top of a ``base:`` file), apply
    ``--set`` overrides, validate."""
    data: dict = _read_yaml(Path(path)) if path is not None else {}
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_sha() -> str | None:
    return _git("rev-parse", "HEAD") or None


def source_revision() -> str:
    """The code a run used: '<git sha>', with ' (uncommitted changes)' when tracked files differ from it, or
    'unknown (not a git checkout)' for an installed package (its version is in megatron_entcov.__version__)."""
    sha = _git_sha()
    if sha is None:
        return "unknown (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + (" (uncommitted changes)" if dirty else "")


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every field) and the git SHA as YAML; the file loads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# resolved config; git {_git_sha() or 'unknown'}\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
