"""The policy model: a Megatron-Core GPTModel (Qwen2/Qwen3/Llama style, dense or Qwen3-MoE) built from
:class:`ModelConfig`.

RMSNorm, SwiGLU, RoPE (non-interleaved, as Hugging Face's rotate_half), GQA, optional QKV bias, optional per-head
q/k RMSNorm (Qwen3), experts (policy/moe.py), tied or untied embeddings, vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp``. The Transformer
Engine layer spec is used where TE is usable (compat/toolchain.py), the local spec otherwise; on a GPU the local
spec refuses what it cannot run (sequence parallelism, attention beyond the GPU's memory: check_local_spec).
Megatron's TransformerConfig is built here and nowhere else; its torch.compile'd fusions only where the probe of
Megatron's jit_fuser passed.

Example:
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    chunks = build_model(cfg.model, cfg.parallel, ps, **sequence_extent(cfg))   # one module per virtual stage
    logits = chunks[0](input_ids, position_ids, None)      # [B, T, V_padded/tp] on the last stage
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megatron_entcov.compat import toolchain
from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.config.dtypes import torch_dtype
from megatron_entcov.policy.moe import build_block_spec, moe_transformer_fields

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["build_transformer_config", "build_layer_spec", "build_model", "check_loaded", "uses_transformer_engine",
           "unwrap_model", "te_available", "check_local_spec", "local_attention_bytes", "sequence_extent"]


def te_available() -> bool:
    """Transformer Engine usable: a GPU, ``transformer_engine.pytorch`` and Megatron's TE layer spec import (probed
    once per process, compat/toolchain.py)."""
    return toolchain.transformer_engine().ok


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, *, initialize: bool = True,
                             device: torch.device | None = None):
    """Megatron TransformerConfig for this model and layout (the only place it is built).

    ``initialize=False``: parameters are left uninitialised, for weights that will be loaded (see
    :func:`build_model`). ``device``: where the model is built (``ps.device``; None = this machine's default):
    on a CUDA device Megatron allocates (and initialises) there, elsewhere on the host, which under a
    ``torch.device("meta")`` context allocates nothing (the converter's builds)."""
    on_device = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch_dtype(model.params_dtype, field="model.params_dtype")
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        # Qwen3: RMSNorm over each head's q and k (head_dim wide), as Hugging Face's q_norm/k_norm.
        qk_layernorm=model.qk_layernorm,
        **moe_transformer_fields(model, parallel),
        # RL needs the same function at rollout and training time: no dropout.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # Transformer Engine's attention exchanges K/V this way; the local spec's (policy/cp_attention.py) all-gathers.
        cp_comm_type=parallel.context_parallel_comm_type if parallel.context_parallel_size > 1
        and uses_transformer_engine(model) else None,
        sequence_parallel=parallel.sequence_parallel,
        # Weights that will be loaded: allocated straight on the device, never initialised (at 7B-32B a host
        # init per rank takes minutes). Random weights on a GPU: initialised there (Megatron's model-parallel
        # RNG). Random weights on CPU: full weights initialised with one seed and sliced, so the TP shards are
        # exact slices of the tp=1 weights (the layout tests compare them).
        use_cpu_initialization=not on_device,
        perform_initialization=initialize,
        **_fusions(uses_transformer_engine(model), device, dtype),
        **_recompute(model),
        # Interleaved pipelines under gloo give silently wrong results with batched p2p (both peers are
        # the same rank at pp=2): see shared/reference/megatron-core-cpu.md.
        batch_p2p_comm=not (on_cpu and parallel.virtual_pipeline_model_parallel_size is not None),
        overlap_p2p_comm=False,
    )


def _recompute(model: ModelConfig) -> dict:
    """TransformerConfig's recompute fields for ``model.recompute``: 'full' recomputes every layer from its input
    (uniform, one layer per checkpoint); 'selective' the core attention."""
    if model.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if model.recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def _fusions(use_te: bool, device: torch.device | None, dtype: torch.dtype) -> dict:
    """The TransformerConfig's fusion flags. Local spec: all off (CUDA-only kernels, or Megatron's defaults already
    off). TE spec: bias_activation_fusion (the SwiGLU through Megatron's torch.compile'd jit_fuser) only where the
    jit_fuser probe passed on this device: without a working Triton it would crash at the first forward."""
    if not use_te:
        return dict(gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                    bias_activation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False)
    if device is None or device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    probe = toolchain.jit_fuser(device, dtype)
    if probe.ok:
        logger.info("fusions: bias_activation_fusion on (%s)", probe.reason)
    else:
        logger.warning("fusions: bias_activation_fusion off, the SwiGLU runs unfused: %s", probe.reason)
    return dict(gradient_accumulation_fusion=False, bias_activation_fusion=probe.ok)


def uses_transformer_engine(model: ModelConfig) -> bool:
    """Whether the layer spec is Transformer Engine's ('auto': where TE is usable, :func:`te_available`)."""
    impl, te = model.transformer_impl, toolchain.transformer_engine()
    if impl == "transformer_engine" and not te.ok:
        raise ValueError(f"model.transformer_impl='transformer_engine' needs Transformer Engine, which is not usable "
                         f"here: {te.reason}; install it (make test-gpu installs it) or use 'auto' or 'local'")
    return impl == "transformer_engine" or (impl == "auto" and te.ok)


def _spec_choice(model: ModelConfig) -> str:
    """The layer spec :func:`build_layer_spec` uses and why, for the log."""
    impl, te = model.transformer_impl, toolchain.transformer_engine()
    if impl == "local":
        return "local spec (model.transformer_impl=local)"
    if uses_transformer_engine(model):
        return f"TE spec (model.transformer_impl={impl}; {te.reason})"
    return f"local spec (model.transformer_impl=auto; Transformer Engine not usable: {te.reason})"


def build_layer_spec(model: ModelConfig, *, context_parallel: bool = False):
    """Transformer Engine spec when available (or asked for), Megatron's local spec otherwise (dense models; an
    MoE model's chunks get per-layer specs from policy/moe.py build_block_spec). ``context_parallel``: the local
    spec's attention is the one across context-parallel ranks (policy/cp_attention.py); TE's takes cp as it is."""
    from megatron.core.models.gpt import gpt_layer_specs

    if uses_transformer_engine(model):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    from megatron_entcov.policy.packing import PackedDotProductAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=model.qk_layernorm)
    # Megatron's local attention refuses packed sequences; this subclass runs it per packed sample. It refuses
    # context parallelism too: the subclass across context-parallel ranks all-gathers K/V.
    attention = PackedDotProductAttention
    if context_parallel:
        from megatron_entcov.policy.cp_attention import ContextParallelDotProductAttention as attention
    spec.submodules.self_attention.submodules.core_attention = attention
    return spec


def _use_cp_attention(block_spec) -> None:
    """An MoE chunk's local layer specs (policy/moe.py build_block_spec) take the attention across
    context-parallel ranks (policy/cp_attention.py), as :func:`build_layer_spec`'s do at cp > 1."""
    from megatron_entcov.policy.cp_attention import ContextParallelDotProductAttention

    for layer in block_spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention


def sequence_extent(cfg: "RunConfig") -> dict[str, int]:
    """What a run trains the model on, as :func:`build_model`'s keywords: ``max_seq_len``, the longest sample
    (rollout.max_prompt_len + sampling.max_new_tokens), and ``micro_batch_tokens``, the tokens of one micro-batch
    (optim.max_tokens_per_micro_batch when packing, else optim.micro_batch_size rows of the longest sample)."""
    longest = cfg.rollout.max_prompt_len + cfg.sampling.max_new_tokens
    tokens = cfg.optim.max_tokens_per_micro_batch or cfg.optim.micro_batch_size * longest
    return {"max_seq_len": longest, "micro_batch_tokens": tokens}


def local_attention_bytes(model: ModelConfig, parallel: ParallelConfig, *, max_seq_len: int,
                          micro_batch_tokens: int) -> tuple[int, str]:
    """A lower bound of what Megatron's local attention keeps for the backward on one rank, and its arithmetic.

    Per layer and head it materialises the [T, T] scores of each sample (PackedDotProductAttention: per packed
    sample) and keeps the fp32 softmax output (attention_softmax_in_fp32) plus, for 16-bit params, its cast back,
    which the value matmul saves. A micro-batch of N tokens whose samples are at most L long holds at most N * L
    score entries per head (sum of len^2 with sum len <= N, len <= L): bytes >= heads/tp * N * L * bytes/entry *
    layers of this pipeline stage. Under context parallelism a rank's queries are N / cp of those tokens, against
    every key of their sample (policy/cp_attention.py): the bound divides by cp. Returns (bytes, the product
    written out)."""
    heads = model.num_attention_heads // parallel.tensor_model_parallel_size
    layers = model.num_layers // parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    half = model.params_dtype != "float32"
    per_entry = 4 + (2 if half else 0)
    total = heads * micro_batch_tokens * max_seq_len * per_entry * layers // cp
    what = "fp32 softmax + its " + model.params_dtype + " copy" if half else "fp32 softmax"
    per_cp = f" / {cp} context-parallel ranks" if cp > 1 else ""
    return total, (f"{heads} heads per rank x {micro_batch_tokens} tokens per micro-batch{per_cp} x {max_seq_len} "
                   f"tokens of the longest sample x {per_entry} bytes ({what}) x {layers} layers = "
                   f"{total / 2**30:.1f} GiB")


def check_local_spec(model: ModelConfig, parallel: ParallelConfig, device: torch.device | None, *,
                     max_seq_len: int | None = None, micro_batch_tokens: int | None = None) -> None:
    """Refuse, on a GPU, what the local spec cannot run there (nothing on CPU, where compat/cpu.py covers the
    norm and memory is the host's): sequence parallelism (Megatron's WrappedTorchNorm asserts it is off), and,
    given the training lengths (``max_seq_len``; ``micro_batch_tokens`` defaults to one such sample), attention
    whose kept scores alone (:func:`local_attention_bytes`) exceed the GPU's memory. Without them (a build that
    is not trained, e.g. a benchmark of the build) the lengths are unknown and not judged."""
    if device is None or device.type != "cuda" or uses_transformer_engine(model):
        return
    why = _spec_choice(model)
    if parallel.sequence_parallel:
        raise ValueError(f"parallel.sequence_parallel=true needs Transformer Engine on a GPU (Megatron's local spec "
                         f"norm, WrappedTorchNorm, refuses it; this run would use the {why}); install Transformer "
                         "Engine and set model.transformer_impl=auto, or set parallel.sequence_parallel=false")
    if not max_seq_len:
        return
    need, product = local_attention_bytes(model, parallel, max_seq_len=max_seq_len,
                                          micro_batch_tokens=micro_batch_tokens or max_seq_len)
    props = torch.cuda.get_device_properties(device)
    if need > props.total_memory:
        raise ValueError(
            f"model.transformer_impl={model.transformer_impl!r}: the {why} keeps each layer's attention scores for "
            f"the backward, at least {product} > the {props.total_memory / 2**30:.1f} GiB of this GPU "
            f"({props.name}); install Transformer Engine (model.transformer_impl=auto: its fused attention keeps no "
            "scores), or raise parallel.context_parallel_size (each rank keeps 1/cp of them), or lower "
            "optim.max_tokens_per_micro_batch (optim.micro_batch_size when not packing) or "
            "rollout.max_prompt_len + sampling.max_new_tokens")


def build_model(model: ModelConfig, parallel: ParallelConfig, ps: "ParallelState", *, load_weights: bool = False,
                max_seq_len: int | None = None, micro_batch_tokens: int | None = None) -> list[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual pipeline stage; a list of one without interleaving).

    The modules are on ``ps.device`` in ``model.params_dtype``. Without ``load_weights`` the weights are random
    (seeded by ``init_parallel``). With it the caller will load every weight (a checkpoint, Hugging Face
    weights): nothing is initialised, the parameters are allocated on the device and filled with NaN, and
    :func:`check_loaded` afterwards names any parameter the load missed. ``max_seq_len`` and
    ``micro_batch_tokens`` (:func:`sequence_extent`): what it will be trained on, for :func:`check_local_spec`.
    """
    from megatron.core.models.gpt import GPTModel

    check_local_spec(model, parallel, ps.device, max_seq_len=max_seq_len, micro_batch_tokens=micro_batch_tokens)
    config = build_transformer_config(model, parallel, initialize=not load_weights, device=ps.device)
    spec = build_layer_spec(model, context_parallel=parallel.context_parallel_size > 1) if not model.is_moe else None
    vocab = model.padded_vocab_size(ps.tp_size)
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        pre = ps.is_first_stage and vp_stage == 0
        post = ps.is_last_stage and vp_stage == vpp - 1
        kwargs = dict(vp_stage=vp_stage) if vpp > 1 else {}
        if model.is_moe:
            spec = build_block_spec(config, use_te=uses_transformer_engine(model), vp_stage=vp_stage if vpp > 1 else None,
                                    pp_rank=ps.pp_rank)
            if parallel.context_parallel_size > 1 and not uses_transformer_engine(model):
                _use_cp_attention(spec)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            **kwargs,
        )
        gpt = gpt.to(ps.device)
        if load_weights:
            with torch.no_grad():
                for p in gpt.parameters():
                    p.fill_(float("nan"))         # a memset; a weight the load misses cannot pass for trained
        chunks.append(gpt)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    logger.info("model: %d layers, hidden %d, vocab %d (padded %d), %d params on this rank, %s",
                model.num_layers, model.hidden_size, model.vocab_size, vocab, n_params, _spec_choice(model))
    return chunks


def check_loaded(chunks, source: str) -> None:
    """Raise naming the parameters still NaN after loading ``source`` into a model built with
    ``load_weights=True`` (one device reduction per parameter, once at start-up)."""
    missed = [n for c in chunks for n, p in unwrap_model(c).named_parameters() if bool(torch.isnan(p).any())]
    if missed:
        shown = ", ".join(missed[:5]) + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
        raise ValueError(f"{source} left {len(missed)} parameter(s) unset (NaN): {shown}; the weights do not "
                         "cover this model (architecture or layout mismatch)")


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything with a ``.module``) down to the GPTModel."""
    while hasattr(module, "module"):
        module = module.module
    return module
