"""evaluation.pass_at_k at large k (k up to n): the unbiased estimator 1 - C(n-c, k) / C(n, k) against exact
rational arithmetic (math.comb, fractions), so exploration beyond pass@16 is measured, not approximated."""

from fractions import Fraction
from math import comb

import pytest

from megatron_entcov.evaluation import pass_at_k


@pytest.mark.parametrize("n", [16, 256, 1024])
def test_pass_at_k_equals_exact_binomials_for_every_k_up_to_n(n):
    for c in sorted({0, 1, 2, n // 7, n // 2, n - 1, n}):
        for k in sorted({1, 2, 16, n // 4, n // 2, n - c, n - c + 1, n - 1, n} & set(range(1, n + 1))):
            exact = 1 - Fraction(comb(n - c, k), comb(n, k))
            got = pass_at_k(n, c, k)
            assert got == pytest.approx(float(exact), rel=1e-9, abs=1e-12), (n, c, k)
            assert 0.0 <= got <= 1.0


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(8, 1, 9)
