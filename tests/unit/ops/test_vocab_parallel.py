"""ops.vocab_parallel.logprobs_and_entropy (tp_group=None) against a float64 reference, values and gradients.

Reference: float64 log_softmax, gather, -(p * log p).sum(-1) (with 0 * log 0 = 0), autograd for gradients,
on the *same* input values (bf16 inputs are upcast exactly to float64), so the only differences are ours.

Tolerances (|ours - ref| <= atol + rtol * |ref|), written down once:
  * values, any input dtype: rtol 1e-5, atol 1e-5. We compute in fp32: lse and the shifted sums over V terms
    carry a relative error of a few fp32 ulps (1.2e-7 each); logits up to 1e4 make |logprob| up to 2e4, so
    the error is relative, hence rtol.
  * gradients, fp32 input: rtol 1e-4, atol 1e-6. Each element is g * p * (...) with p <= 1 and O(1) upstream
    grads; fp32 rounding of exp(z - lse) and of the products gives a few ulps of the largest term.
  * gradients, bf16/fp16 input: the gradient is returned in the input dtype, rounded once from fp32, so the
    error is half an ulp of that dtype: rtol 2**-8 (bf16) / 2**-11 (fp16), plus the fp32 atol.
"""

from __future__ import annotations

import pytest
import torch

from megatron_entcov.ops.vocab_parallel import default_chunk_size, logprobs_and_entropy

VALUE_TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-8, "atol": 1e-6},
    torch.float16: {"rtol": 2**-11, "atol": 1e-6},
}


def _reference(logits, labels, g_lp, g_h):
    """float64 values and d(sum g_lp * logp + g_h * H)/d logits; g_lp / g_h may be None (output unused)."""
    z = logits.detach().to(torch.float64).requires_grad_()
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (logp * g_lp.double()).sum()
    if g_h is not None:
        loss = loss + (entropy * g_h.double()).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return logp.detach(), entropy.detach(), grad


def _ours(logits, labels, g_lp, g_h, **kwargs):
    z = logits.detach().clone().requires_grad_()
    logp, entropy = logprobs_and_entropy(z, labels, **kwargs)
    outs = [o for o, g in ((logp, g_lp), (entropy, g_h)) if g is not None]
    grads = [g for g in (g_lp, g_h) if g is not None]
    (grad,) = torch.autograd.grad(outs, z, grads)
    return logp.detach(), entropy.detach(), grad, z


def _assert_matches(ours, ref, dtype):
    logp, entropy, grad = ours[:3]
    ref_logp, ref_entropy, ref_grad = ref
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert grad.dtype == dtype
    torch.testing.assert_close(logp.double(), ref_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, **VALUE_TOL)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL[dtype])


def _batch(shape, vocab, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    g_lp = torch.randn(shape, generator=g)
    g_h = torch.randn(shape, generator=g)
    return logits, labels, g_lp, g_h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_matches_float64_reference(dtype, chunk_size):
    # [B, T] = [3, 9]: 27 rows, so chunk 7 leaves a 6-row tail.
    logits, labels, g_lp, g_h = _batch((3, 9), 301, dtype)
    ours = _ours(logits, labels, g_lp, g_h, chunk_size=chunk_size)
    assert ours[0].shape == (3, 9) and ours[2].shape == logits.shape
    _assert_matches(ours, _reference(logits, labels, g_lp, g_h), dtype)


@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_gradient_of_each_output_alone(which):
    logits, labels, g_lp, g_h = _batch((20,), 257, torch.float32, seed=1)
    g_lp, g_h = (g_lp, None) if which == "logprobs" else (None, g_h)
    ours = _ours(logits, labels, g_lp, g_h, chunk_size=6)
    _assert_matches(ours, _reference(logits, labels, g_lp, g_h), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(dtype):
    logits, labels, g_lp, g_h = _batch((4, 8), 200, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    logits = ((torch.rand(logits.shape, generator=g, dtype=torch.float64) * 2 - 1) * 1e4).to(dtype)
    logits[0, :, :] = -1e4  # a nearly uniform row with one dominant logit
    logits[0, :, 5] = 1e4
    labels[0, :4] = 5  # certain token: logprob 0, entropy 0
    ours = _ours(logits, labels, g_lp, g_h, chunk_size=5)
    ref = _reference(logits, labels, g_lp, g_h)
    _assert_matches(ours, ref, dtype)
    assert ours[0][0, :4].abs().max() == 0 and ours[1][0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_padding_columns(dtype):
    """Vocab padding (-inf logits): p = 0 and p log p = 0 there; no NaN in values or gradients."""
    logits, labels, g_lp, g_h = _batch((17,), 160, dtype, seed=4)
    logits[:, -32:] = float("-inf")
    logits[3, :-33] = float("-inf")  # a row with a single finite logit: certain, entropy 0
    labels = labels % 128
    labels[3] = 127
    ours = _ours(logits, labels, g_lp, g_h, chunk_size=4)
    _assert_matches(ours, _reference(logits, labels, g_lp, g_h), dtype)
    grad = ours[2]
    assert (grad[:, -32:] == 0).all()
    assert ours[0][3] == 0 and ours[1][3] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_logits(dtype):
    logits, labels, g_lp, g_h = _batch((2, 11), 96, dtype, seed=5)
    _, _, expected, _ = _ours(logits, labels, g_lp, g_h, chunk_size=3)
    logp, entropy, grad, buffer = _ours(logits, labels, g_lp, g_h, chunk_size=3, inplace_backward=True)
    assert grad.data_ptr() == buffer.data_ptr()  # no new [T, V] tensor
    assert torch.equal(buffer.detach(), expected)  # the logits buffer now holds the gradient
    assert torch.equal(grad, expected)


def test_inplace_backward_detects_other_users_of_logits():
    """Another op that saved the logits for its backward must not see them overwritten silently."""
    logits, labels, g_lp, _ = _batch((6,), 32, torch.float32, seed=6)
    z = logits.clone().requires_grad_()
    y = z * 1.0  # non-leaf logits, as produced by the output layer
    other = (y * y).sum()  # saves y; its backward runs after ours (autograd runs later nodes first)
    logp, _ = logprobs_and_entropy(y, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


def test_noncontiguous_logits():
    logits, labels, g_lp, g_h = _batch((12,), 64, torch.float32, seed=7)
    transposed = logits.t().contiguous().t()  # same values, column-major
    assert not transposed.is_contiguous()
    ours = _ours(transposed, labels, g_lp, g_h, chunk_size=5)
    _assert_matches(ours, _reference(logits, labels, g_lp, g_h), torch.float32)


def test_no_grad_and_empty_input():
    logits, labels, _, _ = _batch((5,), 40, torch.float32, seed=8)
    with torch.no_grad():
        logp, entropy = logprobs_and_entropy(logits, labels)
    ref_logp, ref_entropy, _ = _reference(logits, labels, None, torch.zeros(5))
    torch.testing.assert_close(logp.double(), ref_logp, **VALUE_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, **VALUE_TOL)
    logp, entropy = logprobs_and_entropy(torch.zeros(2, 0, 40), torch.zeros(2, 0, dtype=torch.long))
    assert logp.shape == entropy.shape == (2, 0)


def test_label_validation():
    logits, labels, _, _ = _batch((6,), 50, torch.float32, seed=9)
    for bad in (-100, 50):
        labels_bad = labels.clone()
        labels_bad[2] = bad
        with pytest.raises(ValueError, match=r"labels: expected token ids in \[0, 50\)"):
            logprobs_and_entropy(logits, labels_bad, check_labels=True)
        # Unchecked (the default, no host sync): finite logprob -lse for that token, the rest untouched.
        logp, entropy = logprobs_and_entropy(logits, labels_bad)
        ref_logp, ref_entropy, _ = _reference(logits, labels, None, torch.zeros(6))
        torch.testing.assert_close(logp[2].double(), -torch.logsumexp(logits[2].double(), -1), **VALUE_TOL)
        torch.testing.assert_close(logp[[0, 1, 3, 4, 5]].double(), ref_logp[[0, 1, 3, 4, 5]], **VALUE_TOL)
        torch.testing.assert_close(entropy.double(), ref_entropy, **VALUE_TOL)
    with pytest.raises(ValueError, match="labels: expected shape"):
        logprobs_and_entropy(logits, labels[:3])
    with pytest.raises(TypeError, match="labels: expected an integer dtype"):
        logprobs_and_entropy(logits, labels.float())
    with pytest.raises(TypeError, match="logits: expected a floating dtype"):
        logprobs_and_entropy(labels[:, None].expand(6, 50), labels)


def test_default_chunk_size_bounds_the_working_set():
    assert default_chunk_size(32768) == 32  # 1M fp32 elements = 4 MiB per temporary
    assert default_chunk_size(152064) == 6
    assert default_chunk_size(4_000_000) == 1
    assert default_chunk_size(32768, use_compile=True) == 128


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_compiled_kernels_match_eager(dtype):
    """torch.compile'd fused kernels give the eager results to fp32 rounding (compiles ~4 kernels: ~8 s per
    dtype; bfloat16 in the slow tier, the training path with compiled kernels is in test_layout_invariance)."""
    logits, labels, g_lp, g_h = _batch((3, 7), 384, dtype, seed=10)  # 21 rows, chunk 8: padded 5-row tail
    eager = _ours(logits, labels, g_lp, g_h, chunk_size=8, use_compile=False)
    compiled = _ours(logits, labels, g_lp, g_h, chunk_size=8, use_compile=True)
    inplace = _ours(logits, labels, g_lp, g_h, chunk_size=8, use_compile=True, inplace_backward=True)
    for out in (compiled, inplace):
        torch.testing.assert_close(out[0], eager[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1], eager[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[2], eager[2], **GRAD_TOL[dtype])
    assert inplace[2].data_ptr() == inplace[3].data_ptr()
    _assert_matches(compiled, _reference(logits, labels, g_lp, g_h), dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_path_without_compiling(monkeypatch, dtype, inplace):
    """The compiled path (fused kernels, padded tail chunk, in-place kernel), run uncompiled: fast coverage
    of its logic and formulas; test_compiled_kernels_match_eager covers inductor itself."""
    from megatron_entcov.ops import vocab_parallel

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(vocab_parallel, "_compiled", {})
    monkeypatch.setattr(vocab_parallel, "_compile_failed", False)
    logits, labels, g_lp, g_h = _batch((3, 7), 96, dtype, seed=12)  # 21 rows, chunk 8: padded 5-row tail
    logits[..., -8:] = float("-inf")
    labels = labels % 88
    ours = _ours(logits, labels, g_lp, g_h, chunk_size=8, use_compile=True, inplace_backward=inplace)
    _assert_matches(ours, _reference(logits, labels, g_lp, g_h), dtype)
    assert (ours[2].data_ptr() == ours[3].data_ptr()) == inplace


@pytest.mark.parametrize("fail_in", ["_fwd", "_bwd"])
def test_compile_failure_falls_back_to_eager(monkeypatch, caplog, fail_in):
    """A broken compiler (e.g. no C++ toolchain) must give the eager results, with a warning, not an error,
    whether it fails on the forward kernel or only later on a backward kernel."""
    from megatron_entcov.ops import vocab_parallel

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run if fn.__name__.startswith(fail_in) else fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(vocab_parallel, "_compiled", {})
    monkeypatch.setattr(vocab_parallel, "_compile_failed", False)
    logits, labels, g_lp, g_h = _batch((9,), 64, torch.float32, seed=11)
    with caplog.at_level("WARNING", logger=vocab_parallel.__name__):
        ours = _ours(logits, labels, g_lp, g_h, chunk_size=4, use_compile=True, inplace_backward=True)
    assert "torch.compile failed" in caplog.text
    _assert_matches(ours, _reference(logits, labels, g_lp, g_h), torch.float32)
