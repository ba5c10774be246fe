"""The entropy mechanism: first-order entropy dynamics and the empirical R = -a exp(H) + b law.

Owns the two analytic results of Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models" (arXiv 2505.22617), reference sections 1-2:

* Entropy dynamics of a softmax policy pi = softmax(z) at one state, for a logit update dz:
      H(z + dz) - H(z) = -Cov_{a~pi}( log pi(a), dz_a ) + O(|dz|^2)
  Vanilla policy gradient (dz_a = eta pi(a) A(a)) gives dH ~ -eta Cov(log pi, pi A); natural policy gradient
  (dz_a = eta A(a)) gives dH ~ -eta Cov(log pi, A). (Derivation: dH/dz_a = -pi_a (log pi_a + H), so
  dH = -sum_a pi_a (log pi_a - E log pi) dz_a = -Cov(log pi, dz).)
* The empirical law between mean token entropy H and downstream performance R along a run:
      R = -a exp(H) + b,      predicted ceiling at H = 0:  R = -a + b.
  a, b are fitted per model and task by least squares; the model is linear in (a, b), so the fit is the
  closed-form solution of a 2-parameter linear least-squares problem in the regressor x = -exp(H).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["MIN_MEANINGFUL_POINTS", "EntropyLawFit", "entropy_change_first_order", "fit_entropy_law", "law_caveats",
           "predicted_ceiling", "softmax_entropy"]

MIN_MEANINGFUL_POINTS = 5
"""Fewer (H, R) points than this fit the law's 2 parameters closely whatever they are: :func:`law_caveats` says so."""


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dim, in nats: [..., V] -> [...]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def entropy_change_first_order(logits: Tensor, delta_logits: Tensor) -> Tensor:
    """First-order entropy change -Cov_{a~pi}(log pi(a), delta_z(a)) of pi = softmax(logits), last dim.

    Args:
        logits: [..., V] logits z (any float dtype; computed in at least float32).
        delta_logits: [..., V] logit update dz (same shape).

    Returns:
        [...] predicted H(z + dz) - H(z) to first order in dz, in nats. Invariant to adding a constant to dz
        along the last dim (a covariance), as the true change is.
    """
    if logits.shape != delta_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and delta_logits {tuple(delta_logits.shape)} must match")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype), dim=-1)
    p = logp.exp()
    dz = delta_logits.to(dtype)
    mean_logp = (p * logp).sum(dim=-1, keepdim=True)
    mean_dz = (p * dz).sum(dim=-1, keepdim=True)
    cov = (p * (logp - mean_logp) * (dz - mean_dz)).sum(dim=-1)
    return -cov


@dataclass(frozen=True)
class EntropyLawFit:
    """Least-squares fit of R = -a exp(H) + b. Unpacks to (a, b): ``a, b = fit_entropy_law(H, R)``."""

    a: float
    """Coefficient of -exp(H)."""
    b: float
    """Offset; the ceiling at H = 0 is -a + b."""
    r2: float
    """Coefficient of determination 1 - SS_res / SS_tot (1.0 when R is constant and fitted exactly)."""
    residual_std: float
    """sqrt(SS_res / (n - 2)): the standard deviation of the residuals with 2 fitted parameters."""
    num_points: int
    """Number of (H, R) points used."""

    def __iter__(self) -> Iterator[float]:
        return iter((self.a, self.b))

    @property
    def ceiling(self) -> float:
        """Predicted performance at zero entropy, -a + b."""
        return predicted_ceiling(self.a, self.b)

    def formula(self, digits: int = 4) -> str:
        """The fitted law with its signs read from the values: 'R = -0.3 * exp(H) + 1.1', 'R = 0.19 * exp(H) - 0.25'."""
        coef = -self.a + 0.0                     # + 0.0: no "-0"
        sign = "-" if self.b < 0 else "+"
        return f"R = {coef:.{digits}g} * exp(H) {sign} {abs(self.b):.{digits}g}"

    def predict(self, entropies) -> np.ndarray:
        """R predicted at the given entropies."""
        return -self.a * np.exp(np.asarray(entropies, dtype=np.float64)) + self.b


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()  # host side by nature: called on logged scalars, not in the loss
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"fit_entropy_law: {name} contains non-finite values")
    return arr


def fit_entropy_law(entropies: Sequence[float] | np.ndarray | Tensor,
                    rewards: Sequence[float] | np.ndarray | Tensor) -> EntropyLawFit:
    """Fit R = -a exp(H) + b by least squares (closed form: linear in (a, b) with regressor x = -exp(H)).

    Args:
        entropies: [n] mean token entropies H (nats) along a run.
        rewards: [n] performance R at the same points (accuracy or mean reward).

    Returns:
        EntropyLawFit (a, b, r2, residual_std, num_points); unpacks to (a, b).

    Raises:
        ValueError: fewer than 3 points, mismatched lengths, non-finite values, or (numerically) constant H
            (then a and b are not identifiable).
    """
    h = _as_array(entropies, "entropies")
    r = _as_array(rewards, "rewards")
    if h.shape != r.shape:
        raise ValueError(f"fit_entropy_law: {h.size} entropies but {r.size} rewards")
    n = h.size
    if n < 3:
        raise ValueError(f"fit_entropy_law needs at least 3 (H, R) points, got {n}")
    x = -np.exp(h)
    xc = x - x.mean()
    sxx = float(np.dot(xc, xc))
    if sxx <= (1e-12 * max(1.0, float(np.abs(x).max()))) ** 2 * n:
        raise ValueError("fit_entropy_law: the entropies are (numerically) constant, so a and b cannot be "
                         f"identified (H range {h.min():.6g}..{h.max():.6g})")
    rc = r - r.mean()
    a = float(np.dot(xc, rc) / sxx)
    b = float(r.mean() - a * x.mean())
    resid = r - (a * x + b)
    ss_res = float(np.dot(resid, resid))
    ss_tot = float(np.dot(rc, rc))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    residual_std = math.sqrt(ss_res / (n - 2)) if n > 2 else 0.0
    return EntropyLawFit(a=a, b=b, r2=r2, residual_std=residual_std, num_points=n)


def law_caveats(fit: EntropyLawFit, rewards: Sequence[float] | np.ndarray | Tensor) -> list[str]:
    """Why ``fit`` (of ``rewards``) may not mean what the law says, one sentence each; [] when nothing: fewer
    than MIN_MEANINGFUL_POINTS points; a <= 0 (the reward does not fall as entropy rises: no ceiling); a value
    at H = 0 outside [0, 1] for rewards in [0, 1], or below every reward observed."""
    r = _as_array(rewards, "rewards")
    out = []
    if fit.num_points < MIN_MEANINGFUL_POINTS:
        out.append(f"only {fit.num_points} points: a fit of 2 parameters needs at least {MIN_MEANINGFUL_POINTS} "
                   "to say much; fit a run with more points (more steps or evaluations)")
    at_zero = f"the predicted ceiling {fit.ceiling:.4f}"
    if fit.a <= 0:
        at_zero = f"R at H = 0 ({fit.ceiling:.4f})"
        out.append(f"a = {fit.a:.4g} <= 0: the reward does not fall as entropy rises along this run, so the law "
                   f"predicts no ceiling; {at_zero} is no limit")
    observed = f"{r.min():.4g}..{r.max():.4g}" if r.size else "none"
    if r.size and r.min() >= 0 and r.max() <= 1 and not 0 <= fit.ceiling <= 1:
        out.append(f"{at_zero} is outside [0, 1], where this reward lies (observed {observed}): the fit does "
                   "not hold up to H = 0")
    elif r.size and fit.ceiling < r.min():
        out.append(f"{at_zero} is below every reward observed ({observed}): it is no ceiling")
    return out


def predicted_ceiling(a: float, b: float) -> float:
    """Performance predicted at zero entropy by R = -a exp(H) + b: R(0) = -a + b."""
    return -a + b


class OnlineEntropyLaw:
    """Per-step tracking of the entropy-performance law and of the entropy dynamics during a run.

    Keeps (H, R) per step and refits R = -a*exp(H) + b once ``min_points`` exist (law/a, law/b, law/r2,
    law/ceiling). For the dynamics, the measured same-batch entropy change dH is compared with a prediction
    made *before* the step is seen: dH_pred = k * cov, with k the least-squares slope of dH on the batch
    covariance over the previous steps (section 2 of the reference: dH ~ -eta * Cov(log pi, A); for Adam
    the effective step size eta is unknown, so it is fitted). Logs entropy/delta_predicted and the running
    correlation entropy/delta_corr.
    """

    def __init__(self, min_points: int = 5):
        self.min_points = min_points
        self.points: list[tuple[float, float]] = []
        self.point_steps: list[int] = []
        """The step of each (H, R) point (for the law image)."""
        self.dynamics: list[tuple[float, float]] = []

    def update(self, entropy: float | None, reward: float | None, delta_h: float | None,
               cov: float | None, *, step: int | None = None) -> dict[str, float]:
        """Add the step's point(s) and return the refreshed law/* and entropy/delta_* metrics. ``step``
        labels the (H, R) point (default: its index)."""
        out: dict[str, float] = {}
        if delta_h is not None and cov is not None:
            prev = np.asarray(self.dynamics, dtype=np.float64).reshape(-1, 2)
            if len(prev) >= 2 and np.any(prev[:, 1] != 0):
                k = float(np.dot(prev[:, 0], prev[:, 1]) / np.dot(prev[:, 1], prev[:, 1]))
                out["entropy/delta_predicted"] = k * cov
                out["entropy/delta_slope"] = k
            self.dynamics.append((float(delta_h), float(cov)))
            arr = np.asarray(self.dynamics)
            if len(arr) >= 3 and arr[:, 0].std() > 0 and arr[:, 1].std() > 0:
                out["entropy/delta_corr"] = float(np.corrcoef(arr[:, 0], arr[:, 1])[0, 1])
        if entropy is not None and reward is not None and math.isfinite(entropy) and math.isfinite(reward):
            self.points.append((float(entropy), float(reward)))
            self.point_steps.append(len(self.points) - 1 if step is None else int(step))
            fit = self.fit()
            if fit is not None:
                out.update({"law/a": fit.a, "law/b": fit.b, "law/r2": fit.r2, "law/ceiling": fit.ceiling})
        return out

    def fit(self) -> EntropyLawFit | None:
        """The current fit (None before ``min_points`` points or when they do not determine one)."""
        if len(self.points) < self.min_points:
            return None
        try:
            return fit_entropy_law(*zip(*self.points))
        except ValueError:
            return None

    def state_dict(self) -> dict:
        return {"points": list(self.points), "point_steps": list(self.point_steps), "dynamics": list(self.dynamics)}

    def load_state_dict(self, state: dict) -> None:
        self.points = [tuple(p) for p in state.get("points", [])]
        self.point_steps = list(state.get("point_steps", range(len(self.points))))  # older checkpoints: index
        self.dynamics = [tuple(p) for p in state.get("dynamics", [])]
