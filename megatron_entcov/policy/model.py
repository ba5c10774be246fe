"""The policy model: a Megatron-Core GPTModel (Qwen2/Llama style) built from :class:`ModelConfig`.

RMSNorm, SwiGLU, RoPE (non-interleaved, as Hugging Face's rotate_half), GQA, optional QKV bias, tied or
untied embeddings, vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp``. The
Transformer Engine layer spec is used when TE imports and a GPU is present, the local spec otherwise.
Megatron's TransformerConfig is built here and nowhere else.

Example:
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    chunks = build_model(cfg.model, cfg.parallel, ps)      # one module per virtual pipeline stage
    logits = chunks[0](input_ids, position_ids, None)      # [B, T, V_padded/tp] on the last stage
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.config.dtypes import torch_dtype

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["build_transformer_config", "build_layer_spec", "build_model", "check_loaded", "uses_transformer_engine",
           "unwrap_model", "te_available"]


def te_available() -> bool:
    """Transformer Engine importable and a GPU present (its fused kernels fail on CPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libs are missing
        return False
    return True


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
        sequence_parallel=parallel.sequence_parallel,
        # Weights that will be loaded: allocated straight on the device, never initialised (at 7B-32B a host
        # init per rank takes minutes). Random weights on a GPU: initialised there (Megatron's model-parallel
        # RNG). Random weights on CPU: full weights initialised with one seed and sliced, so the TP shards are
        # exact slices of the tp=1 weights (the layout tests compare them).
        use_cpu_initialization=not on_device,
        perform_initialization=initialize,
        # Fused kernels are CUDA-only; on GPU they are left at Megatron's defaults.
        **(dict(
            gradient_accumulation_fusion=False,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            bias_activation_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
        ) if not uses_transformer_engine(model) else dict(
            gradient_accumulation_fusion=False,
            bias_activation_fusion=True,
        )),
        # Interleaved pipelines under gloo give silently wrong results with batched p2p (both peers are
        # the same rank at pp=2): see shared/reference/megatron-core-cpu.md.
        batch_p2p_comm=not (on_cpu and parallel.virtual_pipeline_model_parallel_size is not None),
        overlap_p2p_comm=False,
    )


def uses_transformer_engine(model: ModelConfig) -> bool:
    """Whether the layer spec is Transformer Engine's ('auto': when TE and a GPU are there)."""
    impl = model.transformer_impl
    if impl == "transformer_engine" and not te_available():
        raise ValueError("model.transformer_impl='transformer_engine' needs Transformer Engine and a GPU; "
                         "use 'auto' or 'local'")
    return impl == "transformer_engine" or (impl == "auto" and te_available())


def build_layer_spec(model: ModelConfig):
    """Transformer Engine spec when available (or asked for), Megatron's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if uses_transformer_engine(model):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_entcov.policy.packing import PackedDotProductAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    # Megatron's local attention refuses packed sequences; this subclass runs it per packed sample.
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def build_model(model: ModelConfig, parallel: ParallelConfig, ps: "ParallelState", *,
                load_weights: bool = False) -> list[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual pipeline stage; a list of one without interleaving).

    The modules are on ``ps.device`` in ``model.params_dtype``. Without ``load_weights`` the weights are random
    (seeded by ``init_parallel``). With it the caller will load every weight (a checkpoint, Hugging Face
    weights): nothing is initialised, the parameters are allocated on the device and filled with NaN, and
    :func:`check_loaded` afterwards names any parameter the load missed.
    """
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(model, parallel, initialize=not load_weights, device=ps.device)
    spec = build_layer_spec(model)
    vocab = model.padded_vocab_size(ps.tp_size)
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        pre = ps.is_first_stage and vp_stage == 0
        post = ps.is_last_stage and vp_stage == vpp - 1
        kwargs = dict(vp_stage=vp_stage) if vpp > 1 else {}
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
    logger.info("model: %d layers, hidden %d, vocab %d (padded %d), %s, %d params on this rank",
                model.num_layers, model.hidden_size, model.vocab_size, vocab,
                "TE spec" if uses_transformer_engine(model) else "local spec", n_params)
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
