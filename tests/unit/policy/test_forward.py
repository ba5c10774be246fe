"""PolicyForward.token_stats on one process: temperature, vocabulary padding and gradients against a plain
torch log_softmax reference; pad_from/has_padding of each tensor-parallel rank against a hand computation."""

import types

import pytest
import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.policy.forward import PolicyForward


def _ps(tp_rank=0, tp_size=1):
    return types.SimpleNamespace(tp_rank=tp_rank, tp_size=tp_size, tp_group=None)


def _forward(vocab, divisible_by, temperature, tp_rank=0, tp_size=1):
    cfg = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    return PolicyForward(None, cfg, _ps(tp_rank, tp_size), temperature=temperature)


def _reference(logits, labels, vocab, temperature):
    """log_softmax(z / T)[label] and the entropy of softmax(z / T), over the first `vocab` columns only."""
    z = logits[..., :vocab].double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _inputs(padded, vocab, seed=0, pad_value=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, padded, generator=g) * 3.0
    if pad_value is not None:
        logits[..., vocab:] = pad_value
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    return logits, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_without_padding(temperature):
    pf = _forward(vocab=16, divisible_by=8, temperature=temperature)
    assert (pf.pad_from, pf.has_padding) == (16, False)
    logits, labels = _inputs(16, 16)
    lp, ent = pf.token_stats(logits.clone(), labels)
    ref_lp, ref_ent = _reference(logits, labels, 16, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (2, 5)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("pad_value", [0.0, 1e4])
def test_padded_columns_are_excluded(temperature, pad_value):
    # vocab 13 padded to a multiple of 8: 16 columns, the last 3 are padding.
    pf = _forward(vocab=13, divisible_by=8, temperature=temperature)
    assert (pf.pad_from, pf.has_padding) == (13, True)
    logits, labels = _inputs(16, 13, seed=1, pad_value=pad_value)
    before = logits.clone()
    lp, ent = pf.token_stats(logits, labels)
    # The caller's logits are not modified by the forward (padding is written into a copy).
    assert torch.equal(logits, before)
    ref_lp, ref_ent = _reference(logits, labels, 13, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    # Including the padded columns would give something else (so the check above is not vacuous).
    full_lp, _ = _reference(logits, labels, 16, temperature)
    assert (full_lp - ref_lp).abs().max() > 1e-2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab, divisible_by", [(16, 8), (13, 8)])
def test_gradient_matches_reference(temperature, vocab, divisible_by):
    pf = _forward(vocab=vocab, divisible_by=divisible_by, temperature=temperature)
    logits, labels = _inputs(16, vocab, seed=2, pad_value=50.0 if vocab < 16 else None)
    g = torch.Generator().manual_seed(3)
    w_lp = torch.randn(2, 5, generator=g, dtype=torch.float64)
    w_ent = torch.randn(2, 5, generator=g, dtype=torch.float64)

    x = logits.clone().requires_grad_(True)
    # A non-leaf input: the op writes its gradient into the buffer it is given (inplace_backward).
    lp, ent = pf.token_stats(x * 1.0, labels)
    ((lp.double() * w_lp).sum() + (ent.double() * w_ent).sum()).backward()

    xr = logits.double().clone().requires_grad_(True)
    ref_lp, ref_ent = _reference(xr, labels, vocab, temperature)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()

    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    # Padded columns get no gradient.
    assert torch.equal(x.grad[..., vocab:], torch.zeros_like(x.grad[..., vocab:]))
    assert torch.equal(logits, x.detach())  # the leaf itself is untouched


def test_gradient_of_logprob_sum_only():
    pf = _forward(vocab=13, divisible_by=8, temperature=1.0)
    logits, labels = _inputs(16, 13, seed=4, pad_value=1e4)
    x = logits.clone().requires_grad_(True)
    lp, _ = pf.token_stats(x * 1.0, labels)
    lp.sum().backward()
    # d/dz sum log softmax(z)[label] = onehot(label) - softmax(z), over the real columns.
    p = torch.softmax(logits[..., :13].double(), dim=-1)
    expected = torch.nn.functional.one_hot(labels, 13).double() - p
    torch.testing.assert_close(x.grad[..., :13].double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(x.grad[..., 13:], torch.zeros(2, 5, 3))


def _local_padding_by_hand(vocab, padded, tp_size, tp_rank):
    """Which local columns of rank tp_rank hold global ids >= vocab (the padding)."""
    local = padded // tp_size
    return [tp_rank * local + c >= vocab for c in range(local)]


@pytest.mark.parametrize(
    "vocab, divisible_by, tp_size, expected",
    [
        # padded = ceil(V / (d * tp)) * d * tp; local = padded / tp; (pad_from, has_padding) per rank
        (10, 4, 2, [(8, False), (2, True)]),  # padded 16, local 8: global 10..15 padding, on rank 1
        (5, 4, 2, [(4, False), (1, True)]),  # padded 8, local 4
        (3, 4, 2, [(3, True), (0, True)]),  # padded 8: rank 1 holds padding only
        (16, 4, 2, [(8, False), (8, False)]),  # no padding at all
        (10, 1, 4, [(3, False), (3, False), (3, False), (1, True)]),  # padded 12, local 3
        (9, 2, 4, [(4, False), (4, False), (1, True), (0, True)]),  # padded 16, local 4: ids 9..15 padding
    ],
)
def test_pad_from_per_tp_rank(vocab, divisible_by, tp_size, expected):
    cfg = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    padded = cfg.padded_vocab_size(tp_size)
    local = padded // tp_size
    for rank in range(tp_size):
        pf = PolicyForward(None, cfg, _ps(rank, tp_size))
        by_hand = _local_padding_by_hand(vocab, padded, tp_size, rank)
        # Padding is a suffix of the local columns; pad_from is where it starts.
        first_pad = by_hand.index(True) if any(by_hand) else local
        assert all(by_hand[first_pad:]) and not any(by_hand[:first_pad])
        assert (pf.pad_from, pf.has_padding) == (first_pad, any(by_hand)), (rank, padded)
        assert (pf.pad_from, pf.has_padding) == expected[rank], (rank, padded)
