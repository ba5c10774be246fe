"""monitor/exact_entropy_change.py: the per-token first-order entropy change of a step, against a central finite
difference of the softmax entropy in float64 along the step's logit change, masked and chunked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_entcov.monitor.exact_entropy_change import exact_first_order_change


def _entropy(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 5])
def test_equals_the_derivative_of_the_entropy_along_the_step(rows_per_chunk):
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(3, 4, 11, generator=gen) * 2
    after = before + 0.3 * torch.randn(3, 4, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    got = exact_first_order_change(before, after, mask, rows_per_chunk=rows_per_chunk)
    z, dz, h = before.double().numpy(), (after - before).double().numpy(), 1e-5
    want = (_entropy(z + h * dz) - _entropy(z - h * dz)) / (2 * h) * mask.numpy()   # d/dt H(z + t dz) at 0
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    assert (got[mask == 0] == 0).all() and np.abs(want).max() > 1e-2


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="must agree"):
        exact_first_order_change(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), torch.ones(2, 3))
