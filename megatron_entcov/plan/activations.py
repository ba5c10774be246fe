"""Activation memory of one pipeline stage: what a training micro-batch keeps for its backward, how many are in
flight under the pipeline schedule, and the peak of a forward-only pass.

Owns :func:`estimate_activations` and :class:`Activations`: the bytes of OUR layer (Megatron-Core GPTModel with
RMSNorm, SwiGLU, RoPE, GQA, no dropout; the local spec with policy/packing.py's PackedDotProductAttention, or
Transformer Engine's fused attention) per micro-batch of ``micro_batch_tokens`` tokens, under ``model.recompute``,
tensor, sequence and context parallelism, and the logits path of ops/vocab_parallel.py. Under context parallelism
(cp) a rank holds 1/cp of each micro-batch's tokens (policy/packing.py): every per-token term divides by cp; the
local spec's attention (policy/cp_attention.py) scores its queries against all of their sample's keys and keeps
the K and V it gathered (the full length); Transformer Engine's ring keeps its local q, k, v (the K/V it receives
are exchanged again in the backward). An independent computation from
the shapes alone: nothing is built or measured here. Every term is written out in ``Activations.derivation``.

Example:
    act = estimate_activations(cfg.model, cfg.parallel, micro_batch_tokens=8192, max_seq_len=4096,
                               packed=True, attention="fused", stage=0)
    act.train_bytes, act.forward_bytes        # peaks of the training step and of the old-log-prob pass
    print("\\n".join(act.derivation))

Derivation, where it departs from Megatron's formulas, and the measured error: docs/design/plan.md "Activations".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.ops.vocab_parallel import default_chunk_size

__all__ = ["Activations", "estimate_activations", "ATTENTION_KINDS", "LOSS_BYTES_PER_TOKEN", "OP_BYTES_PER_TOKEN"]

AttentionKind = Literal["fused", "local"]
ATTENTION_KINDS: tuple[str, ...] = AttentionKind.__args__
"""'fused': Transformer Engine's layer spec (fused norms+linears, flash/fused attention, fused SwiGLU);
'local': Megatron's local spec with PackedDotProductAttention (materialises each sample's [T, T] scores)."""

OP_BYTES_PER_TOKEN = 8 + 1 + 4 * 4
"""What logprobs_and_entropy keeps per token besides the logits: the label's local column (int64), whether this
rank owns it (bool), and four fp32 row statistics (logit at the label, global max, 1/sum exp, E[z - M])."""

LOSS_BYTES_PER_TOKEN = 32
"""Allowance for the loss's own per-token saved tensors (ratio, clipped ratio, masks: about eight fp32 [T])."""

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_RSTD = 4
"""RMSNorm keeps its 1/rms in fp32, one per token."""


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one pipeline stage (one rank of it) for one data-parallel rank's micro-batches."""

    layer_bytes: int
    """Bytes one transformer layer keeps for the backward, for one micro-batch (under ``model.recompute``)."""
    layers: int
    """Transformer layers on this rank (all its virtual chunks)."""
    embedding_bytes: int
    """First stage: what the embedding keeps per micro-batch (tp > 1: masked ids and mask; 0 elsewhere)."""
    logits_bytes: int
    """Last stage: final norm + output layer + the vocab-parallel op's (and the loss's) saved tensors, plus the
    logits path's peak working memory (``logits_kept_bytes + logits_working_bytes``); 0 elsewhere."""
    in_flight: int
    """Micro-batches whose activations this rank holds at once: 1F1B pp - stage, interleaved Megatron's
    warm-up count + 1 chunk passes rounded up to whole micro-batches; 1 without pipeline parallelism."""
    train_bytes: int
    """Peak of the training forward+backward: the in-flight layer activations (+ embedding, + the schedule's
    kept stage outputs) plus the larger of the logits path (kept + working) and the recompute working set
    (the logits are freed before any layer's backward runs)."""
    forward_bytes: int
    """Peak of a forward-only pass (old log-probs; nothing kept): the residual stream plus the largest
    transient (attention, MLP, or the logits + the op's working memory)."""
    derivation: list[str]
    """Each term with its numbers written out."""
    logits_kept_bytes: int = 0
    """Last stage: the part of ``logits_bytes`` saved for the backward (what saved-tensor hooks see)."""
    logits_working_bytes: int = 0
    """Last stage: the part of ``logits_bytes`` that is transient (a second [n, V/tp] copy, the op's fp32 chunks)."""
    recompute_bytes: int = 0
    """Working set of recomputation during the backward: one layer's activations ('full'), one layer's core
    attention ('selective' with the local spec); 0 otherwise."""
    in_flight_layers: int = 0
    """Layer activations held at once: in_flight x layers (1F1B), chunk passes x layers per chunk (interleaved)."""
    pipeline_bytes: int = 0
    """Non-last stages: the stage outputs the schedule holds for the in-flight micro-batches' backward."""
    rope_table_bytes: int = 0
    """Full recompute: the fp32 rotary table [max_seq_len, head dim] the layer checkpoints keep, once per
    micro-batch in flight."""
    saved_bytes: int = 0
    """Peak of the bytes saved for the backward alone (train_bytes less logits working memory and the
    schedule's outputs): what the CPU validation measures with saved-tensor hooks."""


def _moe_mlp(model: ModelConfig, tokens: int, b: int, *, swiglu_copies: int) -> tuple[str, str, int]:
    """An MoE layer's kept activations for ``tokens`` tokens on this rank (Megatron's alltoall dispatcher, expert
    tp 1: a rank's experts receive, balanced, ``tokens x topk`` routed copies): the router's logits and
    probabilities (fp32, [tokens, E] each) and choices, then per routed copy the permuted input, the expert's
    SwiGLU (``swiglu_copies`` x its width, as the dense MLP) and its output kept for the probability-weighted
    un-permute."""
    k, e = model.moe_router_topk, model.num_experts
    width = model.moe_ffn_hidden_size or model.ffn_hidden_size
    h = model.hidden_size
    value = tokens * (2 * e * 4 + k * 12) + tokens * k * (2 * h + swiglu_copies * width) * b
    return (f"MoE MLP: router logits + probs (fp32) and top-{k} choices, then {k} routed copies per token: "
            f"permuted input, SwiGLU ({swiglu_copies} x {width}), expert output",
            f"{tokens} x (2 x {e} x 4 + {k} x 12) + {tokens} x {k} x (2 x {h} + {swiglu_copies} x {width}) x {b}",
            value)


@dataclass(frozen=True)
class _Shape:
    """The per-rank widths and sizes every term is written in."""

    n: int                  # tokens of one micro-batch on this rank (1/cp of them under context parallelism)
    s: int                  # the longest sample
    t: int                  # tensor-parallel size
    sp: int                 # t with sequence parallelism, else 1
    b: int                  # bytes per element of the params dtype
    h: int
    f: int                  # the dense MLP's width
    heads: int
    groups: int
    d: int                  # head dim
    q_w: int                # per-rank query (and attention output) width
    kv_w: int               # per-rank key/value width (a group is replicated when groups < tp)
    vocab: int              # padded vocabulary per rank
    packed: bool
    attention: str
    device: str
    c: int = 1              # context-parallel size
    @property
    def qkv_w(self) -> int:
        return self.q_w + 2 * self.kv_w

    @property
    def half(self) -> bool:
        return self.b < 4

    @property
    def layer_input(self) -> int:
        return self.n // self.sp * self.h * self.b


class _Terms:
    """The derivation's lines: each term named, written out and valued."""

    def __init__(self, first: str):
        self.lines = [first]

    def __call__(self, name: str, formula: str, value: int) -> int:
        self.lines.append(f"  {name}: {formula} = {value:,} bytes")
        return value

    def note(self, line: str) -> None:
        self.lines.append(line)


def _check(parallel: ParallelConfig, model: ModelConfig, *, micro_batch_tokens: int, max_seq_len: int, packed: bool,
           attention: str, stage: int, device: str) -> None:
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_KINDS}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected 'cuda' or 'cpu'")
    pp = parallel.pipeline_model_parallel_size
    if not 0 <= stage < pp:
        raise ValueError(f"stage={stage}: expected 0 .. {pp - 1} (parallel.pipeline_model_parallel_size={pp})")
    if micro_batch_tokens < 1 or max_seq_len < 1:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens}, max_seq_len={max_seq_len}: expected >= 1")
    if not packed and micro_batch_tokens % max_seq_len:
        raise ValueError(f"micro_batch_tokens={micro_batch_tokens} is not a whole number of padded rows of "
                         f"max_seq_len={max_seq_len}; pass rows x max_seq_len, or packed=True")
    if model.num_layers % pp:
        raise ValueError(f"model.num_layers={model.num_layers} does not split into {pp} pipeline stages")


def _shape(model: ModelConfig, parallel: ParallelConfig, *, n: int, s: int, packed: bool, attention: str,
           device: str) -> _Shape:
    t, c = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    heads, groups = model.num_attention_heads, model.num_query_groups
    d = model.kv_channels or model.hidden_size // heads
    return _Shape(n=-(-n // c), s=s, t=t, sp=t if parallel.sequence_parallel else 1, b=_BYTES[model.params_dtype],
                  h=model.hidden_size, f=model.ffn_hidden_size, heads=heads, groups=groups, d=d,
                  q_w=heads // t * d, kv_w=groups // t * d if groups >= t else d,
                  vocab=model.padded_vocab_size(t) // t, packed=packed, attention=attention, device=device, c=c)


def _norm(x: _Shape) -> tuple[str, int, str]:
    """One RMSNorm's (formula, bytes per token, what it keeps)."""
    if x.attention == "local" and x.device == "cpu":
        return (f"n/sp x (2 x h x 4 + 4 + h x {x.b})", 2 * x.h * 4 + _RSTD + x.h * x.b,
                "fp32 x and x*rstd, fp32 rstd, the output (the next linear's input)")
    return f"n/sp x (2 x h x {x.b} + 4)", 2 * x.h * x.b + _RSTD, "x, fp32 rstd, the output (the next linear's input)"


def _layer_terms(model: ModelConfig, parallel: ParallelConfig, x: _Shape, terms: _Terms):
    """(every term of one layer without recomputation, the core-attention terms selective recompute drops, what it
    keeps instead)."""
    n, b = x.n, x.b
    norm_formula, norm_per_token, norm_what = _norm(x)
    rope_rows = n if x.packed else x.s // x.c   # THD gathers the rotary table per token; padded rows share [s/cp, d]
    full = [(f"2 RMSNorms ({norm_what})", "2 x " + norm_formula, 2 * (n // x.sp) * norm_per_token),
            ("RoPE cos/sin of q and k", f"4 x {rope_rows} x {x.d} x {b}", 4 * rope_rows * x.d * b)]
    core, selective_kept = [], []
    if x.attention == "local":
        score_bytes = 4 + (b if x.half else 0)
        v_kept = x.q_w if x.heads > x.groups else x.qkv_w   # GQA: repeat_interleave copies v; MHA: a view of QKV
        qkv = ("q, k, v at heads/tp width (k, v repeated for GQA)", f"n x ({x.q_w} + {x.q_w} + {v_kept}) x {b}",
               n * (2 * x.q_w + v_kept) * b)
        if x.c > 1:     # local queries; k and v all-gathered over cp (the full length), then repeated for GQA
            qkv = ("q (this rank's tokens), k and v gathered over cp (cp x n) at heads/tp width",
                   f"(n x {x.q_w} + {x.c} x n x 2 x {x.q_w}) x {b}", (n + x.c * n * 2) * x.q_w * b)
        core = [
            qkv,
            (f"softmax {'fp32 + its ' + model.params_dtype + ' copy' if x.half else 'fp32'}, per head "
             f"{'<= budget x longest sample' if x.packed else 'rows x s^2'}",
             f"{x.heads // x.t} x {n} x {x.s} x {score_bytes}", x.heads // x.t * n * x.s * score_bytes),
            ("causal mask (bool)", f"{n} x {x.s}" if x.packed or x.c > 1 else f"{x.s} x {x.s}",
             n * x.s if x.packed or x.c > 1 else x.s * x.s),
        ]
        selective_kept = [("q, k after RoPE and the QKV output (v is a view of it), for the recomputation",
                           f"n x ({x.q_w} + {x.kv_w} + {x.qkv_w}) x {b}", n * (x.q_w + x.kv_w + x.qkv_w) * b)]
        mlp = ("SwiGLU MLP: fc1 out (2 x ffn/tp), silu out, the linear half's copy, fc2 in (ffn/tp each)",
               f"n x 5 x {x.f // x.t} x {b}", n * 5 * x.f // x.t * b)
        proj = [("attention output (linear_proj input)", f"n x {x.q_w} x {b}", n * x.q_w * b)]
    else:
        proj = [("q, k after RoPE, the QKV output (v is a view of it), attention output",
                 f"n x ({x.q_w} + {x.kv_w} + {x.qkv_w} + {x.q_w}) x {b}", n * (2 * x.q_w + x.kv_w + x.qkv_w) * b),
                ("softmax statistics (fp32 log-sum-exp per head)", f"n x {x.heads // x.t} x 4",
                 n * x.heads // x.t * 4)]
        mlp = ("SwiGLU MLP (fused): fc1 out (2 x ffn/tp), fc2 in (ffn/tp)", f"n x 3 x {x.f // x.t} x {b}",
               n * 3 * x.f // x.t * b)
    if model.is_moe:
        mlp = _moe_mlp(model, n // x.sp, b, swiglu_copies=5 if x.attention == "local" else 3)
        terms.note(f"  (MoE: every layer planned as an MoE layer, balanced routing over the experts of "
                   f"ep={parallel.expert_model_parallel_size}; a skewed step holds more)")
    return full + core + proj + [mlp], core, selective_kept


def _layer(model: ModelConfig, parallel: ParallelConfig, x: _Shape, terms: _Terms) -> tuple[int, int]:
    """(what one layer keeps for one micro-batch under model.recompute, the recompute working set)."""
    terms.note(f"layer ({model.recompute} recompute):")
    full, core, selective_kept = _layer_terms(model, parallel, x, terms)
    layer_none = sum(v for _, _, v in full)
    recompute = 0
    if model.recompute == "full":
        layer = terms("the layer's input, kept by the checkpoint", f"n/sp x h x {x.b}", x.layer_input)
        terms.note("recomputed during the backward, one layer at a time (its input is already kept):")
        for term in full:
            terms(*term)
        recompute = layer_none - x.layer_input
        terms.note(f"  recompute working set: {layer_none:,} - {x.layer_input:,} = {recompute:,} bytes")
    elif model.recompute == "selective" and x.attention == "local":
        layer = sum(terms(*term) for term in full if term not in core)
        layer += sum(terms(*term) for term in selective_kept)
        terms.note("recomputed during the backward, one layer's core attention at a time:")
        recompute = sum(terms(*term) for term in core)
    else:
        if model.recompute == "selective":
            terms.note("  (selective recompute with fused attention: it keeps no scores; same as none)")
        layer = sum(terms(*term) for term in full)
    terms.note(f"  one layer: {layer:,} bytes")
    return layer, recompute


def _in_flight(parallel: ParallelConfig, stage: int, layers: int, terms: _Terms) -> tuple[int, int]:
    """(micro-batches, layer activations) held at once under the pipeline schedule."""
    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size
    if pp == 1:
        terms.note(f"in flight: 1 micro-batch (no pipeline), {layers} layers")
        return 1, layers
    if vpp is None:
        in_flight = pp - stage
        terms.note(f"in flight (1F1B, at least pp micro-batches): pp - stage = {pp} - {stage} = {in_flight} "
                   f"micro-batches x {layers} layers")
        return in_flight, in_flight * layers
    passes = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1
    in_flight_layers = passes * layers // vpp
    terms.note(f"in flight (interleaved, Megatron's warm-up + 1): ({pp} - {stage} - 1) x 2 + ({vpp} - 1) x "
               f"{pp} + 1 = {passes} chunk passes x {layers // vpp} layers = {in_flight_layers} layers "
               f"(~{math.ceil(passes / vpp)} micro-batches)")
    return math.ceil(passes / vpp), in_flight_layers


def _logits(model: ModelConfig, x: _Shape, terms: _Terms) -> tuple[int, int]:
    """Last stage: (what the logits path keeps for the backward, its transient working memory)."""
    n, b, vocab = x.n, x.b, x.vocab
    norm_formula, norm_per_token, _ = _norm(x)
    terms.note("logits path (last stage):")
    kept = terms("final RMSNorm (its output: the output layer's input)", norm_formula, n // x.sp * norm_per_token)
    kept += terms(f"logits [n, V/tp] in {model.params_dtype}, kept by the log-prob op", f"n x {vocab} x {b}",
                  n * vocab * b)
    kept += terms("the op's per-token statistics + the loss's allowance",
                  f"n x ({OP_BYTES_PER_TOKEN} + {LOSS_BYTES_PER_TOKEN})", n * (OP_BYTES_PER_TOKEN + LOSS_BYTES_PER_TOKEN))
    rows = min(n, default_chunk_size(vocab, False, x.device))
    working = terms("a second [n, V/tp] copy (pre-transpose output, or temperature/padding copy)",
                    f"n x {vocab} x {b}", n * vocab * b)
    working += terms("the op's two fp32 chunk buffers", f"2 x {rows} x {vocab} x 4", 2 * rows * vocab * 4)
    return kept, working


def _forward_peak(model: ModelConfig, x: _Shape, last: bool, terms: _Terms) -> int:
    """A forward-only pass (nothing kept): the residual stream plus its largest transient."""
    n, b, t = x.n, x.b, x.t
    f = (model.moe_ffn_hidden_size or x.f) * model.moe_router_topk * t if model.is_moe else x.f  # routed copies
    gathered = n * x.h * b if x.sp > 1 else 0
    if x.attention == "local":
        attn = (n * (3 * x.q_w + x.qkv_w) * b + x.heads // t * n * x.s * (b + 4 + (b if x.half else 0))
                + (n * x.s if x.packed or x.c > 1 else x.s * x.s) + gathered + (x.c - 1) * n * 2 * x.kv_w * b)
        mlp = n * (x.h + 5 * f // t) * b + gathered
    else:
        attn = n * (2 * x.q_w + x.kv_w + x.qkv_w) * b + n * x.heads // t * 4 + gathered
        mlp = n * (x.h + 3 * f // t) * b + gathered
    logits = 0
    if last:
        logits = 2 * n * x.vocab * b + 2 * min(n, default_chunk_size(x.vocab, False, x.device)) * x.vocab * 4
    stream = 2 * n // x.sp * x.h * b
    forward = stream + max(attn, mlp, logits)
    terms.note(f"forward-only peak: residual stream 2 x n/sp x h x {b} = {stream:,} + max(attention {attn:,}, "
               f"MLP {mlp:,}, logits {logits:,}) = {forward:,} bytes")
    return forward


def estimate_activations(model: ModelConfig, parallel: ParallelConfig, *, micro_batch_tokens: int, max_seq_len: int,
                         packed: bool, attention: str, stage: int, device: str = "cuda") -> Activations:
    """Activation bytes of pipeline stage ``stage`` for micro-batches of ``micro_batch_tokens`` tokens.

    Args:
        model, parallel: the run's model and layout (``model.params_dtype`` sets the bytes per element,
            ``model.recompute`` what is kept, ``parallel.sequence_parallel`` divides the norm regions by tp).
        micro_batch_tokens: tokens of one micro-batch: the packed token budget, or rows x ``max_seq_len``.
        max_seq_len: the longest sample (prompt + response), in tokens.
        packed: THD packed micro-batches (samples back to back; the local attention's scores are bounded by
            the budget times the longest sample) rather than padded rows.
        attention: 'fused' (Transformer Engine spec) or 'local' (Megatron's local spec).
        stage: pipeline stage, 0 .. pp - 1.
        device: 'cuda' or 'cpu': where torch's RMSNorm is fused (the local spec's norms keep less on a GPU) and
            the op's chunk size.

    Returns:
        :class:`Activations`, bytes per rank.
    """
    _check(parallel, model, micro_batch_tokens=micro_batch_tokens, max_seq_len=max_seq_len, packed=packed,
           attention=attention, stage=stage, device=device)
    x = _shape(model, parallel, n=micro_batch_tokens, s=max_seq_len, packed=packed, attention=attention,
               device=device)
    pp = parallel.pipeline_model_parallel_size
    per_cp = f" of its {micro_batch_tokens} on this context-parallel rank (cp={x.c})" if x.c > 1 else ""
    terms = _Terms(f"n={x.n} tokens per micro-batch{per_cp} ({'packed, samples <= ' if packed else 'padded rows of '}"
                   f"{x.s}), "
                   f"h={x.h}, ffn={x.f}, heads={x.heads}, groups={x.groups}, head dim={x.d}, tp={x.t}"
                   f"{' with SP' if x.sp > 1 else ''}, {model.params_dtype} ({x.b} bytes), attention={attention}, "
                   f"recompute={model.recompute}, stage {stage} of pp={pp}")
    layer, recompute = _layer(model, parallel, x, terms)
    layers = model.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    in_flight, in_flight_layers = _in_flight(parallel, stage, layers, terms)
    embedding = terms("embedding (tp > 1): masked ids int64 + mask bool", f"{x.n} x 9", x.n * 9) \
        if first and x.t > 1 else 0
    rope_table = terms("rotary table kept by the checkpoints (fp32, per micro-batch)", f"{x.s} x {x.d} x 4",
                       x.s * x.d * 4) if model.recompute == "full" else 0
    pipeline = terms("stage outputs the schedule holds for the backward", f"{in_flight} x n/sp x h x {x.b}",
                     in_flight * x.layer_input) if not last else 0
    logits_kept, logits_working = _logits(model, x, terms) if last else (0, 0)
    stack = in_flight_layers * layer + in_flight * (embedding + rope_table)
    saved = max(stack + logits_kept, stack + recompute)
    train = max(stack + logits_kept + logits_working, stack + recompute) + pipeline
    terms.note(f"train peak: {in_flight_layers} x {layer:,} + {in_flight} x ({embedding:,} + {rope_table:,}) + "
               f"{pipeline:,} + max(logits {logits_kept:,} + {logits_working:,}, recompute {recompute:,}) = "
               f"{train:,} bytes")
    forward = _forward_peak(model, x, last, terms)
    return Activations(layer_bytes=layer, layers=layers, embedding_bytes=embedding,
                       logits_bytes=logits_kept + logits_working, in_flight=in_flight, train_bytes=train,
                       forward_bytes=forward, derivation=terms.lines, logits_kept_bytes=logits_kept,
                       logits_working_bytes=logits_working, recompute_bytes=recompute,
                       in_flight_layers=in_flight_layers, pipeline_bytes=pipeline, rope_table_bytes=rope_table,
                       saved_bytes=saved)
