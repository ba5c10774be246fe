"""Streaming log-probabilities and entropy over vocab-parallel logits.

Owns `logprobs_and_entropy`: for logits sharded along the vocab dim in Megatron's VocabParallelEmbedding
layout (rank r of the tp group holds global ids [r * V_local, (r + 1) * V_local)), it returns
log pi(label) and the entropy of pi = softmax(logits) over the *full* vocab, through a custom
autograd.Function whose backward gives the exact gradient of both outputs w.r.t. this rank's shard. Forward
streams once over the shard in row chunks (fp32 per chunk, online-softmax sums), with two collectives on
[T]-sized tensors; backward saves four floats per token (no softmax), recomputes per chunk and needs no
communication; ``inplace_backward=True`` writes the gradient into the logits buffer. Vocabulary padding (-inf
logits) is exact. Two interchangeable chunk kernels: eager torch (default) and torch.compile'd fused kernels
(``use_compile=True`` or MEGATRON_ENTCOV_VOCAB_COMPILE=1), equal to fp32 rounding.

Design notes (the derivation, memory, the compiled kernels; measurements: bench/vocab_parallel.py):
docs/design/ops.md
"""

from __future__ import annotations

import logging
import os
import types
from typing import Callable

import torch
import torch.distributed as dist

from megatron_entcov.distributed import collectives

logger = logging.getLogger(__name__)

COMPILE_ENV_VAR = "MEGATRON_ENTCOV_VOCAB_COMPILE"
"""Set to 1 to use the torch.compile'd chunk kernels when `use_compile` is not given."""

_CHUNK_ELEMS_EAGER = 1 << 20
"""Default elements per chunk for the eager kernels: 4 MiB per fp32 [rows, V_local] temporary, two of them
per chunk. Small enough to stay in the L2/L3 caches of a CPU and negligible next to the logits on a GPU;
large enough to amortise per-op overhead (on the bench machine 256K..4M elements time within noise)."""

_CHUNK_ELEMS_COMPILED = 1 << 22
"""Default elements per chunk for the fused kernels, which keep no [rows, V_local] temporaries (the only
chunk-sized buffer is the padded tail, in the logits' dtype: 16 MiB in fp32). Larger chunks mean fewer
kernel launches and thread barriers: 4M elements is ~15% faster than 1M on the bench machine."""

_CHUNK_ELEMS_GPU = 1 << 24
"""Default elements per chunk on an accelerator (eager or compiled): 64 MiB per fp32 temporary. There the
cost per chunk is kernel launches (~10 per chunk and direction), so chunks are made large; the working set
stays a small fraction of the [T, V/tp] logits of a real micro-batch (GiBs). Not tuned: no GPU in CI."""

_LOG_FLOOR = -1000.0
"""Floor applied to the shifted logits z - m (forward, local max) and z - M (backward, global max) before
they multiply exp of themselves. exp(x) is exactly 0 in fp32 for x < -104 (half the smallest denormal), so
the floor changes no probability; it only turns -inf (vocab padding) into a finite number so that
0 * log 0 = 0 instead of NaN, while staying small enough that g_H * floor cannot overflow to inf for any
sane upstream gradient (|g_H| < 3e35)."""

__all__ = ["COMPILE_ENV_VAR", "default_chunk_size", "logprobs_and_entropy"]


def default_chunk_size(vocab_local: int, use_compile: bool = False, device_type: str = "cpu") -> int:
    """Rows per chunk such that a [rows, vocab_local] chunk holds about 1M elements (CPU, eager),
    4M elements (CPU, compiled) or 16M elements (any other device)."""
    if device_type != "cpu":
        elems = _CHUNK_ELEMS_GPU
    else:
        elems = _CHUNK_ELEMS_COMPILED if use_compile else _CHUNK_ELEMS_EAGER
    return max(1, elems // max(1, vocab_local))


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
    use_compile: bool | None = None,
    check_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `labels` and entropy of softmax(logits) over the full (tensor-parallel) vocab.

    logits [..., V/tp] (this rank's vocab shard, any float dtype), labels [...] global token ids.
    Returns (logprobs [...], entropy [...]) in float32, both differentiable w.r.t. logits.
    tp_group=None means the whole vocab is local (no communication). The sum over the full vocab is exact
    across shards; the result does not depend on tp size beyond float rounding.

    Args:
        logits: [..., V_local] float32/bfloat16/float16, this rank's shard of the vocab dim; rank r of
            `tp_group` owns global token ids [r * V_local, (r + 1) * V_local). Never copied in full (a
            non-contiguous input is made contiguous first, which does copy it).
        labels: [...] integer global token ids, same leading shape as `logits`. They must lie in
            [0, V_local * tp_size). Checking that needs a host sync, so it is the caller's job unless
            `check_labels=True`. Without the check, a label outside the vocab (e.g. -100) gives a finite,
            meaningless logprob (its logit counts as 0, i.e. logprob = -lse) and no NaN, so a masked loss
            stays finite; its entropy is correct.
        tp_group: tensor-parallel group over which the vocab is sharded; None: single process, whole vocab.
        chunk_size: rows per chunk; default `default_chunk_size(V_local, use_compile, logits.device.type)`.
            Peak extra memory of forward and of in-place backward is about two fp32 [chunk_size, V_local]
            temporaries (eager) or one padded [chunk_size, V_local] tail chunk (compiled), plus O(T) floats.
        inplace_backward: write the gradient into the logits buffer instead of a new tensor. The logits must
            not be needed by anything else after this op's backward (autograd raises if another op saved
            them for its own backward, thanks to the version counter).
        use_compile: use the torch.compile'd fused chunk kernels; None reads MEGATRON_ENTCOV_VOCAB_COMPILE.
        check_labels: validate label range (host sync; a debugging aid), raising ValueError.

    Returns:
        (logprobs, entropy), each float32 [...] (the leading shape of `logits`); per token, not reduced.
        Identical on every rank of `tp_group`.
    """
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating dtype, got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {labels.dtype}")
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    vocab_local = logits.shape[-1]
    if vocab_local == 0:
        raise ValueError("logits: the vocab dim is empty")
    if use_compile is None:
        use_compile = os.environ.get(COMPILE_ENV_VAR, "0") not in ("", "0", "false", "False")
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_local, use_compile, logits.device.type)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")

    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    vocab_global = vocab_local * tp_size
    if check_labels:
        bad = (labels < 0) | (labels >= vocab_global)
        if bool(bad.any()):  # host sync: only on request
            raise ValueError(
                f"labels: expected token ids in [0, {vocab_global}), got {int(bad.sum())} outside, "
                f"e.g. {labels[bad].flatten()[:5].tolist()}; mask ignored positions in the loss instead of "
                "using ignore ids"
            )

    lead_shape = logits.shape[:-1]
    logits2d = logits.reshape(-1, vocab_local)
    if not logits2d.is_contiguous():
        logits2d = logits2d.contiguous()
    # Local column of each label and whether this rank owns it; computed once on [T], not per chunk.
    local = labels.reshape(-1).to(device=logits.device, dtype=torch.long) - tp_rank * vocab_local
    in_shard = (local >= 0) & (local < vocab_local)
    idx = local.clamp(0, vocab_local - 1)

    logprobs, entropy = _LogprobsEntropy.apply(
        logits2d, idx, in_shard, tp_group, tp_size, chunk_size, inplace_backward, use_compile
    )
    return logprobs.view(lead_shape), entropy.view(lead_shape)


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, idx, in_shard, tp_group, tp_size, chunk_size, inplace_backward, use_compile):
        m, s0, s1 = _forward_sums(logits2d, chunk_size, use_compile)
        # Logit at each label's (clamped) local column; kept for backward, which fixes those entries last.
        z_at_idx = logits2d.gather(1, idx[:, None]).squeeze(1).float()
        if tp_size > 1:
            m_global = m.clone()
            collectives.all_reduce(m_global, op="max", group=tp_group)
        else:
            m_global = m
        # Rescale this shard's sums to the global max. A shard whose row is all -inf (vocab padding) has
        # m = -inf and s0 = s1 = 0; exp(m - M) and (m - M) * s0 would give NaN there, hence the mask.
        finite = m > float("-inf")
        delta = torch.where(finite, m - m_global, 0.0)
        scale = torch.where(finite, torch.exp(delta), 0.0)
        z_label = torch.where(in_shard, z_at_idx, 0.0)  # only the owning rank contributes the label logit
        packed = torch.stack([scale * s0, scale * (s1 + delta * s0), z_label])  # [3, T]
        if tp_size > 1:
            collectives.all_reduce(packed, op="sum", group=tp_group)
        sum_exp, sum_exp_shift, z_label = packed.unbind(0)
        log_sum_exp = torch.log(sum_exp)
        mean_shift = sum_exp_shift / sum_exp  # E_pi[z - M] <= 0
        entropy = log_sum_exp - mean_shift
        # lse = M + log S0 is never formed: (z - M) - log S0 keeps the precision of log p when |z| ~ 1e4,
        # where an fp32 lse would carry an absolute error of ulp(1e4) ~ 1e-3.
        logprobs = (z_label - m_global) - log_sum_exp

        ctx.save_for_backward(logits2d, idx, in_shard, z_at_idx, m_global, sum_exp.reciprocal(), mean_shift)
        ctx.chunk_size = chunk_size
        ctx.inplace_backward = inplace_backward
        ctx.use_compile = use_compile
        ctx.set_materialize_grads(False)  # an unused output gets grad None: skip its term
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        nones = (None,) * 7
        if grad_logprobs is None and grad_entropy is None:
            return (None,) + nones
        logits2d, idx, in_shard, z_at_idx, m_global, inv_sum_exp, mean_shift = ctx.saved_tensors
        logits2d = logits2d.detach()
        row_stats = (m_global, inv_sum_exp, mean_shift)
        # [T] floats; contiguous so that the compiled kernels always see the same strides. A missing
        # upstream grad is a zero grad (the eager kernels skip its term, the fused ones need a tensor).
        zeros = None
        if grad_logprobs is None or grad_entropy is None:
            zeros = torch.zeros_like(m_global)
        g_lp = zeros if grad_logprobs is None else grad_logprobs.float().contiguous()
        g_h = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        # In place: same storage; the writes bump its version counter, so autograd catches other readers.
        grad_logits = logits2d if ctx.inplace_backward else torch.empty_like(logits2d)
        _backward_chunks(
            logits2d, row_stats, g_lp, None if grad_entropy is None else g_h, grad_logits,
            ctx.chunk_size, ctx.use_compile,
        )
        _fix_label_entries(grad_logits, z_at_idx, row_stats, g_lp, g_h, idx, in_shard)
        return (grad_logits,) + nones


# ---------------------------------------------------------------------------------------------------------
# Chunk loops


def _forward_sums(logits2d, chunk_size, use_compile):
    """Per-row local max m, s0 = sum exp(z - m), s1 = sum exp(z - m) (z - m); fp32 [T] each."""
    num_rows, vocab = logits2d.shape
    dev = logits2d.device
    m = torch.empty(num_rows, dtype=torch.float32, device=dev)
    s0 = torch.empty_like(m)
    s1 = torch.empty_like(m)
    if use_compile and _compile_enabled():
        chunk_size = _compiled_chunk_rows(chunk_size, num_rows)
        scratch = None
        for start in range(0, num_rows, chunk_size):
            z = logits2d[start : start + chunk_size]
            rows = z.shape[0]
            if rows < chunk_size:  # pad the tail chunk to the one compiled shape
                if scratch is None:
                    scratch = torch.zeros(chunk_size, vocab, dtype=logits2d.dtype, device=dev)
                scratch[:rows].copy_(z)
                z = scratch
            out = _call_compiled("fwd", _fwd_chunk_fused, z)
            if out is None:  # compilation failed: the eager loop redoes the work
                return _forward_sums(logits2d, chunk_size, use_compile=False)
            for dst, src in zip((m, s0, s1), out):
                dst[start : start + rows].copy_(src[:rows])
        return m, s0, s1

    rows_max = min(chunk_size, num_rows)
    buf_a = torch.empty(rows_max, vocab, dtype=torch.float32, device=dev)
    buf_b = torch.empty_like(buf_a)
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        _fwd_chunk_eager(
            logits2d[start:stop], buf_a[: stop - start], buf_b[: stop - start],
            m[start:stop], s0[start:stop], s1[start:stop],
        )
    return m, s0, s1


def _backward_chunks(logits2d, row_stats, g_lp, g_h, grad_logits, chunk_size, use_compile):
    """Writes -p * (g_lp + g_h * (log p + H)) into grad_logits [T, V_local] (may alias logits2d).

    That is the gradient everywhere except at the label entries, which `_fix_label_entries` overwrites.
    row_stats = (M, 1 / S0, E_pi[z - M]), fp32 [T] each, global over the tp group. g_lp [T] is a tensor
    (zeros if logprobs got no gradient); g_h is None when entropy got no gradient.
    """
    num_rows, vocab = logits2d.shape
    dev = logits2d.device
    if use_compile and _compile_enabled():
        chunk_size = _compiled_chunk_rows(chunk_size, num_rows)
        g_h_t = torch.zeros_like(g_lp) if g_h is None else g_h
        aliased = grad_logits.data_ptr() == logits2d.data_ptr()
        for start in range(0, num_rows, chunk_size):
            stop = min(start + chunk_size, num_rows)
            rows = stop - start
            per_row = [t[start:stop] for t in (*row_stats, g_lp, g_h_t)]
            z = logits2d[start:stop]
            if rows < chunk_size:  # pad the tail chunk to the one compiled shape (padding rows: zeros)
                z_pad = torch.zeros(chunk_size, vocab, dtype=logits2d.dtype, device=dev)
                z_pad[:rows].copy_(z)
                per_row = [_pad_rows(t, chunk_size) for t in per_row]
                ok = _call_compiled("bwd_inplace", _bwd_chunk_inplace, z_pad, *per_row)
                if ok is not None:
                    grad_logits[start:stop].copy_(z_pad[:rows])
            elif aliased:
                ok = _call_compiled("bwd_inplace", _bwd_chunk_inplace, z, *per_row)
            else:
                ok = _call_compiled("bwd_out", _bwd_chunk_out, z, *per_row, grad_logits[start:stop])
            if ok is None:
                # Compilation failed before anything was written (it fails on the first call of a kernel),
                # so the eager loop can redo everything from `start` on.
                _backward_chunks(
                    logits2d[start:], tuple(t[start:] for t in row_stats),
                    g_lp[start:], None if g_h is None else g_h[start:], grad_logits[start:],
                    chunk_size, use_compile=False,
                )
                return
        return

    rows_max = min(chunk_size, num_rows)
    buf_a = torch.empty(rows_max, vocab, dtype=torch.float32, device=dev)
    buf_b = torch.empty_like(buf_a)
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        rows = stop - start
        _bwd_chunk_eager(
            logits2d[start:stop], *(t[start:stop] for t in row_stats),
            g_lp[start:stop], None if g_h is None else g_h[start:stop],
            grad_logits[start:stop], buf_a[:rows], buf_b[:rows],
        )


def _fix_label_entries(grad_logits, z_at_idx, row_stats, g_lp, g_h, idx, in_shard):
    """Overwrites grad_logits[t, idx[t]] with the full gradient there, onehot term included.

    Done once on [T] entries after the chunk loop rather than inside the kernels: a per-element onehot
    comparison costs ~30% of the fused backward kernel. Rows whose label is on another rank get their
    (clamped) column rewritten without the onehot term, i.e. with the value the kernel wrote, in fp32 and
    rounded once to the gradient dtype.
    """
    m_global, inv_sum_exp, mean_shift = row_stats
    d = (z_at_idx - m_global).clamp_min(_LOG_FLOOR)
    p = torch.exp(d) * inv_sum_exp
    value = torch.where(in_shard, g_lp, 0.0) - p * (g_lp + g_h * (d - mean_shift))
    rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
    grad_logits.index_put_((rows, idx), value.to(grad_logits.dtype))


def _compiled_chunk_rows(chunk_size: int, num_rows: int) -> int:
    """The one row count the compiled kernels see. Capped at the next power of two of the row count, so a
    short input is not padded up to a huge chunk, while distinct shapes (compilations) stay few."""
    return max(1, min(chunk_size, 1 << max(0, num_rows - 1).bit_length()))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, dtype=t.dtype, device=t.device)
    out[: t.shape[0]].copy_(t)
    return out


# ---------------------------------------------------------------------------------------------------------
# Eager chunk kernels: preallocated fp32 scratch and out= ops, so a chunk costs no allocation of its size.


def _fwd_chunk_eager(z, buf_a, buf_b, m_out, s0_out, s1_out):
    """z [C, V] any float dtype; buf_a, buf_b fp32 [C, V] scratch; writes m, s0, s1 (fp32 [C])."""
    zf = z if z.dtype == torch.float32 else buf_a.copy_(z)
    m = zf.amax(dim=-1, keepdim=True)
    # A row whose shard is all -inf (padding) would give -inf - (-inf) = NaN: shift it by 0 instead.
    m_shift = m.masked_fill(m == float("-inf"), 0.0)
    d = torch.sub(zf, m_shift, out=buf_a)
    # -inf columns: exp(-inf) = 0, but 0 * (-inf) = NaN in s1; a finite floor makes the product 0.
    d.clamp_min_(_LOG_FLOOR)
    e = torch.exp(d, out=buf_b)
    torch.sum(e, dim=-1, out=s0_out)
    torch.sum(d.mul_(e), dim=-1, out=s1_out)
    m_out.copy_(m.squeeze(-1))


def _bwd_chunk_eager(z, m_global, inv_sum_exp, mean_shift, g_lp, g_h, out, buf_a, buf_b):
    """-p * (g_lp + g_h * (log p + H)) for one chunk, written into out (may alias z); no onehot term.

    With d = z - M, p = exp(d) / S0 and log p + H = d - E_pi[d]: both factors are formed from d, which is
    exact where p matters, instead of from z - lse, which loses ulp(|z|) when logits are large.
    """
    zf = z if z.dtype == torch.float32 else buf_a.copy_(z)
    d = torch.sub(zf, m_global[:, None], out=buf_a)
    d.clamp_min_(_LOG_FLOOR)  # -inf columns: exp gives 0, which must meet a finite d, not -inf
    e = torch.exp(d, out=buf_b)
    # fp32 grads go straight into `out`; others are finished in fp32 and rounded once at the end.
    res = out if out.dtype == torch.float32 else buf_b
    if g_h is None:
        torch.mul(e, (-g_lp * inv_sum_exp)[:, None], out=res)
    else:
        # -(g_lp + g_h * (d - E[d])) / S0 = k * d + c per row, with k = -g_h / S0 and
        # c = (g_h E[d] - g_lp) / S0: two in-place passes over d (faster here than one broadcast addcmul).
        c = (g_h * mean_shift - g_lp) * inv_sum_exp
        t = d.mul_((-g_h * inv_sum_exp)[:, None]).add_(c[:, None])
        torch.mul(e, t, out=res)
    if res is not out:
        out.copy_(res)


# ---------------------------------------------------------------------------------------------------------
# Fused chunk kernels (torch.compile targets): the same formulas, written without out= so inductor can
# fuse each into a couple of loops over the row (max, then sums; or one elementwise loop in backward).


def _fwd_chunk_fused(z):
    zf = z.float()
    m = zf.amax(dim=-1, keepdim=True)
    m_shift = torch.where(m == float("-inf"), 0.0, m)
    d = (zf - m_shift).clamp_min(_LOG_FLOOR)
    e = torch.exp(d)
    return m.squeeze(-1), e.sum(dim=-1), (e * d).sum(dim=-1)


def _bwd_chunk_fused(z, m_global, inv_sum_exp, mean_shift, g_lp, g_h):
    d = (z.float() - m_global[:, None]).clamp_min(_LOG_FLOOR)
    p = torch.exp(d) * inv_sum_exp[:, None]
    return (-p * (g_lp[:, None] + g_h[:, None] * (d - mean_shift[:, None]))).to(z.dtype)


def _bwd_chunk_out(z, m_global, inv_sum_exp, mean_shift, g_lp, g_h, out):
    out.copy_(_bwd_chunk_fused(z, m_global, inv_sum_exp, mean_shift, g_lp, g_h))


def _bwd_chunk_inplace(z, m_global, inv_sum_exp, mean_shift, g_lp, g_h):
    # A separate kernel instead of passing z as `out`: inputs that alias each other make a slower graph.
    z.copy_(_bwd_chunk_fused(z, m_global, inv_sum_exp, mean_shift, g_lp, g_h))


_compiled: dict[tuple, Callable] = {}
_compile_failed = False


def _compile_enabled() -> bool:
    return not _compile_failed


def _call_compiled(name: str, fn: Callable, *args):
    """Runs torch.compile(fn) on args, built lazily and cached per (kernel, shapes, dtypes, device).

    Returns None if compilation fails (the caller falls back to eager), `True` for kernels that return
    nothing, else the kernel's outputs.
    """
    global _compile_failed
    key = (name,) + tuple((tuple(a.shape), a.dtype, a.device.type) for a in args)
    compiled = _compiled.get(key)
    if compiled is None:
        logger.info("vocab_parallel: compiling chunk kernel %s for %s (one-off)", name, key[1:])
        # Each specialisation gets its own copy of the code object, hence its own dynamo cache: shapes
        # and dtypes of one kernel then never count against dynamo's per-function recompile limit.
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_compiled)}")
        fn_copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        compiled = _compiled[key] = torch.compile(fn_copy, dynamic=False, fullgraph=True)
    try:
        out = compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means "use eager", never a wrong result
        _compile_failed = True
        logger.warning("vocab_parallel: torch.compile failed (%s: %s); using eager kernels", type(exc).__name__, exc)
        return None
    return True if out is None else out
