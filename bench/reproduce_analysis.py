"""The reproduction's analysis: what the curves say beyond signs, each number with its uncertainty.

Input: summary["methods"] of bench/reproduce.py (per method, per seed: ``curves``). Output: summary["analysis"].

- ``lift``: does a control raise the curve R = -a exp(H) + b or only move along it more slowly? The law is fitted
  to GRPO's evaluation points of all seeds (H = held-out entropy on samples at the training temperature,
  ``curves.eval_entropy``; R = avg@16 at the analysis temperature). A method's residual is the mean of
  R - fit(H) over its evaluations after step 0 (step 0 is the shared SFT start) of all seeds, and over the
  last quarter of steps alone; interval: seed bootstrap (the GRPO fit redone on each resample). Also each
  method's own fitted ceiling (b - a at H = 0) against GRPO's.
- ``law_form``: exponential against linear and logarithmic two-parameter forms (R = c g(H) + b with g = -exp,
  identity, log), each fitted on the first half of a run's evaluations and scored by RMSE on the later half.
- ``predictability``: the law fitted on the first quarter's evaluations predicts the rest from their measured
  entropy; RMSE against carrying the last first-quarter value forward.
- ``saturation``: the slope of avg@16 against the step over the later half of each run (per 100 steps), mean
  over seeds with its t interval: has the curve stopped rising (GRPO's is the question the long profile asks)?
- ``mechanism``: step-level correlation of the measured entropy change with the covariance prediction
  (-cov/mean) and with the exact first-order change (entropy/delta_first_order), per method, pooled over seeds
  (Fisher interval) and per seed.
- ``selection``: does a Clip-Cov/KL-Cov share bind? The configured share against the share of tokens selected.
- ``paired_vs_grpo``: seed-paired differences against GRPO of the final greedy accuracy, avg@16, pass@k (each
  analysed temperature) and the last-quarter mean of avg@16: mean, t interval, t and sign-flip p-values.
- ``vs_start``: the same metrics, final minus step 0 (the SFT checkpoint), per method.

Example:
    summary["analysis"] = analyse(summary["methods"], steps=40, temperatures=["1"], main="1")
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from reproduce_stats import corr_interval, paired, seed_bootstrap

__all__ = ["FORMS", "analyse", "eval_points", "fit_form", "predict_form", "lift", "law_form", "predictability",
           "saturation", "selection", "mechanism", "paired_vs_reference", "vs_start", "temperature_key"]

REFERENCE = "grpo"
FORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": lambda h: -np.exp(h),       # R = a (-exp H) + b: the paper's law, ceiling b - a
    "linear": lambda h: h,             # R = c H + b
    "log": lambda h: np.log(h),        # R = c log H + b
}
"""Two-parameter forms R = c g(H) + b, all fitted by least squares on the feature g(H)."""


def temperature_key(t: float) -> str:
    """The key of an evaluation temperature in curves and analysis ("1", "0.6")."""
    return f"{float(t):g}"


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def _view(entry: dict, temp: str) -> dict | None:
    """One run's evaluations at ``temp``: {step, mean_accuracy, accuracy, pass_at_k} (None when not measured).
    The trainer's own evaluation (temperature entry["eval_temperature"], 1 when absent) is in the curves' eval_*
    lists; re-scored temperatures in curves["eval_by_temperature"]."""
    c = entry["curves"]
    if temp in c.get("eval_by_temperature", {}):
        return c["eval_by_temperature"][temp]
    if temp == temperature_key(entry.get("eval_temperature", 1.0)):
        return {"step": c["eval_step"], "mean_accuracy": c["eval_mean_accuracy"], "accuracy": c["eval_accuracy"],
                "pass_at_k": c.get("eval_pass_at_k", {})}
    return None


def eval_points(entry: dict, temp: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(step, H, R) of one run's evaluations at ``temp``, sorted by step: H the held-out entropy of the trainer's
    evaluation at the same step (the policy's entropy on its own samples), R avg@16 at ``temp``."""
    v = _view(entry, temp)
    if v is None:
        return None
    c = entry["curves"]
    h_of = dict(zip(c["eval_step"], c["eval_entropy"]))
    rows = sorted((s, h_of[s], r) for s, r in zip(v["step"], v["mean_accuracy"]) if s in h_of)
    if not rows:
        return None
    s, h, r = (np.asarray(x, dtype=np.float64) for x in zip(*rows))
    return s, h, r


def _points(method: dict, temp: str) -> dict[str, tuple]:
    """seed -> (step, H, R) of every seed of one method that has evaluations at ``temp``."""
    out = {}
    for seed, entry in method["seeds"].items():
        p = eval_points(entry, temp)
        if p is not None:
            out[seed] = p
    return out


# --------------------------------------------------------------------------------------------------
# fits
# --------------------------------------------------------------------------------------------------


def fit_form(h: np.ndarray, r: np.ndarray, form: str = "exp") -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of R on g(H) for ``form``; None when fewer than 2 points, a constant
    feature, or a non-positive H for the log form. For "exp" the slope is the law's a and the ceiling b - a."""
    h, r = np.asarray(h, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if len(h) < 2 or (form == "log" and np.any(h <= 0)):
        return None
    x = FORMS[form](h)
    if np.ptp(x) == 0:
        return None
    xm = x.mean()
    slope = float(np.sum((x - xm) * (r - r.mean())) / np.sum((x - xm) ** 2))
    return slope, float(r.mean() - slope * xm)


def predict_form(coef: tuple[float, float], h: np.ndarray, form: str = "exp") -> np.ndarray:
    return coef[0] * FORMS[form](np.asarray(h, dtype=np.float64)) + coef[1]


def _pool(points: dict[str, tuple], seeds: list, min_step: float = -math.inf) -> tuple[np.ndarray, ...]:
    """(H, R) of the given seeds' points with step >= min_step, concatenated (a seed drawn twice counts twice)."""
    sel = [(p[1][p[0] >= min_step], p[2][p[0] >= min_step]) for p in (points[s] for s in seeds)]
    if not sel:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([h for h, _ in sel]), np.concatenate([r for _, r in sel])


def _ceiling(points: dict[str, tuple], seeds: list) -> float | None:
    coef = fit_form(*_pool(points, seeds), "exp")
    return None if coef is None else coef[1] - coef[0]


# --------------------------------------------------------------------------------------------------
# lift vs slide
# --------------------------------------------------------------------------------------------------


def _residual(ref: dict, pts: dict, seeds: list, min_step: float) -> float | None:
    """Mean R - fit(H) over ``pts`` of ``seeds`` (steps >= min_step, and > 0), the law fitted to ``ref`` of the
    same seeds (all its points)."""
    coef = fit_form(*_pool(ref, seeds), "exp")
    h, r = _pool(pts, seeds, max(min_step, 1e-9))
    if coef is None or len(h) == 0:
        return None
    return float(np.mean(r - predict_form(coef, h)))


def _lift_one(ref: dict, pts: dict, late_start: float) -> dict:
    seeds = sorted(set(ref) & set(pts))
    own = _ceiling(pts, seeds)
    grpo = _ceiling(ref, seeds)

    def ceiling_diff(s):
        a, b = _ceiling(pts, s), _ceiling(ref, s)
        return None if a is None or b is None else a - b

    return {
        "seeds": seeds,
        "n_points": int(sum(np.sum(pts[s][0] > 0) for s in seeds)),
        "mean_residual": _residual(ref, pts, seeds, 0.0),
        "ci95": seed_bootstrap(seeds, lambda s: _residual(ref, pts, s, 0.0)),
        "late_residual": _residual(ref, pts, seeds, late_start),
        "late_ci95": seed_bootstrap(seeds, lambda s: _residual(ref, pts, s, late_start)),
        "per_seed": [_residual(ref, pts, [s], 0.0) for s in seeds],
        "ceiling": own,
        "ceiling_ci95": seed_bootstrap(seeds, lambda s: _ceiling(pts, s)),
        "ceiling_minus_grpo": None if own is None or grpo is None else own - grpo,
        "ceiling_minus_grpo_ci95": seed_bootstrap(seeds, ceiling_diff),
    }


def lift(methods: dict, temp: str, steps: int) -> dict:
    """analysis.lift at ``temp``: the reference law (GRPO, all seeds) and each method's residual against it."""
    if REFERENCE not in methods:
        return {}
    ref = _points(methods[REFERENCE], temp)
    coef = fit_form(*_pool(ref, sorted(ref)), "exp")
    out: dict = {"reference": None if coef is None else
                 {"a": coef[0], "b": coef[1], "ceiling": coef[1] - coef[0],
                  "n_points": int(sum(len(p[0]) for p in ref.values())), "late_start_step": 0.75 * steps}}
    for name, m in methods.items():
        pts = _points(m, temp)
        if pts and ref:
            out[name] = _lift_one(ref, pts, 0.75 * steps)
    return out


# --------------------------------------------------------------------------------------------------
# the law's form and its predictive value
# --------------------------------------------------------------------------------------------------


def _rmse(pred: np.ndarray, r: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - r) ** 2)))


def _form_errors(p: tuple, steps: int) -> dict[str, float] | None:
    """Held-out RMSE on the later half (step > steps / 2) of each form fitted on the first half."""
    s, h, r = p
    first, later = s <= steps / 2, s > steps / 2
    if first.sum() < 3 or later.sum() < 1:
        return None
    errors = {}
    for form in FORMS:
        coef = fit_form(h[first], r[first], form)
        errors[form] = None if coef is None else _rmse(predict_form(coef, h[later], form), r[later])
    return errors


def _forecast_errors(p: tuple, steps: int) -> dict[str, float] | None:
    """RMSE over evaluations after the first quarter of the law fitted on the first quarter (given each later
    point's measured H), and of carrying the last first-quarter R forward."""
    s, h, r = p
    first, later = s <= steps / 4, s > steps / 4
    coef = fit_form(h[first], r[first], "exp") if first.sum() >= 3 else None
    if coef is None or later.sum() < 1:
        return None
    return {"law": _rmse(predict_form(coef, h[later]), r[later]),
            "carry_forward": _rmse(np.full(int(later.sum()), r[first][-1]), r[later])}


def _per_run(methods: dict, temp: str, fn: Callable[[tuple], dict | None]) -> dict[str, dict[str, dict]]:
    """method -> seed -> fn(points) for every run with evaluations at ``temp`` where fn is defined."""
    out: dict = {}
    for name, m in methods.items():
        for seed, p in _points(m, temp).items():
            v = fn(p)
            if v is not None:
                out.setdefault(name, {})[seed] = v
    return out


def _compare(runs: dict[str, dict], a: str, b: str) -> dict:
    """Mean over seeds of runs[seed][a] - runs[seed][b] (one method's runs), with its seed-bootstrap interval."""
    seeds = [s for s, v in runs.items() if v.get(a) is not None and v.get(b) is not None]

    def mean_diff(ss):
        return float(np.mean([runs[s][a] - runs[s][b] for s in ss])) if ss else None

    return {"mean": mean_diff(seeds), "ci95": seed_bootstrap(seeds, mean_diff), "n": len(seeds)}


def _summarise_runs(per_run: dict, keys: tuple[str, ...], pairs: tuple[tuple[str, str], ...]) -> dict:
    """Per method and over all methods ("all", each seed's value the mean over the methods run on it): the mean
    of every key, and the paired differences."""
    def block(runs: dict) -> dict:
        mean = {k: _mean([v.get(k) for v in runs.values()]) for k in keys}
        return {"rmse": mean, "n_runs": len(runs), **{f"{a}_minus_{b}": _compare(runs, a, b) for a, b in pairs}}

    out = {name: block(runs) for name, runs in per_run.items()}
    by_seed: dict = {}
    for runs in per_run.values():
        for seed, v in runs.items():
            by_seed.setdefault(seed, []).append(v)
    pooled = {seed: {k: _mean([v.get(k) for v in vs]) for k in keys} for seed, vs in by_seed.items()}
    if pooled:
        out["all"] = block(pooled) | {"n_runs": sum(len(r) for r in per_run.values())}
    return out


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def law_form(methods: dict, temp: str, steps: int) -> dict:
    return _summarise_runs(_per_run(methods, temp, lambda p: _form_errors(p, steps)), tuple(FORMS),
                           (("exp", "linear"), ("exp", "log")))


def predictability(methods: dict, temp: str, steps: int) -> dict:
    return _summarise_runs(_per_run(methods, temp, lambda p: _forecast_errors(p, steps)),
                           ("law", "carry_forward"), (("law", "carry_forward"),))


def _late_slope(p: tuple, steps: int) -> float | None:
    """Least-squares slope of R against the step over the later half of the run (step >= steps / 2), per 100
    steps; None with fewer than 3 such evaluations."""
    s, _, r = p
    late = s >= steps / 2
    if late.sum() < 3:
        return None
    return float(np.polyfit(s[late], r[late], 1)[0] * 100.0)


def saturation(methods: dict, temp: str, steps: int) -> dict:
    """Has R stopped rising? Per method: each seed's slope of avg@16 over the later half of the run (per 100 steps)
    and their mean with its t interval (a one-sample test against 0)."""
    out = {}
    for name, m in methods.items():
        slopes = [v for v in (_late_slope(p, steps) for p in _points(m, temp).values()) if v is not None]
        if slopes:
            d = paired(slopes, [0.0] * len(slopes))
            out[name] = {"slope_per_100_steps": d["mean"], "ci95": d["ci95"], "p_t": d["p_t"],
                         "per_seed": slopes}
    return out


# --------------------------------------------------------------------------------------------------
# mechanism
# --------------------------------------------------------------------------------------------------


def _aligned(c: dict, value: str, step: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(measured entropy change, predictor) at the steps both were logged; None when the predictor is absent."""
    if not c.get(value):
        return None
    pred = dict(zip(c[step], c[value]))
    rows = [(d, pred[s]) for s, d in zip(c["delta_h_step"], c["delta_h_measured"]) if s in pred]
    if not rows:
        return None
    dh, x = (np.asarray(v, dtype=np.float64) for v in zip(*rows))
    return dh, x


def _predictors(entry: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    c = entry["curves"]
    out = {}
    cov = _aligned(c, "cov_mean", "cov_step")
    if cov is not None:
        out["cov"] = (cov[0], -cov[1])                 # dH ~ -eta Cov(log pi, A)
    first = _aligned(c, "delta_h_first_order", "delta_h_first_order_step")
    if first is not None:
        out["first_order"] = first
    return out


def _mechanism_block(entries: list[dict]) -> dict:
    out: dict = {}
    for key in ("cov", "first_order"):
        pairs = [p[key] for p in (_predictors(e) for e in entries) if key in p]
        if not pairs:
            out[f"corr_{key}"] = None
            continue
        dh, x = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
        rose = dh > 0
        out[f"corr_{key}"] = corr_interval(dh, x) | {
            "per_seed": [corr_interval(*p)["r"] for p in pairs],
            "sign_agreement": float(np.mean(np.sign(dh) == np.sign(x))),
            "sign_agreement_when_rose": float(np.mean(x[rose] > 0)) if rose.any() else None,
            "steps_entropy_rose": int(rose.sum())}
    return out


def mechanism(methods: dict) -> dict:
    """Per method and over all methods: corr(measured dH, -cov/mean) and corr(measured dH, exact first-order dH),
    pooled over the steps of every seed, with Fisher 95% intervals (steps treated as independent)."""
    out = {name: _mechanism_block(list(m["seeds"].values())) for name, m in methods.items()}
    out["all"] = _mechanism_block([e for m in methods.values() for e in m["seeds"].values()])
    return out


# --------------------------------------------------------------------------------------------------
# does the share bind?
# --------------------------------------------------------------------------------------------------

SHARES = {"loss.clip_cov_ratio": "clip_cov_frac", "loss.kl_cov_ratio": "kl_cov_frac"}
"""The configured share of a covariance method and the token share it logs (train/clip_cov_frac: detached;
train/kl_cov_frac: penalised)."""


def selection(methods: dict) -> dict:
    """Per Clip-Cov/KL-Cov method: its configured share (the schedule's base; from the method's ``settings``)
    against the share of tokens it selected per step (mean, min, max over every step of every seed) and the
    share of Clip-Cov steps where it selected less than half the configured share: there the candidate window
    (clip_cov_lb < cov < clip_cov_ub), not the share, decided how many tokens were detached. Above the share:
    the floor of one token per optimizer mini-batch."""
    out = {}
    for name, m in methods.items():
        conf = dict(kv.split("=", 1) for kv in m.get("settings") or [] if "=" in kv)
        for key, tag in SHARES.items():
            if key not in conf:
                continue
            steps = np.concatenate([np.asarray(e["curves"]["token_share"].get(tag, []), dtype=np.float64)
                                    for e in m["seeds"].values()])
            if len(steps) == 0:
                continue
            share = float(conf[key])
            out[name] = {"configured_share": share, "logged_as": f"train/{tag}",
                         "mean_selected_share": float(steps.mean()), "min": float(steps.min()),
                         "max": float(steps.max()),
                         # Clip-Cov chooses max(int(r N), 1) tokens among its window's candidates: below half of r
                         # the window ran out first (r did not bind). KL-Cov's top-k has no window.
                         "window_decided_share_of_steps": float(np.mean(steps < 0.5 * share))
                         if key == "loss.clip_cov_ratio" else None}
    return out


# --------------------------------------------------------------------------------------------------
# paired differences
# --------------------------------------------------------------------------------------------------


def _metrics_at(entry: dict, temps: list[str], steps: int, index: int) -> dict[str, float]:
    """The metrics compared (greedy accuracy; per temperature avg@16, pass@k, last-quarter mean avg@16) at
    evaluation ``index`` of the run (-1 = final, 0 = step 0; the last-quarter mean only for the final)."""
    c = entry["curves"]
    out = {"greedy_accuracy": float(c["eval_accuracy"][index])}
    for t in temps:
        v = _view(entry, t)
        if v is None:
            continue
        out[f"avg16_t{t}"] = float(v["mean_accuracy"][index])
        for k, vals in v.get("pass_at_k", {}).items():
            if k != "1":
                out[f"pass{k}_t{t}"] = float(vals[index])
        if index == -1:
            late = np.asarray(v["step"]) >= 0.75 * steps
            out[f"late_avg16_t{t}"] = float(np.mean(np.asarray(v["mean_accuracy"])[late]))
    return out


def _paired_block(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """metric -> paired(a, b) over the seeds both have (a, b: seed -> metric -> value)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {}
    keys = [k for k in a[seeds[0]] if all(k in a[s] and k in b[s] for s in seeds)]
    return {k: paired([a[s][k] for s in seeds], [b[s][k] for s in seeds]) | {"seeds": seeds} for k in keys}


def paired_vs_reference(methods: dict, temps: list[str], steps: int) -> dict:
    """method -> metric -> seed-paired difference method - GRPO of the final values."""
    if REFERENCE not in methods:
        return {}
    ref = {s: _metrics_at(e, temps, steps, -1) for s, e in methods[REFERENCE]["seeds"].items()}
    return {name: _paired_block({s: _metrics_at(e, temps, steps, -1) for s, e in m["seeds"].items()}, ref)
            for name, m in methods.items() if name != REFERENCE}


def vs_start(methods: dict, temps: list[str], steps: int) -> dict:
    """method -> metric -> seed-paired difference final - step 0 (the SFT checkpoint, scored with each seed's
    samples)."""
    out = {}
    for name, m in methods.items():
        final = {s: _metrics_at(e, temps, steps, -1) for s, e in m["seeds"].items()}
        start = {s: _metrics_at(e, temps, steps, 0) for s, e in m["seeds"].items()}
        out[name] = _paired_block(final, start)
    return out


# --------------------------------------------------------------------------------------------------
# everything
# --------------------------------------------------------------------------------------------------


def analyse(methods: dict, steps: int, temperatures: list[str], main: str) -> dict:
    """summary["analysis"]: lift, law_form, predictability and saturation at the main temperature (the same for
    each other temperature under by_temperature), mechanism, paired_vs_grpo and vs_start over every temperature."""
    if main not in temperatures:
        raise ValueError(f"analyse: main temperature {main!r} is not among the evaluated {temperatures}")
    per_t = {t: {"lift": lift(methods, t, steps), "law_form": law_form(methods, t, steps),
                 "predictability": predictability(methods, t, steps), "saturation": saturation(methods, t, steps)}
             for t in temperatures}
    return {
        "main_temperature": main,
        "temperatures": temperatures,
        "steps": steps,
        "reference": REFERENCE,
        **per_t[main],
        "by_temperature": {t: v for t, v in per_t.items() if t != main},
        "mechanism": mechanism(methods),
        "selection": selection(methods),
        "paired_vs_grpo": paired_vs_reference(methods, temperatures, steps),
        "vs_start": vs_start(methods, temperatures, steps),
    }
