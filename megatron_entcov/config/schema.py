"""The run config's schema: one ``@dataclass(kw_only=True)`` per section, nested in :class:`RunConfig`.

Each section checks its own fields in ``__post_init__``; a ``Literal`` annotation is the list of a field's valid
values and the check reads it (config/checks.py). Every failure is a ValueError naming the field as a dotted
path, the value and the fix. :meth:`RunConfig.validate` holds the checks across sections and
:meth:`RunConfig.resolve` those that need the world size (the parallel layout). The rollout-side sections live
in config/rollout.py, the data-side ones in config/data.py; reading and writing config files in config/load.py.

Example:
    cfg = RunConfig(loss=LossConfig(name="kl_cov"))      # or load_config(...) from a YAML file
    cfg.resolve(world_size=4)                            # fills parallel.data_parallel_size

Design notes: docs/design/config.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_entcov.config.checks import check_choices, check_positive, check_range, fail, literal_choices
from megatron_entcov.config.data import DataConfig, EvalConfig, SFTConfig
from megatron_entcov.config.hardware import HardwareConfig
from megatron_entcov.config.rollout import (
    SYNC_PROBE_PROMPT_LEN,
    RolloutConfig,
    SamplingConfig,
    WeightSyncConfig,
    server_tp,
)

__all__ = ["ModelConfig", "ParallelConfig", "ScheduleConfig", "LossConfig", "OptimConfig", "CheckpointConfig",
           "MetricsConfig", "RunConfig", "SCHEDULE_KINDS", "LOSS_NAMES", "AGG_MODES", "RUN_NAME_RULE"]


@dataclass(kw_only=True)
class ModelConfig:
    """A Qwen2/Qwen3/Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA), dense or mixture-of-experts (Qwen3-MoE),
    built as a Megatron-Core GPTModel."""

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
    qk_layernorm: bool = False
    """RMSNorm over each head's query and key (head_dim wide, one weight shared by the heads) before RoPE: True
    for Qwen3 and Qwen3-MoE, False for Qwen2/Llama."""
    num_experts: int | None = None
    """Routed experts per MoE layer (Qwen3-MoE ``num_experts``); None = a dense model. Divisible by
    parallel.expert_model_parallel_size."""
    moe_router_topk: int = 2
    """Experts each token is routed to (``num_experts_per_tok``); 1 <= topk <= num_experts. MoE only."""
    moe_ffn_hidden_size: int | None = None
    """Width of each expert's SwiGLU (``moe_intermediate_size``); None = ffn_hidden_size. MoE only."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (``norm_topk_prob``; Qwen3-MoE: True); False
    keeps the softmax over all experts."""
    moe_layer_freq: int = 1
    """Every moe_layer_freq-th layer is an MoE layer (``decoder_sparse_step``: layer i, 0-based, is sparse when
    (i + 1) % moe_layer_freq == 0), the others dense (ffn_hidden_size wide). MoE only."""
    moe_dense_layers: list[int] = field(default_factory=list)
    """0-based layers that stay dense whatever moe_layer_freq says (``mlp_only_layers``). MoE only."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (Switch-Transformer form, Megatron's 'aux_loss'; Qwen3-MoE pre-training:
    0.001). 0 (the default for RL) computes and logs nothing extra and leaves the policy gradient alone; > 0 adds
    coeff * the loss to the training loss and logs it as train/moe_aux_loss. Routing is dropless either way."""
    moe_routing_replay: bool = False
    """Routing replay (MoE only): the old-log-prob forward records each MoE layer's top-k experts per token and
    the training forwards of the step (and the Clip-Cov / KL-Cov selection's forward of the current policy) route
    every token to those experts, so the importance ratio pi/pi_old compares the same experts (the router's
    probabilities of those experts still get gradients). Logs moe/routing_changed_share: the share of routed
    (token, MoE layer) pairs whose own top-k differed from the recorded one. With
    model.recompute=full the recomputed layers route by the same recorded experts. policy/routing_replay.py."""
    moe_routing_source: Literal["old_logprob", "rollout"] = "old_logprob"
    """Where the replayed routing comes from (model.moe_routing_replay=true): 'old_logprob' = the old-log-prob
    forward's own top-k; 'rollout' = the experts the SGLang servers chose while generating each token ("R3";
    launched servers get --enable-return-routed-experts, given ones must have it): the old-log-prob forward
    already routes every token by them (the last token of a sample and padding, which have none, by the router's
    own top-k), so pi_old, pi and the rollout log-probs all use the rollout's experts. Needs rollout.engine=sglang
    (Qwen3-MoE on GPU servers: SGLang cannot serve it on CPU) and context_parallel_size=1."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter and activation dtype; float32 on CPU, bfloat16 on GPU. float16 describes converted checkpoints
    only: a run rejects it (training has no loss scaling)."""
    init_method_std: float = 0.02
    """Standard deviation of the random initialisation (ignored when weights are loaded)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: 'auto' uses Transformer Engine where it is usable (a GPU, transformer_engine.pytorch and
    Megatron's TE spec import; compat/toolchain.py), else the local spec; 'transformer_engine' fails where it is not.
    On a GPU the local spec refuses parallel.sequence_parallel and training lengths whose attention scores alone
    exceed the GPU's memory (policy/model.py check_local_spec)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in the training backward (Megatron's recompute_granularity): 'none' keeps every
    layer's activations of a micro-batch; 'selective' recomputes the core attention (the [T, T] scores of the
    local spec; Transformer Engine's fused attention keeps none anyway); 'full' keeps only each layer's input and
    recomputes the layer (about one more forward per step). ``megatron-entcov plan`` shows what each one holds."""
    hf_dir: str | None = None
    """Hugging Face model directory (config, tokenizer, weights) the run starts from; None = random init. Its
    config.json gives the architecture fields above that the config leaves out; those it sets must agree
    (max_position_embeddings may be smaller)."""

    def __post_init__(self) -> None:
        check_choices(self, "model")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
            check_positive(f"model.{name}", getattr(self, name))
        if self.kv_channels is not None:
            check_positive("model.kv_channels", self.kv_channels)
        elif self.hidden_size % self.num_attention_heads:
            fail("model.hidden_size", self.hidden_size,
                 f"must be divisible by model.num_attention_heads={self.num_attention_heads}, or set kv_channels")
        if self.num_attention_heads % self.num_query_groups:
            fail("model.num_query_groups", self.num_query_groups,
                 f"must divide model.num_attention_heads={self.num_attention_heads}")
        check_positive("model.rotary_base", self.rotary_base)
        check_range("model.norm_epsilon", self.norm_epsilon, 0.0, 1.0, lo_open=True)
        check_positive("model.init_method_std", self.init_method_std)
        self._check_moe()

    def _check_moe(self) -> None:
        check_positive("model.moe_aux_loss_coeff", self.moe_aux_loss_coeff, allow_zero=True)
        if self.num_experts is None:
            if self.moe_routing_replay:
                fail("model.moe_routing_replay", True, "replays experts' routing and needs a mixture-of-experts "
                     "model (model.num_experts); set it false")
        if self.moe_routing_source == "rollout" and not self.moe_routing_replay:
            fail("model.moe_routing_source", "rollout", "chooses the routing that replay uses and needs "
                 "model.moe_routing_replay=true; set that, or model.moe_routing_source=old_logprob")
        if self.num_experts is None:
            return
        check_positive("model.num_experts", self.num_experts)
        if not 1 <= self.moe_router_topk <= self.num_experts:
            fail("model.moe_router_topk", self.moe_router_topk, f"must be in [1, model.num_experts={self.num_experts}]")
        if self.moe_ffn_hidden_size is not None:
            check_positive("model.moe_ffn_hidden_size", self.moe_ffn_hidden_size)
        check_positive("model.moe_layer_freq", self.moe_layer_freq)
        bad = [i for i in self.moe_dense_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
        if bad:
            fail("model.moe_dense_layers", self.moe_dense_layers,
                 f"every entry must be a layer index in [0, model.num_layers={self.num_layers}); {bad} are not")
        if not any(self.moe_layer_pattern()):
            fail("model.moe_layer_freq", self.moe_layer_freq, "with model.moe_dense_layers leaves no MoE layer; "
                 "set model.num_experts=null for a dense model")

    @property
    def is_moe(self) -> bool:
        """Derived: whether any layer is a mixture of experts."""
        return self.num_experts is not None

    def moe_layer_pattern(self) -> list[int]:
        """Derived: 1 for each MoE layer, 0 for each dense one (Megatron's moe_layer_freq list; Hugging Face's
        rule: sparse when not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0); all 0 when dense."""
        if self.num_experts is None:
            return [0] * self.num_layers
        dense = set(self.moe_dense_layers)
        return [int(i not in dense and (i + 1) % self.moe_layer_freq == 0) for i in range(self.num_layers)]

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Derived: each expert's SwiGLU width (moe_ffn_hidden_size, else ffn_hidden_size)."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

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
    """Context-parallel size (cp): splits every sequence's tokens over cp ranks of a replica (Megatron's
    load-balanced layout: 2 * cp chunks, rank r holds chunks r and 2cp-1-r), for sequences whose activations do not
    fit one rank. Sequences are padded to a multiple of 2 * cp (times tp: sequence parallelism splits each rank's
    share again) automatically. On a GPU the attention is Transformer Engine's (context_parallel_comm_type); on
    CPU and with the local spec, an all-gather of K/V (policy/cp_attention.py). The ranks hold the same weights and
    rows: gradients reduce over dp x cp, per-token statistics are exact (docs/design/context_parallel.md)."""
    context_parallel_comm_type: Literal["p2p", "all_gather", "a2a"] = "p2p"
    """How Transformer Engine's attention exchanges K/V between context-parallel ranks (Megatron's cp_comm_type):
    'p2p' a ring of point-to-point transfers overlapped with the attention, 'all_gather' all of K/V before it,
    'a2a' heads scattered over the ranks (Ulysses; heads / tp divisible by cp). Ignored when cp = 1 and by the
    local spec (which all-gathers)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (ep): splits each MoE layer's experts over ep ranks of a pipeline stage (its tp ranks,
    then data-parallel replicas; tokens travel to their experts by all-to-all); divides model.num_experts and
    tp * dp. Each expert is whole on its rank (Megatron's expert tensor parallelism is 1). With tp > 1 an MoE
    model needs parallel.sequence_parallel=true. 1 for dense models."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1; on a GPU also Transformer Engine, whose norm supports it)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: 'auto' picks nccl when CUDA is available, else gloo."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer; Adam only)."""
    data_parallel_size: int = 0
    """Derived: world_size // (tp * pp * cp), set by RunConfig.resolve()."""

    def __post_init__(self) -> None:
        check_choices(self, "parallel")
        check_positive("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size)
        check_positive("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size)
        check_positive("parallel.context_parallel_size", self.context_parallel_size)
        check_positive("parallel.expert_model_parallel_size", self.expert_model_parallel_size)
        if self.virtual_pipeline_model_parallel_size is not None:
            check_positive("parallel.virtual_pipeline_model_parallel_size",
                           self.virtual_pipeline_model_parallel_size)
            if self.pipeline_model_parallel_size < 2:
                fail("parallel.virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size,
                     "needs parallel.pipeline_model_parallel_size >= 2; set it to null")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            fail("parallel.sequence_parallel", True, "needs parallel.tensor_model_parallel_size > 1; set false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    @property
    def row_multiple(self) -> int:
        """Derived: what a micro-batch's row length is padded to: tp (sequence parallelism splits it); with context
        parallelism a multiple of 2 * cp whose share per rank is a multiple of tp (policy/packing.py
        cp_row_multiple)."""
        tp, cp = self.tensor_model_parallel_size, self.context_parallel_size
        return tp if cp == 1 else math.lcm(2 * cp, cp * tp)


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
        check_choices(self, "schedule")
        check_positive("schedule.steps", self.steps, allow_zero=True)
        check_positive("schedule.start_step", self.start_step, allow_zero=True)
        check_positive("schedule.end", self.end, allow_zero=True)
        if self.kind != "constant" and self.steps == 0:
            fail("schedule.steps", self.steps, f"kind={self.kind!r} needs steps > 0 (or use kind='constant')")
        if self.kind == "exponential" and self.end <= 0:
            fail("schedule.end", self.end, "kind='exponential' needs end > 0; use 'linear' or 'cosine' to reach 0")


SCHEDULE_KINDS = literal_choices(ScheduleConfig)["kind"]
"""The schedule shapes, read from ScheduleConfig.kind's annotation."""


@dataclass(kw_only=True)
class LossConfig:
    """Policy loss and entropy control (Cui et al. 2025, arXiv 2505.22617, sections 3 and 4 of the reference).

    Defaults are the released Qwen2.5-7B settings where the paper gives one.
    """

    name: Literal["ppo", "clip_cov", "kl_cov", "high_entropy_tokens", "archer", "ce_gppo"] = "ppo"
    """'ppo' (clipped surrogate, with clip-higher/dual clip), 'clip_cov' (Clip-Cov) or 'kl_cov' (KL-Cov); the
    token-entropy family (losses/token_entropy.py): 'high_entropy_tokens' (PPO gradient only on the top
    high_entropy_ratio share of tokens by entropy, arXiv 2506.01939), 'archer' (dual-token clip and KL by an
    entropy quantile, arXiv 2507.15778), 'ce_gppo' (bounded gradients from clipped tokens, arXiv 2509.20712)."""
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

    high_entropy_ratio: float = 0.2
    """high_entropy_tokens: share rho of valid tokens kept by entropy: the policy gradient flows only where
    H_t >= the exact global (1 - rho)-quantile of the mini-batch's token entropies (all ranks; ties at the
    threshold kept). Released: 0.2. Also the high/low entropy split of the entropy-change diagnostics."""
    high_entropy_ratio_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Annealing of high_entropy_ratio (base = high_entropy_ratio); towards 1 it recovers the full gradient."""
    entropy_advantage_coef: float = 0.0
    """Entropy-based advantage shaping (arXiv 2506.14758, the shaped advantage): A_t += min(alpha * H_t (detached),
    |A_t| / entropy_advantage_kappa), with alpha this field; composable with every loss. 0 = off; released 0.4."""
    entropy_advantage_kappa: float = 2.0
    """Advantage shaping: kappa > 1, the shaping term never exceeds |A_t| / kappa (so never flips A's sign).
    Released: 2."""
    entropy_advantage_coef_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Annealing of entropy_advantage_coef (base = entropy_advantage_coef)."""
    target_entropy: float = 0.0
    """Adaptive entropy control (Skywork-OR1, arXiv 2505.22312, "adaptive entropy control"): target token entropy (nats).
    The entropy bonus coefficient c_k moves by target_entropy_delta toward the target after each optimizer step
    (k counts optimizer steps: optim.num_mini_batches per RL step; docs/design/losses.md) and acts only while the
    mini-batch's entropy is <= the target. 0 = off; released 0.2. Needs loss.entropy_coef = 0."""
    target_entropy_delta: float = 0.005
    """Adaptive entropy control: step Delta of the coefficient per optimizer step. Released: 0.005."""
    target_entropy_coef_init: float = 0.0
    """Adaptive entropy control: initial coefficient c_0. Released: 0."""
    archer_entropy_quantile: float = 0.8
    """archer: tokens with entropy above this quantile are high-entropy ('reasoning') tokens, the rest
    low-entropy ('knowledge') tokens. Released: 0.8."""
    archer_quantile_scope: Literal["response", "global"] = "response"
    """archer: the quantile per response (as released) or over the global mini-batch (exact, all ranks)."""
    archer_low_clip_ratio: float = 0.2
    """archer: PPO clip epsilon (both sides) of low-entropy tokens. Released: 0.2."""
    archer_high_clip_ratio: float = 0.5
    """archer: PPO clip epsilon (both sides) of high-entropy tokens. Released: 0.5."""
    archer_kl_coef: float = 0.001
    """archer: weight of the per-token KL (k3 estimator) on low-entropy tokens. Released: 0.001 to the
    reference model; here to the rollout policy pi_old (no reference model in this project)."""
    archer_high_kl_scale: float = 0.0
    """archer: the KL weight of high-entropy tokens as a multiple of archer_kl_coef. Released: 0."""
    ce_gppo_beta1: float = 0.75
    """ce_gppo: gradient scale of tokens below the clip range with A < 0 (r < 1 - clip_ratio_low).
    Released: 0.75 (7B), 0.5 (1.5B)."""
    ce_gppo_beta2: float = 1.0
    """ce_gppo: gradient scale of tokens above the clip range with A > 0 (r > 1 + clip_ratio_high).
    Released: 1."""

    def __post_init__(self) -> None:
        check_choices(self, "loss")
        check_range("loss.clip_ratio_low", self.clip_ratio_low, 0.0, 1.0, lo_open=True)
        check_positive("loss.clip_ratio_high", self.clip_ratio_high)
        if not self.clip_ratio_c > 1.0:
            fail("loss.clip_ratio_c", self.clip_ratio_c, "the dual-clip constant must be > 1 (released: 10)")
        check_range("loss.clip_cov_ratio", self.clip_cov_ratio, 0.0, 1.0, lo_open=True)
        check_range("loss.kl_cov_ratio", self.kl_cov_ratio, 0.0, 1.0, lo_open=True)
        if not self.clip_cov_lb < self.clip_cov_ub:
            fail("loss.clip_cov_lb", self.clip_cov_lb,
                 f"must be < loss.clip_cov_ub={self.clip_cov_ub} (released: lb=1, ub=5)")
        check_positive("loss.kl_cov_coef", self.kl_cov_coef, allow_zero=True)
        check_positive("loss.entropy_coef", self.entropy_coef, allow_zero=True)
        for coef in ("clip_cov_ratio", "kl_cov_ratio", "kl_cov_coef", "entropy_coef"):
            sched = getattr(self, f"{coef}_schedule")
            if sched.kind == "exponential" and getattr(self, coef) <= 0:
                fail(f"loss.{coef}_schedule.kind", sched.kind, f"'exponential' needs loss.{coef} > 0")
            if coef.endswith("_ratio") and sched.kind != "constant" and sched.end > 1.0:
                fail(f"loss.{coef}_schedule.end", sched.end, "a token share must lie in [0, 1]")
        self._check_token_entropy()
        if not (isinstance(self.tis_cap, (int, float)) and math.isfinite(self.tis_cap) and self.tis_cap >= 0):
            fail("loss.tis_cap", self.tis_cap, "must be a finite number >= 0: 0 turns truncated importance "
                 "sampling off, > 0 is the cap on the weight (e.g. 2.0)")


    def _check_token_entropy(self) -> None:
        """The token-entropy family's fields (losses/token_entropy.py)."""
        check_range("loss.high_entropy_ratio", self.high_entropy_ratio, 0.0, 1.0, lo_open=True)
        check_positive("loss.entropy_advantage_coef", self.entropy_advantage_coef, allow_zero=True)
        if not self.entropy_advantage_kappa > 1.0:
            fail("loss.entropy_advantage_kappa", self.entropy_advantage_kappa, "must be > 1 (released: 2)")
        check_positive("loss.target_entropy", self.target_entropy, allow_zero=True)
        check_positive("loss.target_entropy_delta", self.target_entropy_delta, allow_zero=True)
        check_positive("loss.target_entropy_coef_init", self.target_entropy_coef_init, allow_zero=True)
        if self.target_entropy > 0 and self.entropy_coef > 0:
            fail("loss.entropy_coef", self.entropy_coef, f"loss.target_entropy={self.target_entropy} > 0 adapts the "
                 "entropy coefficient itself: set loss.entropy_coef=0 (start value: loss.target_entropy_coef_init)")
        check_range("loss.archer_entropy_quantile", self.archer_entropy_quantile, 0.0, 1.0, hi_open=True)
        check_range("loss.archer_low_clip_ratio", self.archer_low_clip_ratio, 0.0, 1.0, lo_open=True)
        check_range("loss.archer_high_clip_ratio", self.archer_high_clip_ratio, 0.0, 1.0, lo_open=True)
        check_positive("loss.archer_kl_coef", self.archer_kl_coef, allow_zero=True)
        check_positive("loss.archer_high_kl_scale", self.archer_high_kl_scale, allow_zero=True)
        check_positive("loss.ce_gppo_beta1", self.ce_gppo_beta1, allow_zero=True)
        check_positive("loss.ce_gppo_beta2", self.ce_gppo_beta2, allow_zero=True)
        for coef in ("high_entropy_ratio", "entropy_advantage_coef"):
            sched = getattr(self, f"{coef}_schedule")
            if sched.kind == "exponential" and getattr(self, coef) <= 0:
                fail(f"loss.{coef}_schedule.kind", sched.kind, f"'exponential' needs loss.{coef} > 0")
        if self.high_entropy_ratio_schedule.kind != "constant" and self.high_entropy_ratio_schedule.end > 1.0:
            fail("loss.high_entropy_ratio_schedule.end", self.high_entropy_ratio_schedule.end,
                 "a token share must lie in [0, 1]")


LOSS_NAMES = literal_choices(LossConfig)["name"]
"""The policy losses, read from LossConfig.name's annotation."""
AGG_MODES = literal_choices(LossConfig)["agg"]
"""The loss aggregations, read from LossConfig.agg's annotation."""


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
        check_choices(self, "optim")
        check_positive("optim.lr", self.lr)
        check_positive("optim.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            fail("optim.min_lr", self.min_lr, f"must be <= optim.lr={self.lr}")
        check_positive("optim.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        check_range("optim.adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        check_range("optim.adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        check_positive("optim.adam_eps", self.adam_eps)
        check_positive("optim.clip_grad", self.clip_grad, allow_zero=True)
        check_positive("optim.num_mini_batches", self.num_mini_batches)
        check_positive("optim.micro_batch_size", self.micro_batch_size)
        check_positive("optim.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch, allow_zero=True)
        check_positive("optim.max_consecutive_skipped", self.max_consecutive_skipped, allow_zero=True)


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
        check_positive("checkpoint.save_interval", self.save_interval, allow_zero=True)
        check_positive("checkpoint.keep_last", self.keep_last)


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
    exact_entropy_change_max_vocab: int = 4096
    """With metrics.measure_entropy_change, when the padded vocabulary (all tensor-parallel shards) has at most
    this many entries, also log the exact first-order entropy change of the step, -Cov_{a~pi_old}(log pi_old(a),
    z_new(a) - z_old(a)) per state from the full softmax (entropy_law.entropy_change_first_order), as
    entropy/delta_first_order beside the batch-covariance prediction. It costs two extra forwards over the same
    tokens as the measured change (metrics.entropy_change_samples) and holds their full logits (rows x T x V
    floats) between them; 0 = never."""
    law_reward: Literal["auto", "eval", "train"] = "auto"
    """What the online R = -a*exp(H) + b fit uses as R: 'eval' = held-out eval/accuracy (as the paper fits
    downstream accuracy; needs eval.interval > 0), 'train' = every sample's training reward
    (reward/mean_all), 'auto' = eval when evaluation runs, else train."""

    histogram_tokens: int = 4096
    """Tokens per step whose covariance and entropy TensorBoard shows as histograms (cov/tokens, entropy/tokens;
    cov/chosen_tokens, entropy/chosen_tokens for the tokens Clip-Cov detached or KL-Cov penalised): a uniform
    sample of the global batch, the same for every parallel layout (monitor/histograms.py); 0 = no histograms.
    Nothing is sampled with metrics.tensorboard=false."""
    law_image_interval: int = 10
    """Draw the law's (H, R) points with the fitted R = -a*exp(H) + b and its ceiling as a TensorBoard image
    (law/fit) every this many steps and after the last one; 0 = never."""

    def __post_init__(self) -> None:
        check_choices(self, "metrics")
        check_positive("metrics.log_interval", self.log_interval)
        check_positive("metrics.histogram_tokens", self.histogram_tokens, allow_zero=True)
        check_positive("metrics.law_image_interval", self.law_image_interval, allow_zero=True)
        check_positive("metrics.entropy_change_samples", self.entropy_change_samples, allow_zero=True)
        check_positive("metrics.exact_entropy_change_max_vocab", self.exact_entropy_change_max_vocab,
                       allow_zero=True)
        check_range("metrics.law_fit_min_points", self.law_fit_min_points, 3, 10**9)


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
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    """The GPUs the config is written for, and the trainer's start-up memory plan (megatron-entcov plan)."""

    def __post_init__(self) -> None:
        if not _is_run_name(self.name):
            fail("name", self.name, f"{RUN_NAME_RULE}; e.g. name=qwen2.5-7b-kl-cov")
        check_positive("steps", self.steps)
        self.validate()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self) -> None:
        """Cross-section checks that do not need the world size."""
        self._check_model_layout()
        self._check_context_parallel()
        self._check_lengths()
        self._check_eval()
        self._check_launched_servers()
        self._check_sglang_moe()
        self._check_rollout_routing()

    def _check_model_layout(self) -> None:
        """The model's dtype and shape against the parallel layout."""
        m, p = self.model, self.parallel
        if m.params_dtype == "float16":
            fail("model.params_dtype", m.params_dtype,
                 "set model.params_dtype=bfloat16 on GPU (or float32): training in float16 needs loss scaling, which "
                 "this trainer does not do (Megatron would unscale the unscaled gradients by 2^-32); float16 stays "
                 "available for exported checkpoints (convert --dtype float16)")
        if p.sequence_parallel and m.transformer_impl == "local" and p.backend == "nccl":
            # GPU ranks (nccl) on Megatron's local spec: its WrappedTorchNorm asserts sequence parallelism off
            # (compat/cpu.py lifts that on CPU only). With 'auto' the build decides (policy/model.py).
            fail("parallel.sequence_parallel", True, "needs Transformer Engine on a GPU (parallel.backend=nccl): "
                 "Megatron's local spec (model.transformer_impl=local) refuses it; set model.transformer_impl=auto "
                 "(Transformer Engine installed) or parallel.sequence_parallel=false")
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if m.num_attention_heads % tp:
            fail("parallel.tensor_model_parallel_size", tp,
                 f"must divide model.num_attention_heads={m.num_attention_heads}")
        if m.num_query_groups % tp:
            fail("parallel.tensor_model_parallel_size", tp,
                 f"must divide model.num_query_groups={m.num_query_groups}")
        if m.ffn_hidden_size % tp:
            fail("parallel.tensor_model_parallel_size", tp, f"must divide model.ffn_hidden_size={m.ffn_hidden_size}")
        chunks = pp * (p.virtual_pipeline_model_parallel_size or 1)
        if m.num_layers % chunks:
            fail("model.num_layers", m.num_layers,
                 f"must be divisible by pipeline_model_parallel_size * virtual_pipeline_model_parallel_size = {chunks}")

    def _check_context_parallel(self) -> None:
        """What context parallelism (cp > 1) does not combine with: each refusal names what to change."""
        m, p, cp = self.model, self.parallel, self.parallel.context_parallel_size
        if cp == 1:
            return
        if m.is_moe and m.moe_aux_loss_coeff > 0:
            fail("model.moe_aux_loss_coeff", m.moe_aux_loss_coeff, f"the load-balancing loss counts every routed "
                 f"token, and context_parallel_size={cp} pads each sequence to a multiple of {2 * cp} (more padding "
                 "tokens than without cp), so it would not be the cp=1 loss; set it to 0 with context parallelism, "
                 "or context_parallel_size=1")
        heads = m.num_attention_heads // p.tensor_model_parallel_size
        if p.context_parallel_comm_type == "a2a" and heads % cp:
            fail("parallel.context_parallel_comm_type", "a2a", f"scatters each rank's {heads} attention heads "
                 f"(num_attention_heads / tp) over context_parallel_size={cp} ranks, which does not divide them; "
                 "use 'p2p' or 'all_gather'")

    def _check_lengths(self) -> None:
        """Prompt + response, a packed micro-batch and the post-sync probe against the context and the layout."""
        m, tp = self.model, self.parallel.tensor_model_parallel_size
        if self.rollout.max_prompt_len + self.sampling.max_new_tokens > m.max_position_embeddings:
            fail("model.max_position_embeddings", m.max_position_embeddings,
                 f"must be >= rollout.max_prompt_len + sampling.max_new_tokens = "
                 f"{self.rollout.max_prompt_len + self.sampling.max_new_tokens}")
        budget = self.optim.max_tokens_per_micro_batch
        cp = self.parallel.context_parallel_size
        longest = self.rollout.max_prompt_len + self.sampling.max_new_tokens
        padded = -(-longest // (2 * cp)) * 2 * cp if cp > 1 else longest
        if budget and budget < padded:
            fail("optim.max_tokens_per_micro_batch", budget,
                 f"a micro-batch must hold the longest sample, rollout.max_prompt_len + sampling.max_new_tokens = "
                 f"{longest}" + (f" (padded to a multiple of 2 * context_parallel_size: {padded})" if cp > 1 else "")
                 + f"; set it to >= {padded} (or 0 for row micro-batches)")
        multiple = self.parallel.row_multiple
        if budget and budget % multiple:
            why = (f"parallel.tensor_model_parallel_size={tp} (sequence parallelism splits the packed row)" if cp == 1
                   else f"{multiple}: each packed sample splits into 2 * context_parallel_size={2 * cp} chunks and "
                        f"each rank's share into tensor_model_parallel_size={tp}")
            fail("optim.max_tokens_per_micro_batch", budget,
                 f"must be a multiple of {why}; use {budget - budget % multiple + multiple}")
        w = self.weight_sync
        if w.verify == "probe" and SYNC_PROBE_PROMPT_LEN + w.probe_tokens > m.max_position_embeddings:
            fail("weight_sync.probe_tokens", w.probe_tokens,
                 f"the probe ({SYNC_PROBE_PROMPT_LEN} prompt tokens + probe_tokens) must fit in "
                 f"model.max_position_embeddings={m.max_position_embeddings}; lower it")

    def _check_eval(self) -> None:
        """Evaluation against the data source and the law fit."""
        if self.metrics.law_reward == "eval" and not self.eval.interval:
            fail("metrics.law_reward", "eval", "fitting the law on eval accuracy needs evaluation: set "
                 "eval.interval > 0 (or metrics.law_reward=train)")
        if self.eval.interval and self.eval.source == "held_out" and self.data.source == "file" \
                and not self.data.held_out_rows:
            fail("eval.source", "held_out", "a data file has no held-out split unless data.held_out_rows > 0; set "
                 "data.held_out_rows=<rows> (they are then never trained on) or eval.source=file with eval.path")
        if self.eval.seed is not None and (self.eval.source != "held_out" or self.data.source == "file"):
            fail("eval.seed", self.eval.seed, "it picks the problem stream of a generated task's held-out split "
                 f"(data.source arithmetic or countdown with eval.source=held_out; here data.source="
                 f"{self.data.source!r}, eval.source={self.eval.source!r}); set eval.seed=null")

    def _check_launched_servers(self) -> None:
        """Launched GPU SGLang servers fit on their replica's own GPUs, and take weights other than by NCCL."""
        r, sg = self.rollout, self.rollout.sglang
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        if r.engine == "sglang" and sg.server_device == "cuda" and not sg.server_urls and not sg.router_url:
            if sg.sync_method == "distributed":
                fail("rollout.sglang.sync_method", sg.sync_method,
                     "contradicts launched GPU servers (rollout.sglang.server_device=cuda without server_urls or "
                     "router_url), which go on the replica's own GPUs: NCCL refuses two ranks of the weight-sync "
                     "group on one GPU; set rollout.sglang.sync_method=tensor (CUDA IPC, made for colocated "
                     "servers), or start the servers on other GPUs and list them in rollout.sglang.server_urls")
            need = sg.num_servers * server_tp(sg.server_args)
            gpus = tp * pp * self.parallel.context_parallel_size
            if need > gpus:
                fail("rollout.sglang.num_servers", sg.num_servers,
                     f"launched GPU servers go on their replica's own GPUs: {sg.num_servers} servers x "
                     f"{server_tp(sg.server_args)} GPUs (rollout.sglang.server_args --tp-size) = {need} > the "
                     f"replica's parallel.tensor_model_parallel_size * pipeline_model_parallel_size * "
                     f"context_parallel_size = {gpus}; launch fewer or smaller servers, or start them elsewhere "
                     "(rollout.sglang.server_urls)")

    def _check_sglang_moe(self) -> None:
        """What SGLang's (0.5.23) own Qwen3-MoE model class cannot take: a tied output layer (it keeps a separate
        lm_head, loaded only from lm_head.weight, which the sync of a tied model never sends) and dense layers (it
        makes every layer sparse, reading neither mlp_only_layers nor decoder_sparse_step)."""
        m = self.model
        if self.rollout.engine != "sglang" or not m.is_moe:
            return
        if m.tie_word_embeddings:
            fail("model.tie_word_embeddings", True,
                 "SGLang's Qwen3-MoE model keeps its own lm_head and loads it only from lm_head.weight, which the "
                 "weight sync of a tied model does not send; use an untied checkpoint (the released Qwen3-MoE models "
                 "are untied) or rollout.engine=local")
        if m.moe_dense_layers or m.moe_layer_freq != 1:
            field_name, value = (("model.moe_dense_layers", m.moe_dense_layers) if m.moe_dense_layers
                                 else ("model.moe_layer_freq", m.moe_layer_freq))
            fail(field_name, value, "SGLang's Qwen3-MoE model makes every layer sparse (it reads neither "
                 "mlp_only_layers nor decoder_sparse_step), so its rollouts would come from another model; use a "
                 "checkpoint whose layers are all MoE, or rollout.engine=local")

    def _check_rollout_routing(self) -> None:
        """model.moe_routing_source=rollout reads each token's experts from SGLang's replies, in the token order
        of a whole sequence: the engine must be SGLang and a sequence must not be split over context-parallel
        ranks (the replay does not map the rollout's rows through the context-parallel layout)."""
        if self.model.moe_routing_source != "rollout":
            return
        if self.rollout.engine != "sglang":
            fail("model.moe_routing_source", "rollout", f"replays the experts the SGLang servers chose, and "
                 f"rollout.engine={self.rollout.engine!r} reports none; set rollout.engine=sglang, or "
                 "model.moe_routing_source=old_logprob")
        if self.parallel.context_parallel_size != 1:
            fail("model.moe_routing_source", "rollout", "is not mapped through the context-parallel token layout; "
                 "set parallel.context_parallel_size=1, or model.moe_routing_source=old_logprob")

    def resolve(self, world_size: int) -> "RunConfig":
        """Check the layout against the world size and fill the derived fields. Returns self."""
        p = self.parallel
        if world_size < 1:
            fail("world_size", world_size, "must be >= 1")
        if world_size % p.model_parallel_size:
            fail("parallel.tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size",
                 p.model_parallel_size, f"must divide the world size {world_size}; change tp/pp/cp or launch a "
                 f"multiple of {p.model_parallel_size} processes")
        p.data_parallel_size = world_size // p.model_parallel_size
        dp = p.data_parallel_size
        total = self.rollout.prompts_per_step * self.rollout.n_samples_per_prompt
        per_mini = total // self.optim.num_mini_batches
        if total % self.optim.num_mini_batches:
            fail("optim.num_mini_batches", self.optim.num_mini_batches,
                 f"must divide rollout.prompts_per_step * n_samples_per_prompt = {total}")
        if self.optim.max_tokens_per_micro_batch and per_mini % dp:
            fail("optim.num_mini_batches", self.optim.num_mini_batches,
                 f"a mini-batch of {per_mini} sequences does not split over data_parallel_size={dp}")
        if not self.optim.max_tokens_per_micro_batch and per_mini % (dp * self.optim.micro_batch_size):
            fail("optim.micro_batch_size", self.optim.micro_batch_size,
                 f"a mini-batch of {per_mini} sequences must split evenly over data_parallel_size={dp} "
                 f"ranks of micro_batch_size sequences; choose a divisor of {per_mini // dp}"
                 if per_mini % dp == 0 else
                 f"a mini-batch of {per_mini} sequences does not split over data_parallel_size={dp}")
        if p.use_distributed_optimizer and self.optim.optimizer != "adam":
            fail("parallel.use_distributed_optimizer", True,
                 "the distributed optimizer supports optim.optimizer='adam' only")
        return self
