"""entropy_law.py: first-order entropy change vs finite differences and PG updates; the R-H law fit."""

import math

import numpy as np
import pytest
import torch

from megatron_entcov.entropy_law import (
    EntropyLawFit,
    entropy_change_first_order,
    fit_entropy_law,
    law_caveats,
    predicted_ceiling,
    softmax_entropy,
)


def _cov_pi(pi, x, y):
    """Cov_{a~pi}(x, y) along the last dim, written out."""
    ex = (pi * x).sum(-1, keepdim=True)
    ey = (pi * y).sum(-1, keepdim=True)
    return (pi * (x - ex) * (y - ey)).sum(-1)


@pytest.mark.parametrize("seed", range(3))
def test_first_order_matches_finite_difference(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(16, 50, generator=g, dtype=torch.float64) * 2.0   # 16 random softmax policies
    dz = torch.randn(16, 50, generator=g, dtype=torch.float64)
    for eps in (1e-5, 1e-6):  # second-order term: relative error ~ eps / |Cov| (3e-3 at eps=1e-4)
        measured = softmax_entropy(z + eps * dz) - softmax_entropy(z)
        predicted = entropy_change_first_order(z, eps * dz)
        rel = ((measured - predicted).abs() / predicted.abs()).max().item()
        assert rel < 1e-3, (eps, rel)


def test_vanilla_and_natural_pg_updates():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(8, 30, generator=g, dtype=torch.float64) * 1.5
    reward = torch.rand(8, 30, generator=g, dtype=torch.float64)
    pi = torch.softmax(z, -1)
    logpi = torch.log_softmax(z, -1)
    adv = reward - (pi * reward).sum(-1, keepdim=True)
    eta = 1e-4

    # Vanilla PG: the exact gradient of J = E_pi[r] w.r.t. the logits is pi * A.
    zg = z.clone().requires_grad_(True)
    (torch.softmax(zg, -1) * reward).sum().backward()
    torch.testing.assert_close(zg.grad, pi * adv)
    dz = eta * zg.grad
    expected = -eta * _cov_pi(pi, logpi, pi * adv)
    torch.testing.assert_close(entropy_change_first_order(z, dz), expected)
    measured = softmax_entropy(z + dz) - softmax_entropy(z)
    assert ((measured - expected).abs() / expected.abs()).max() < 1e-3

    # Natural PG: dz = eta * A.
    expected = -eta * _cov_pi(pi, logpi, adv)
    torch.testing.assert_close(entropy_change_first_order(z, eta * adv), expected)
    measured = softmax_entropy(z + eta * adv) - softmax_entropy(z)
    assert ((measured - expected).abs() / expected.abs()).max() < 1e-3


def test_shift_invariance_and_shape_check():
    z = torch.randn(3, 10)
    dz = torch.randn(3, 10)
    torch.testing.assert_close(entropy_change_first_order(z, dz), entropy_change_first_order(z, dz + 5.0))
    with pytest.raises(ValueError, match="must match"):
        entropy_change_first_order(z, dz[:, :4])


def test_fit_recovers_known_law_from_noisy_points():
    rng = np.random.default_rng(0)
    a_true, b_true = 0.3, 0.9
    h = np.linspace(0.05, 1.5, 40)
    r = -a_true * np.exp(h) + b_true + rng.normal(0, 0.01, h.size)
    fit = fit_entropy_law(h, r)
    a, b = fit
    assert a == pytest.approx(a_true, abs=0.02) and b == pytest.approx(b_true, abs=0.03)
    assert fit.r2 > 0.98
    assert fit.residual_std == pytest.approx(0.01, rel=0.4)
    assert fit.ceiling == predicted_ceiling(a, b) == pytest.approx(-a + b)
    assert predicted_ceiling(0.3, 0.9) == pytest.approx(0.6)
    np.testing.assert_allclose(fit.predict([0.0]), [b - a])


def test_fit_exact_points_and_tensor_input():
    h = torch.tensor([0.0, 0.5, 1.0])
    r = -0.2 * torch.exp(h) + 0.7
    fit = fit_entropy_law(h, r)
    assert fit.a == pytest.approx(0.2, abs=1e-6) and fit.b == pytest.approx(0.7, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.residual_std < 1e-6 and fit.num_points == 3


def test_fit_errors():
    with pytest.raises(ValueError, match="at least 3"):
        fit_entropy_law([0.1, 0.2], [0.5, 0.4])
    with pytest.raises(ValueError, match="constant"):
        fit_entropy_law([0.3, 0.3, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="rewards"):
        fit_entropy_law([0.1, 0.2, 0.3], [0.5, 0.4])
    with pytest.raises(ValueError, match="non-finite"):
        fit_entropy_law([0.1, math.nan, 0.3], [0.5, 0.4, 0.3])


def test_online_law_keeps_the_step_of_each_point_and_its_fit_across_a_checkpoint():
    from megatron_entcov.entropy_law import OnlineEntropyLaw

    law = OnlineEntropyLaw(min_points=3)
    h = np.array([1.2, 0.9, 0.7, 0.5])
    r = -0.3 * np.exp(h) + 1.1
    for step, (hi, ri) in zip((0, 10, 20, 30), zip(h, r)):
        metrics = law.update(float(hi), float(ri), None, None, step=step)
    assert law.point_steps == [0, 10, 20, 30]
    assert law.fit().a == pytest.approx(0.3) and metrics["law/ceiling"] == pytest.approx(0.8)
    again = OnlineEntropyLaw(min_points=3)
    again.load_state_dict(law.state_dict())
    assert again.point_steps == law.point_steps and again.fit().b == pytest.approx(1.1)
    # A checkpoint written before steps were kept: the points are numbered by their index.
    old = OnlineEntropyLaw(min_points=3)
    old.load_state_dict({"points": law.points, "dynamics": []})
    assert old.point_steps == [0, 1, 2, 3]
    assert OnlineEntropyLaw(min_points=3).fit() is None


def test_law_snapshot_draws_the_points_and_the_fit_only_once_it_exists():
    from megatron_entcov.monitor.law_report import law_snapshot

    h = [1.2, 0.9, 0.7]
    r = [0.2, 0.5, 0.6]
    early = law_snapshot(h[:2], r[:2], [0, 1], min_points=3, step=1, source="eval")
    fitted = law_snapshot(h, r, [0, 1, 2], min_points=3, step=2, source="eval")
    assert early.dtype == np.uint8 and early.ndim == 3 and early.shape[2] == 3
    assert early.shape == fitted.shape
    red = lambda img: ((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)).sum()  # noqa: E731
    assert red(early) == 0 and red(fitted) > 100, "the fitted curve (red) is drawn once min_points exist"


def _fit(a: float, b: float, n: int = 6) -> EntropyLawFit:
    return EntropyLawFit(a=a, b=b, r2=0.9, residual_std=0.01, num_points=n)


def test_formula_reads_its_signs_from_the_values():
    assert _fit(0.3, 1.1).formula() == "R = -0.3 * exp(H) + 1.1"
    assert _fit(-0.02579, -0.3765).formula() == "R = 0.02579 * exp(H) - 0.3765"
    assert _fit(0.0, 0.0).formula() == "R = 0 * exp(H) + 0"
    assert _fit(0.123456, -2.0).formula(digits=3) == "R = -0.123 * exp(H) - 2"


def test_law_caveats_name_what_the_fit_does_not_mean():
    assert law_caveats(_fit(0.3, 1.1), [0.2, 0.5, 0.7]) == []                     # ceiling 0.8 in [0, 1]
    assert law_caveats(_fit(1.0, 7.0), [2.0, 4.0, 5.0]) == []                     # ceiling 6 above the rewards
    few = law_caveats(_fit(0.3, 1.1, n=4), [0.2, 0.5, 0.7])
    assert len(few) == 1 and few[0].startswith("only 4 points") and "at least 5" in few[0], few
    below = law_caveats(_fit(1.0, 2.0), [3.0, 4.0, 5.0])                           # ceiling 1 < every reward
    assert below == ["the predicted ceiling 1.0000 is below every reward observed (3..5): it is no ceiling"]
    above = law_caveats(_fit(0.5, 1.6), [0.24, 0.93])                              # ceiling 1.1 > 1
    assert above == ["the predicted ceiling 1.1000 is outside [0, 1], where this reward lies (observed "
                     "0.24..0.93): the fit does not hold up to H = 0"]
    rising = law_caveats(_fit(-0.1, 0.6), [0.2, 0.4])
    assert len(rising) == 1 and rising[0].startswith("a = -0.1 <= 0:") and "no ceiling" in rising[0], rising
