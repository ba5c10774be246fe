"""Small-sample statistics for bench/reproduce_analysis.py (numpy only: the venv carries no scipy).

- Student's t distribution: ``t_cdf`` / ``t_ppf`` through the regularized incomplete beta function (continued
  fraction, Numerical Recipes' betacf), for paired-difference intervals and p-values with 2-10 seeds.
- ``paired``: mean of seed-paired differences with its t interval, the two-sided t-test p-value and the exact
  sign-flip (permutation) p-value, which needs no normality but cannot go below 2 / 2**n (0.25 at 3 seeds).
- ``seed_bootstrap``: a percentile interval of any statistic of a list of seeds, resampling whole seeds.
- ``corr_interval``: Pearson's r with its Fisher-z 95% interval.

Example:
    d = paired([0.61, 0.66, 0.70], [0.55, 0.57, 0.56])   # method vs GRPO, seed by seed
    d["mean"], d["ci95"], d["p_t"], d["p_signflip"]
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["t_cdf", "t_ppf", "paired", "seed_bootstrap", "corr_interval"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converged to 1e-14."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on t_cdf to 1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1), got {q}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def _signflip_p(d: np.ndarray) -> float:
    """Exact two-sided sign-flip p-value of mean(d) = 0: the share of the 2**n sign patterns whose |mean| is at
    least the observed one."""
    observed = abs(d.mean())
    flips = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    return float(np.mean(np.abs((flips * d).mean(axis=1)) >= observed - 1e-12))


def paired(x: Sequence[float], y: Sequence[float]) -> dict:
    """Seed-paired differences x_s - y_s: mean, sample std, n, t 95% interval, two-sided p (t-test and exact
    sign flip), and each seed's difference. With one pair only the mean is defined (the rest None); when every
    seed gives the same difference (discrete metrics: pass@16 moves in steps of 1/64) the t interval and p are
    undefined (None), the sign-flip p is not."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"paired: need equal-length non-empty sequences, got {len(x)} and {len(y)}")
    n, mean = len(d), float(d.mean())
    out = {"mean": mean, "std": None, "n": n, "ci95": None, "p_t": None, "p_signflip": None,
           "per_seed": d.tolist()}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out.update(std=sd, p_signflip=_signflip_p(d))
    if sd <= 1e-12 * max(1.0, abs(mean)):       # every seed the same difference: no spread to test against
        return out
    half = t_ppf(0.975, n - 1) * sd / math.sqrt(n)
    out["ci95"] = [mean - half, mean + half]
    out["p_t"] = 2.0 * (1.0 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return out


def seed_bootstrap(seeds: Sequence, statistic: Callable[[list], float | None], *, resamples: int = 2000,
                   seed: int = 0) -> list[float] | None:
    """The 2.5% and 97.5% percentiles of ``statistic`` over resamples of ``seeds`` with replacement (whole seeds:
    the unit that is independent); resamples where the statistic is undefined (None) are dropped. None when
    fewer than 2 seeds or no resample is defined. With 3 seeds there are only 10 distinct resamples: the
    interval is coarse, and it says how far the seeds alone move the number, nothing finer."""
    seeds = list(seeds)
    if len(seeds) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        v = statistic([seeds[i] for i in rng.integers(0, len(seeds), len(seeds))])
        if v is not None and math.isfinite(v):
            values.append(v)
    if not values:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def corr_interval(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson's r of paired values with its Fisher-z 95% interval (independent pairs assumed) and n; r None
    when fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"r": None, "ci95": None, "n": n}
    r = float(np.corrcoef(x, y)[0, 1])
    if n < 4 or abs(r) >= 1.0:
        return {"r": r, "ci95": None, "n": n}
    z, half = math.atanh(r), 1.959963984540054 / math.sqrt(n - 3)
    return {"r": r, "ci95": [math.tanh(z - half), math.tanh(z + half)], "n": n}
