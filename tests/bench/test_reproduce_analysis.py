"""bench/reproduce_analysis.py and bench/reproduce_stats.py against answers known in advance: Student's t against
table values and closed forms, paired differences and sign-flip p-values by hand, fits against numpy's polyfit,
and synthetic runs generated on a known law R = -a exp(H) + b plus a known lift (the analysis must return that
lift within its interval, and no lift for a method that only moves along the law)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))        # reproduce_analysis imports its sibling reproduce_stats
stats = load_script("reproduce_stats", ROOT / "bench" / "reproduce_stats.py")
ra = load_script("reproduce_analysis_bench", ROOT / "bench" / "reproduce_analysis.py")

A, B = 0.3, 0.5            # the known law R = -A exp(H) + B: ceiling B - A = 0.2
STEPS = 40


def law(h):
    return -A * np.exp(h) + B


def _entry(h, r, *, seed=0, greedy=None, pass16=None, dh=None, cov=None, first=None, rescored=None):
    steps = list(range(0, STEPS + 1, 4))[:len(h)]
    n = len(dh) if dh is not None else 0
    return {"eval_temperature": 1.0, "curves": {
        "eval_step": steps, "eval_entropy": list(map(float, h)), "eval_mean_accuracy": list(map(float, r)),
        "eval_accuracy": list(greedy if greedy is not None else r),
        "eval_pass_at_k": {"16": list(pass16 if pass16 is not None else r)},
        "delta_h_measured": [] if dh is None else list(dh), "delta_h_step": list(range(1, n + 1)),
        "cov_mean": [] if cov is None else list(cov), "cov_step": list(range(1, n + 1)),
        "delta_h_first_order": [] if first is None else list(first),
        "delta_h_first_order_step": list(range(1, n + 1)) if first is not None else [],
        "eval_by_temperature": rescored or {}}}


def _method(runs):
    return {"seeds": {str(i): e for i, e in enumerate(runs)}}


def _runs(h_end, lift, noise=0.002, seeds=3, rng=None):
    """Per seed: 11 evaluations with H falling linearly from 0.5 to h_end, R on the law plus ``lift`` (after step
    0; the start is the shared SFT point) plus Gaussian noise."""
    rng = rng or np.random.default_rng(0)
    out = []
    for s in range(seeds):
        h = np.linspace(0.5, h_end + 0.01 * s, 11)
        r = law(h) + lift * (np.arange(11) > 0) + rng.normal(0, noise, 11)
        out.append(_entry(h, r, seed=s))
    return out


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("df, q975", [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (10, 2.228138852),
                                      (30, 2.042272456)])
def test_t_quantiles_equal_the_table(df, q975):
    assert math.isclose(stats.t_ppf(0.975, df), q975, rel_tol=1e-8)
    assert math.isclose(stats.t_cdf(q975, df), 0.975, rel_tol=1e-10)


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 9.0])
def test_t_cdf_equals_the_closed_forms(t):
    assert math.isclose(stats.t_cdf(t, 1), 0.5 + math.atan(t) / math.pi, abs_tol=1e-12)
    assert math.isclose(stats.t_cdf(t, 2), 0.5 + t / (2 * math.sqrt(2 + t * t)), abs_tol=1e-12)


def test_paired_by_hand():
    d = stats.paired([0.4, 0.6, 0.8], [0.3, 0.4, 0.5])                 # differences 0.1, 0.2, 0.3
    assert math.isclose(d["mean"], 0.2) and math.isclose(d["std"], 0.1)
    half = 4.302652730 * 0.1 / math.sqrt(3)
    assert np.allclose(d["ci95"], [0.2 - half, 0.2 + half], atol=1e-8)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert math.isclose(d["p_t"], 1 - t / math.sqrt(2 + t * t), abs_tol=1e-10)   # df 2: F = 1/2 + t/(2 sqrt(2+t^2))
    assert d["p_signflip"] == 0.25                                      # only +++ and --- reach |mean| 0.2
    mixed = stats.paired([1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.4, 0.6])    # 1, -1, 0.1, -0.1: mean 0
    assert mixed["p_signflip"] == 1.0 and math.isclose(mixed["p_t"], 1.0)
    same = stats.paired([0.5, 0.6], [0.4, 0.5])                        # both seeds +0.1: no spread
    assert same["ci95"] is None and same["p_t"] is None and same["p_signflip"] == 0.5
    one = stats.paired([0.5], [0.2])
    assert math.isclose(one["mean"], 0.3) and one["ci95"] is None and one["p_t"] is None


def test_seed_bootstrap_and_fisher_interval():
    values = {"a": 0.0, "b": 1.0}
    ci = stats.seed_bootstrap(list(values), lambda ss: float(np.mean([values[s] for s in ss])))
    assert ci == [0.0, 1.0]                                            # resamples {a,a} and {b,b} exist
    assert stats.seed_bootstrap(["a"], lambda ss: 0.0) is None
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    c = stats.corr_interval(x, y)
    r = np.corrcoef(x, y)[0, 1]
    z = 0.5 * math.log((1 + r) / (1 - r))
    assert math.isclose(c["r"], r) and c["n"] == 50
    assert np.allclose(c["ci95"], [math.tanh(z - 1.959964 / math.sqrt(47)), math.tanh(z + 1.959964 / math.sqrt(47))],
                       atol=1e-6)


# ------------------------------------------------------------------------------------------------ fits


@pytest.mark.parametrize("form, feature", [("exp", lambda h: -np.exp(h)), ("linear", lambda h: h),
                                           ("log", np.log)])
def test_fit_form_equals_polyfit(form, feature):
    rng = np.random.default_rng(2)
    h = rng.uniform(0.1, 1.0, 12)
    r = rng.uniform(0, 1, 12)
    slope, intercept = np.polyfit(feature(h), r, 1)
    coef = ra.fit_form(h, r, form)
    assert np.allclose(coef, (slope, intercept), atol=1e-12)
    assert np.allclose(ra.predict_form(coef, h, form), slope * feature(h) + intercept)
    assert ra.fit_form(np.full(4, 0.3), r[:4], form) is None        # constant entropy: no fit
    if form == "log":
        assert ra.fit_form(np.array([-0.1, 0.2]), r[:2], form) is None   # log H needs H > 0


# ------------------------------------------------------------------------------------------------ lift vs slide


def test_a_known_lift_is_found_and_a_slide_is_not():
    rng = np.random.default_rng(3)
    delta = 0.03
    methods = {"grpo": _method(_runs(0.1, 0.0, rng=rng)),          # on the law, entropy falling to 0.1
               "lifted": _method(_runs(0.3, delta, rng=rng)),      # above the law by delta
               "slide": _method(_runs(0.3, 0.0, rng=rng))}         # on the law, only slower
    out = ra.lift(methods, "1", STEPS)
    assert abs(out["reference"]["a"] - A) < 0.02 and abs(out["reference"]["ceiling"] - (B - A)) < 0.02
    lifted, slide = out["lifted"], out["slide"]
    assert abs(lifted["mean_residual"] - delta) < 0.004
    assert lifted["ci95"][0] <= delta <= lifted["ci95"][1] and lifted["ci95"][0] > 0
    assert lifted["late_ci95"][0] <= delta <= lifted["late_ci95"][1]
    assert slide["ci95"][0] <= 0 <= slide["ci95"][1] and abs(slide["mean_residual"]) < 0.004
    # a lift raises the method's own ceiling by the same amount; a slide leaves it where GRPO's is
    assert abs(lifted["ceiling_minus_grpo"] - delta) < 0.05
    # independent computation: pooled float64 polyfit of GRPO's points, the residual of every point after step 0
    h_ref = np.concatenate([e["curves"]["eval_entropy"] for e in methods["grpo"]["seeds"].values()])
    r_ref = np.concatenate([e["curves"]["eval_mean_accuracy"] for e in methods["grpo"]["seeds"].values()])
    a, b = np.polyfit(-np.exp(h_ref), r_ref, 1)
    res = [np.asarray(e["curves"]["eval_mean_accuracy"][1:]) - (a * -np.exp(np.asarray(e["curves"]["eval_entropy"][1:]))
                                                                + b) for e in methods["lifted"]["seeds"].values()]
    assert math.isclose(lifted["mean_residual"], float(np.mean(np.concatenate(res))), abs_tol=1e-12)
    late = [x[-3:] for x in res]                                       # steps 32, 36, 40 >= 0.75 * 40
    assert math.isclose(lifted["late_residual"], float(np.mean(np.concatenate(late))), abs_tol=1e-12)


def test_lift_at_a_rescored_temperature_uses_its_accuracy_and_the_trainers_entropy():
    rng = np.random.default_rng(4)
    grpo, lifted = _runs(0.1, 0.0, rng=rng), _runs(0.3, 0.0, rng=rng)
    for e, shift in [(e, 0.0) for e in grpo] + [(e, 0.05) for e in lifted]:
        c = e["curves"]
        r06 = law(np.asarray(c["eval_entropy"])) + 0.1 + shift * (np.arange(11) > 0)
        c["eval_by_temperature"]["0.6"] = {"step": c["eval_step"], "mean_accuracy": r06.tolist(),
                                           "accuracy": c["eval_accuracy"], "pass_at_k": {"16": r06.tolist()}}
    methods = {"grpo": _method(grpo), "lifted": _method(lifted)}
    a = ra.analyse(methods, STEPS, ["1", "0.6"], "0.6")
    assert math.isclose(a["lift"]["lifted"]["mean_residual"], 0.05, abs_tol=1e-9)     # exact: no noise at 0.6
    assert abs(a["by_temperature"]["1"]["lift"]["lifted"]["mean_residual"]) < 0.004
    assert a["main_temperature"] == "0.6" and set(a["by_temperature"]) == {"1"}
    with pytest.raises(ValueError, match="main temperature"):
        ra.analyse(methods, STEPS, ["1"], "0.6")


# ------------------------------------------------------------------------------------------------ law form, forecast


def test_law_form_prefers_the_form_that_generated_the_data():
    h = np.linspace(2.0, 0.05, 11)                   # a wide range: exp(H) is far from linear over it
    curved = _method([_entry(h, law(h)), _entry(h, law(h) + 0.001)])
    straight = _method([_entry(h, 0.6 - 0.2 * h), _entry(h, 0.601 - 0.2 * h)])
    out = ra.law_form({"curved": curved, "straight": straight}, "1", STEPS)
    assert out["curved"]["rmse"]["exp"] < 1e-9 < out["curved"]["rmse"]["linear"]
    assert out["curved"]["exp_minus_linear"]["mean"] < 0
    assert out["straight"]["rmse"]["linear"] < 1e-9 < out["straight"]["rmse"]["exp"]
    # the later half (steps 24..40) predicted from the first half's fit, by hand for one run
    s = np.arange(0, 41, 4)
    first, later = s <= 20, s > 20
    slope, icpt = np.polyfit(h[first], law(h)[first], 1)
    expect = np.sqrt(np.mean((slope * h[later] + icpt - law(h)[later]) ** 2))
    assert math.isclose(out["curved"]["rmse"]["linear"], expect, rel_tol=1e-9)


def test_predictability_on_the_law_beats_carry_forward():
    h = np.linspace(0.6, 0.1, 11)
    out = ra.predictability({"m": _method([_entry(h, law(h)), _entry(h, law(h) + 0.01)])}, "1", STEPS)
    m = out["m"]
    assert m["rmse"]["law"] < 1e-9
    first_last = law(h)[2]                                 # steps 0, 4, 8 are the first quarter of 40
    assert math.isclose(m["rmse"]["carry_forward"], float(np.sqrt(np.mean((law(h)[3:] - first_last) ** 2))),
                        rel_tol=1e-9)
    assert m["law_minus_carry_forward"]["mean"] < 0 and out["all"]["n_runs"] == 2


def test_saturation_slope_over_the_later_half():
    steps = np.arange(0, 41, 4)
    h = np.linspace(0.5, 0.2, 11)
    rng = np.random.default_rng(6)
    flat = [_entry(h, np.minimum(0.1 + 0.004 * steps, 0.18) + rng.normal(0, 1e-3, 11)) for _ in range(3)]
    rising = [_entry(h, 0.1 + (0.001 + 0.0001 * s) * steps) for s in range(3)]
    out = ra.saturation({"flat": _method(flat), "rising": _method(rising)}, "1", STEPS)
    by_hand = [np.polyfit(steps[steps >= 20], np.asarray(e["curves"]["eval_mean_accuracy"])[steps >= 20], 1)[0] * 100
               for e in flat]
    assert np.allclose(out["flat"]["per_seed"], by_hand)
    assert out["flat"]["ci95"][0] < 0 < out["flat"]["ci95"][1]
    assert np.allclose(out["rising"]["per_seed"], [0.1, 0.11, 0.12])
    assert math.isclose(out["rising"]["slope_per_100_steps"], 0.11) and out["rising"]["ci95"][0] > 0


# ------------------------------------------------------------------------------------------------ mechanism, pairs


def test_mechanism_correlations_pool_the_aligned_steps():
    rng = np.random.default_rng(5)
    runs, dhs, covs, firsts = [], [], [], []
    for _ in range(3):
        cov = rng.uniform(0.1, 1.0, 20)
        first = -0.5 * cov + rng.normal(0, 0.1, 20)
        dh = first + rng.normal(0, 0.05, 20)
        runs.append(_entry(np.linspace(0.5, 0.2, 11), law(np.linspace(0.5, 0.2, 11)), dh=dh, cov=cov, first=first))
        dhs.append(dh)
        covs.append(cov)
        firsts.append(first)
    # one run lost the covariance of its step 1: that step drops out of the cov correlation only
    runs[0]["curves"]["cov_mean"] = runs[0]["curves"]["cov_mean"][1:]
    runs[0]["curves"]["cov_step"] = runs[0]["curves"]["cov_step"][1:]
    out = ra.mechanism({"m": _method(runs)})["m"]
    dh_cov = np.concatenate([dhs[0][1:], dhs[1], dhs[2]])
    cov_all = np.concatenate([covs[0][1:], covs[1], covs[2]])
    assert math.isclose(out["corr_cov"]["r"], np.corrcoef(dh_cov, -cov_all)[0, 1], abs_tol=1e-12)
    assert out["corr_cov"]["n"] == 59
    assert math.isclose(out["corr_first_order"]["r"], np.corrcoef(np.concatenate(dhs), np.concatenate(firsts))[0, 1],
                        abs_tol=1e-12)
    assert out["corr_first_order"]["r"] > 0.9 and out["corr_first_order"]["ci95"][0] > 0.8
    rose = np.concatenate(dhs) > 0
    assert out["corr_first_order"]["steps_entropy_rose"] == int(rose.sum())


def test_paired_differences_against_grpo_and_the_start():
    h = np.linspace(0.5, 0.3, 11)
    grpo = [_entry(h, law(h) + 0.01 * s, greedy=[0.2] * 10 + [0.25 + 0.01 * s], pass16=[0.7] * 10 + [0.5])
            for s in range(3)]
    meth = [_entry(h, law(h) + 0.01 * s + 0.02, greedy=[0.2] * 10 + [0.2 + 0.02 * s], pass16=[0.7] * 10 + [0.65])
            for s in range(3)]
    methods = {"grpo": _method(grpo), "m": _method(meth)}
    pv = ra.paired_vs_reference(methods, ["1"], STEPS)["m"]
    assert np.allclose(pv["greedy_accuracy"]["per_seed"], [0.2 - 0.25, 0.22 - 0.26, 0.24 - 0.27])
    assert np.allclose(pv["avg16_t1"]["per_seed"], [0.02] * 3) and math.isclose(pv["pass16_t1"]["mean"], 0.15)
    assert math.isclose(pv["late_avg16_t1"]["mean"], 0.02, abs_tol=1e-12)
    st = ra.vs_start(methods, ["1"], STEPS)
    assert math.isclose(st["grpo"]["pass16_t1"]["mean"], -0.2) and math.isclose(st["m"]["pass16_t1"]["mean"], -0.05)
    assert np.allclose(st["grpo"]["greedy_accuracy"]["per_seed"], [0.05, 0.06, 0.07])


def test_selection_says_whether_the_share_binds():
    h = np.linspace(0.5, 0.3, 11)
    wide = _entry(h, law(h))
    wide["curves"]["token_share"] = {"clip_cov_frac": [0.008, 0.006, 0.05, 0.004]}   # one step at r = 0.05
    tight = _entry(h, law(h))
    tight["curves"]["token_share"] = {"kl_cov_frac": [0.002, 0.002]}
    methods = {"clip_cov": {"settings": ["loss.name=clip_cov", "loss.clip_cov_ratio=0.05"], "seeds": {"1": wide}},
               "kl_cov": {"settings": ["loss.kl_cov_ratio=2e-3"], "seeds": {"1": tight}},
               "grpo": {"settings": ["loss.name=ppo"], "seeds": {"1": _entry(h, law(h))}}}
    out = ra.selection(methods)
    assert set(out) == {"clip_cov", "kl_cov"}
    assert math.isclose(out["clip_cov"]["mean_selected_share"], 0.017)
    assert out["clip_cov"]["window_decided_share_of_steps"] == 0.75
    assert out["kl_cov"]["window_decided_share_of_steps"] is None and out["kl_cov"]["configured_share"] == 2e-3
