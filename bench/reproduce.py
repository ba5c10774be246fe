"""Reproduce the entropy-mechanism claims at CPU scale on the countdown task.

    python bench/reproduce.py --seeds 1 2 3 --out runs/reproduce [--quick | --smoke | --profile long] [--jobs 2]
                              [--methods grpo clip_cov high_entropy_tokens archer ce_gppo ...] [--steps N]
                              [--eval-interval N] [--sft-checkpoint DIR] [--report-only]

1. SFT from scratch (configs/countdown.yaml: a 3-layer, 0.6M-parameter character model) on generated countdown
   traces, once per --out (the checkpoint is reused by every seed and method, and by a re-run into the same
   --out); the checkpoint is also written as Hugging Face weights (<out>/sft_hf) so the same runs work with
   `--set rollout.engine=sglang --set model.hf_dir=<out>/sft_hf`.
2. RL from that checkpoint for every (method, seed) (bench/reproduce_profiles.py: plain GRPO (PPO clip 0.2/0.2),
   clip-higher, entropy bonus, Clip-Cov and KL-Cov (constant and annealed to 0; the long profile adds the released
   settings), the token-entropy family). Within a seed every method sees the same prompts in the same order and
   the same per-sample random streams (both are functions of the run seed); the seed changes the RL data stream
   and the sampling, not the SFT checkpoint nor the held-out evaluation problems (every run evaluates the same
   ones: eval.seed is the SFT seed). Runs go to --jobs worker processes (one torch thread each), each running
   its share of the runs one after another in one Python process. The long profile keeps a checkpoint at every
   evaluation and re-scores each (and the SFT start) at T = 0.6 after its run (bench/reproduce_rescore.py).
3. Everything is read back from the runs' TensorBoard scalars (and rescore.json) and written to
   <out>/summary.json (per method and seed: final held-out accuracy (greedy and avg@16), pass@k, entropy, entropy
   drop over the first quarter, the R = -a exp(H) + b fit on held-out avg@16 (and on greedy accuracy,
   law_greedy_*) and its ceiling, the correlation of the step's measured entropy change with -cov/mean, and the
   curves; ``analysis``: lift against GRPO's law, the law's form, its predictive value, the mechanism's
   correlations, seed-paired differences against GRPO and against step 0, each with its interval:
   bench/reproduce_analysis.py), <out>/table.md, and the plots entropy.png, eval.png, law.png, pass_at_k.png
   (bench/reproduce_report.py).

Profiles: full (default; budget <= 90 min on 2 cores), --quick (<= 15 min: shorter SFT and RL, smaller
batches), --smoke (a tiny model and a few steps: checks the pipeline end to end in make test, < 2 min),
--profile long (200 steps, 12 methods, T = 1 and 0.6; ~2.3-2.9 h on 2 cores, sizing in docs/reproduction.md).
``--report-only`` re-reads the runs under --out (and redoes the analysis) without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):      # the package, and this script's sibling modules
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from reproduce_analysis import analyse, temperature_key  # noqa: E402
from reproduce_profiles import (  # noqa: E402,F401  (re-exported: tests and users read them from here)
    ALL_METHODS,
    COMMON_RL,
    LONG_METHODS,
    METHODS,
    PROFILES,
    SFT_SEED,
    TOKEN_ENTROPY,
    default_methods,
    method_overrides,
)
from reproduce_report import plot, write_table  # noqa: E402
from reproduce_rescore import RESCORE_FILE, rescore_run  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "countdown.yaml"
PASS_K = (1, 2, 4, 8, 16)


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], log: Path, threads: int = 1) -> None:
    print("+", " ".join(cmd), f"> {log}", flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(threads), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")


def run_sft(out: Path, profile: dict, reuse: Path | None = None, threads: int = 1) -> tuple[Path, dict]:
    """SFT once per --out (reused when its checkpoint exists; ``reuse`` = another run's SFT checkpoints, e.g. a
    full run's for a --quick one: both profiles train the same SFT), then the HF export. Returns (checkpoints,
    info)."""
    ckpt = out / "sft" / "sft" / "checkpoints"
    info_path = out / "sft_info.json"
    if info_path.is_file() and (ckpt.is_dir() or reuse is not None):
        info = json.loads(info_path.read_text())
        return Path(info["checkpoint"]), info
    accuracy, sft_time = None, None
    if reuse is not None:
        if not (reuse.is_dir() and any(reuse.glob("step_*"))):
            raise ValueError(f"--sft-checkpoint {reuse}: not an SFT checkpoints directory (with step_* inside); "
                             f"pass <out>/sft/sft/checkpoints of an earlier run")
        ckpt = reuse
    else:
        t0 = time.monotonic()
        sets = [f"output_dir={out}", "name=sft", f"seed={SFT_SEED}", f"sft.steps={profile['sft_steps']}",
                *profile["set"]]
        log = out / "sft.log"
        _run([sys.executable, "-m", "megatron_entcov", "sft", "--config", str(BASE_CONFIG),
              *[x for kv in sets for x in ("--set", kv)]], log, threads)
        sft_time = time.monotonic() - t0
        for line in log.read_text().splitlines():
            if "greedy accuracy" in line:
                accuracy = float(line.rsplit(" ", 1)[1])
    hf = out / "sft_hf"
    _run([sys.executable, "-m", "megatron_entcov", "convert", "megatron-to-hf", "--ckpt", str(ckpt), "--out",
          str(hf), "--force"], out / "convert.log")
    from megatron_entcov.tasks.tokenizer import build_char_tokenizer

    if not (hf / "tokenizer.json").is_file():
        build_char_tokenizer(hf)
    info = {"checkpoint": str(ckpt), "hf_dir": str(hf), "steps": profile["sft_steps"], "time_s": sft_time,
            "greedy_accuracy_held_out": accuracy, "reused": reuse is not None}
    info_path.write_text(json.dumps(info, indent=1))
    return ckpt, info


def run_specs(out: Path, profile: dict, seeds: list[int], methods: list[str], sft_ckpt: Path) -> list[dict]:
    """One spec per (seed, method): its run directory and --set overrides; with the profile's eval_interval,
    evaluation and a kept checkpoint at that interval, and the temperatures its checkpoints are re-scored at."""
    steps = profile["steps"]
    from megatron_entcov.config import load_config

    mini_batches = load_config(str(BASE_CONFIG), []).optim.num_mini_batches
    table = method_overrides(steps, mini_batches)
    interval = profile.get("eval_interval")
    kept = [] if interval is None else [f"eval.interval={interval}", f"checkpoint.save_interval={interval}",
                                        f"checkpoint.keep_last={steps // interval + 2}"]
    specs = []
    for seed in seeds:
        for method in methods:
            sets = [f"output_dir={out / 'runs'}", f"name={method}_s{seed}", f"seed={seed}", f"steps={steps}",
                    f"checkpoint.load={sft_ckpt}", *COMMON_RL, *profile["set"], *kept, *table[method]]
            specs.append({"method": method, "seed": seed, "run_dir": str(out / "runs" / f"{method}_s{seed}"),
                          "set": sets, "settings": table[method], "sft_checkpoint": str(sft_ckpt),
                          "rescore": profile.get("rescore_temperatures", [])})
    return specs


def _train(spec: dict) -> None:
    """One RL run in this process (skipped when its done marker exists)."""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.trainer import Trainer

    done = Path(spec["run_dir"]) / "reproduce_done.json"
    cfg = load_config(str(BASE_CONFIG), spec["set"])
    if done.is_file():
        ran = json.loads(done.read_text()).get("steps", cfg.steps)
        if ran != cfg.steps:
            raise ValueError(f"{spec['run_dir']} holds a finished run of {ran} steps, not {cfg.steps}: give --steps "
                             f"{ran}, or another --out for a run of {cfg.steps} steps")
        return
    t0 = time.monotonic()
    cfg.resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    try:
        trainer.train()
    finally:
        trainer.close()
    destroy_parallel()
    done.write_text(json.dumps({"time_s": time.monotonic() - t0, "steps": cfg.steps}))
    print(f"[reproduce] {spec['method']} seed {spec['seed']}: {time.monotonic() - t0:.0f} s", flush=True)


def worker(spec_file: Path) -> int:
    """Run the RL runs of one spec file one after another in this process (one torch thread), each followed by
    its re-scoring at the spec's extra temperatures."""
    import torch

    torch.set_num_threads(1)
    from megatron_entcov.run.logs import setup_logging

    setup_logging(level="warning")
    for spec in json.loads(spec_file.read_text()):
        _train(spec)
        if spec.get("rescore"):
            t0 = time.monotonic()
            rescore_run(BASE_CONFIG, spec["set"], Path(spec["run_dir"]), Path(spec["sft_checkpoint"]),
                        spec["rescore"])
            print(f"[reproduce] {spec['method']} seed {spec['seed']}: re-scored at T = {spec['rescore']} in "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    return 0


def run_all(out: Path, specs: list[dict], jobs: int) -> None:
    """Deal the runs round-robin to ``jobs`` worker processes and wait for all of them."""
    procs = []
    for j in range(jobs):
        share = specs[j::jobs]
        if not share:
            continue
        spec_file = out / f"worker{j}.json"
        spec_file.write_text(json.dumps(share, indent=1))
        log = (out / f"worker{j}.log").open("w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
        print("+", " ".join(cmd), f"> {log.name}", flush=True)
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for proc, log in procs:
        if proc.wait():
            failed.append(log.name)
        log.close()
    if failed:
        raise RuntimeError(f"worker(s) failed: {', '.join(failed)} (see the end of each log)")


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


def _series(scalars: dict, tag: str) -> tuple[np.ndarray, np.ndarray]:
    pts = scalars.get(tag, [])
    return np.array([s for s, _ in pts], dtype=np.int64), np.array([v for _, v in pts], dtype=np.float64)


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _eval_temperature(run_dir: Path) -> float:
    """The trainer's evaluation temperature (eval.temperature of the run's resolved config)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    return float(cfg["eval"]["temperature"])


def _more_curves(scalars: dict, run_dir: Path) -> dict:
    """The exact first-order entropy change per step (entropy/delta_first_order; empty when the run did not log
    it) and the evaluations re-scored at other temperatures (rescore.json; sorted by step)."""
    t_first, first = _series(scalars, "entropy/delta_first_order")
    rescored = {}
    path = run_dir / RESCORE_FILE
    for t, block in (json.loads(path.read_text()) if path.is_file() else {}).items():
        order = np.argsort(block["step"])
        rescored[temperature_key(float(t))] = {
            key: ({k: np.asarray(v)[order].tolist() for k, v in val.items()} if isinstance(val, dict)
                  else np.asarray(val)[order].tolist()) for key, val in block.items()}
    return {"delta_h_first_order": first.tolist(), "delta_h_first_order_step": t_first.tolist(),
            "eval_by_temperature": rescored}


def _finals(block: dict) -> dict:
    """The last evaluation of a re-scored temperature: greedy accuracy, avg@n, pass@k."""
    return {"accuracy": block["accuracy"][-1], "mean_accuracy": block["mean_accuracy"][-1],
            "pass_at_k": {k: v[-1] for k, v in block["pass_at_k"].items()}, "step": block["step"][-1]}


def measure_run(run_dir: Path, steps: int) -> dict:
    """The summary entry of one run, computed from its TensorBoard scalars only."""
    from megatron_entcov.entropy_law import fit_entropy_law
    from megatron_entcov.monitor.metrics import read_scalars

    s = read_scalars(run_dir)
    t_h, h = _series(s, "entropy/mean")
    if len(h) == 0 or "eval/entropy" not in s:
        raise ValueError(f"{run_dir}: no entropy/mean or eval/entropy scalars (did the run finish? its log is "
                         f"in the worker logs under the output directory)")
    ev_steps, acc = _series(s, "eval/accuracy")
    _, ev_h = _series(s, "eval/entropy")
    pass_k = {k: _series(s, f"eval/pass@{k}")[1] for k in PASS_K if f"eval/pass@{k}" in s}
    t_dh, dh = _series(s, "entropy/delta_measured")
    t_cov, cov = _series(s, "cov/mean")
    share = {}
    for tag in ("train/clip_frac_low", "train/clip_frac_high", "train/clip_cov_frac", "train/kl_cov_frac"):
        share[tag.split("/")[1]] = _series(s, tag)[1].tolist()

    # Entropy drop over the first quarter of RL: the policy's entropy on its own samples at step 1 (entropy/mean
    # is logged for the step's rollouts, before its update) against the same at step 1 + steps // 4.
    quarter = max(steps // 4, 1)
    h0 = float(h[0])
    hq = float(h[min(quarter, len(h) - 1)])
    # First-order predictor (arXiv 2505.22617, Theorem 2): dH ~ -eta Cov(log pi, A); the measured change of the
    # step against the step's batch covariance (same step index).
    common = np.intersect1d(t_dh, t_cov)
    dh_c = dh[np.searchsorted(t_dh, common)]
    cov_c = cov[np.searchsorted(t_cov, common)]
    nz = (dh_c != 0) & (cov_c != 0)
    # R of the law: the held-out accuracy of sampled responses at the evaluation temperature (eval/pass@1 =
    # the mean over eval.n_samples samples per problem: avg@n, the paper's metric for its sampled benchmarks).
    # It averages n samples per problem, so it resolves what RL moves; greedy accuracy flips whole problems.
    mean_acc = pass_k.get(1, acc)
    entry: dict = {
        "final_eval_accuracy": float(acc[-1]),
        "final_eval_mean_accuracy": float(mean_acc[-1]),
        "final_eval_pass_at_k": {str(k): float(v[-1]) for k, v in pass_k.items()},
        "final_entropy": float(ev_h[-1]),
        "final_train_entropy": float(np.mean(h[-max(len(h) // 10, 1):])),
        "entropy_start": h0,
        "entropy_drop_first_quarter": 1.0 - hq / h0 if h0 > 0 else None,
        "cov_dh_corr": _corr(dh_c, -cov_c),
        "cov_dh_sign_agreement": float(np.mean(np.sign(dh_c[nz]) == np.sign(-cov_c[nz]))) if nz.any() else None,
        "curves": {
            "step": t_h.tolist(), "entropy": h.tolist(), "cov_mean": cov.tolist(), "cov_step": t_cov.tolist(),
            "delta_h_measured": dh.tolist(), "delta_h_step": t_dh.tolist(),
            "reward_mean_all": _series(s, "reward/mean_all")[1].tolist(),
            "eval_step": ev_steps.tolist(), "eval_accuracy": acc.tolist(), "eval_mean_accuracy": mean_acc.tolist(),
            "eval_entropy": ev_h.tolist(),
            "eval_pass_at_k": {str(k): v.tolist() for k, v in pass_k.items()},
            "token_share": share,
            **_more_curves(s, run_dir),
        },
    }
    entry["eval_temperature"] = _eval_temperature(run_dir)
    entry["final_by_temperature"] = {t: _finals(v) for t, v in entry["curves"]["eval_by_temperature"].items()}
    entry["law_reward"] = "eval/pass@1" if 1 in pass_k else "eval/accuracy"
    for prefix, r in (("law", mean_acc), ("law_greedy", acc)):
        try:
            fit = fit_entropy_law(ev_h, r)
            entry.update({f"{prefix}_a": fit.a, f"{prefix}_b": fit.b, f"{prefix}_r2": fit.r2,
                          f"{prefix}_ceiling": fit.ceiling})
        except ValueError as exc:  # fewer than 3 evaluations or constant entropy: say so, never invent a fit
            entry.update({f"{prefix}_a": None, f"{prefix}_b": None, f"{prefix}_r2": None,
                          f"{prefix}_ceiling": None, f"{prefix}_error": str(exc)})
    return entry


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


SUMMARY_KEYS = ("final_eval_accuracy", "final_eval_mean_accuracy", "final_eval_pass_at_16", "final_entropy",
                "entropy_drop_first_quarter", "law_r2", "law_ceiling", "law_greedy_r2", "cov_dh_corr")
"""Per-seed values whose mean and sample std over seeds each method's summary carries."""


def _final(entry: dict, key: str) -> float | None:
    """A per-seed value of SUMMARY_KEYS (pass@16 is read from final_eval_pass_at_k)."""
    return entry["final_eval_pass_at_k"].get("16") if key == "final_eval_pass_at_16" else entry.get(key)


def seed_stats(entries: list[dict]) -> dict:
    """SUMMARY_KEYS -> mean and sample std over one method's per-seed entries."""
    return {key: _stats([_final(e, key) for e in entries]) for key in SUMMARY_KEYS}


def summarise(out: Path, specs: list[dict], steps: int, main_temperature: float | None = None) -> dict:
    """Every run measured, per method the seeds' mean and std and its overrides (``settings``), the goals, and
    the analysis at ``main_temperature`` (default: the trainer's evaluation temperature)."""
    methods: dict = {}
    for spec in specs:
        entry = measure_run(Path(spec["run_dir"]), steps)
        done = Path(spec["run_dir"]) / "reproduce_done.json"
        entry["wall_s"] = json.loads(done.read_text())["time_s"] if done.is_file() else None
        m = methods.setdefault(spec["method"], {"settings": spec.get("settings"), "seeds": {}})
        m["seeds"][str(spec["seed"])] = entry
    for m in methods.values():
        m["mean"] = seed_stats(list(m["seeds"].values()))
    entries = [e for m in methods.values() for e in m["seeds"].values()]
    temps = sorted({temperature_key(e["eval_temperature"]) for e in entries}
                   | {t for e in entries for t in e["curves"]["eval_by_temperature"]}, key=float, reverse=True)
    main = temperature_key(main_temperature if main_temperature is not None else entries[0]["eval_temperature"])
    return {"methods": methods, "goals": goals(methods), "analysis": analyse(methods, steps, temps, main)}


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def goals(methods: dict) -> dict:
    """The reproduction's goals (docs/reproduction.md), checked on the measured numbers (None where a method was not run)."""
    g: dict = {}
    grpo = methods.get("grpo")
    if grpo:
        seeds = list(grpo["seeds"].values())
        g["grpo_entropy_halves_in_first_quarter"] = all((e["entropy_drop_first_quarter"] or 0) >= 0.5 for e in seeds)
        g["grpo_law_r2_ge_0.9"] = all((e["law_r2"] or 0) >= 0.9 for e in seeds)
        # The ceiling against the final value of the accuracy the law was fitted on.
        g["grpo_ceiling_within_0.03"] = all(
            e["law_ceiling"] is not None
            and abs(e["law_ceiling"] - e["final_eval_mean_accuracy"]) <= 0.03
            for e in seeds)
        for cov in ("clip_cov", "kl_cov"):
            if cov not in methods:
                continue
            for key, name in (("final_eval_accuracy", "accuracy"), ("final_eval_pass_at_16", "pass16")):
                b = grpo["mean"][key]
                values = [_final(e, key) for e in methods[cov]["seeds"].values()]
                if b["mean"] is None or any(v is None for v in values):
                    continue
                # Every seed of the method above GRPO's mean plus GRPO's sample std over seeds; one GRPO seed
                # has no spread to beat: the goal is undecided (None), not met by default.
                g[f"{cov}_beats_grpo_{name}_by_more_than_spread"] = (
                    all(v > b["mean"] + b["std"] for v in values) if b["n"] > 1 else None)
            g[f"{cov}_entropy_above_grpo_throughout"] = all(
                np.all(np.asarray(methods[cov]["seeds"][k]["curves"]["entropy"][1:]) >
                       np.asarray(e["curves"]["entropy"][1:]))
                for k, e in grpo["seeds"].items() if k in methods[cov]["seeds"])
    if "entropy_bonus" in methods and "entropy_bonus_annealed" in methods:
        c, a = methods["entropy_bonus"]["mean"], methods["entropy_bonus_annealed"]["mean"]
        for key, name in (("final_entropy", "entropy"), ("final_eval_accuracy", "accuracy"),
                          ("final_eval_mean_accuracy", "mean_accuracy")):
            g[f"entropy_bonus_final_{name}_minus_annealed"] = _diff(c[key]["mean"], a[key]["mean"])
    for cov in ("clip_cov", "kl_cov"):
        if cov in methods and f"{cov}_annealed" in methods:
            c, a = methods[cov]["mean"], methods[f"{cov}_annealed"]["mean"]
            for key, name in (("final_eval_accuracy", "accuracy"), ("final_eval_mean_accuracy", "mean_accuracy"),
                              ("final_eval_pass_at_16", "pass16")):
                g[f"{cov}_annealed_minus_constant_{name}"] = _diff(a[key]["mean"], c[key]["mean"])
    return g


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="RL seeds (default 1 2 3)")
    parser.add_argument("--out", default="runs/reproduce", help="output directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="the <= 15 minute profile (= --profile quick)")
    group.add_argument("--smoke", action="store_true", help="a tiny end-to-end check (make test; = --profile smoke)")
    group.add_argument("--profile", choices=tuple(PROFILES), default=None, help="full (default), quick, smoke, or "
                       "long (200 steps, 12 methods, T = 1 and 0.6, kept checkpoints; ~2.3-2.9 h on 2 cores)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {', '.join(ALL_METHODS)} "
                        f"(default: {', '.join(METHODS)}; long profile: {', '.join(LONG_METHODS)})")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--steps", type=int, default=None,
                        help="RL steps per run instead of the profile's (a longer horizon; annealing follows)")
    parser.add_argument("--eval-interval", type=int, default=None,
                        help="long profile: evaluate, keep and re-score a checkpoint every this many steps instead "
                             "of 25 (a short check of the long pipeline)")
    parser.add_argument("--sft-checkpoint", type=Path, default=None,
                        help="reuse this SFT checkpoints directory (<out>/sft/sft/checkpoints of an earlier run)")
    parser.add_argument("--report-only", action="store_true", help="only summarise the runs under --out")
    parser.add_argument("--analyse-summary", type=Path, default=None, metavar="SUMMARY_JSON",
                        help="redo only the analysis (and table.md beside it) of an existing summary.json whose "
                             "runs are gone (its per-seed curves are all it needs)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def _profile(args, parser) -> tuple[str, dict, list[str]]:
    """(profile name, profile with the command line's overrides, methods), every bad argument refused."""
    name = "smoke" if args.smoke else "quick" if args.quick else args.profile or "full"
    methods = list(args.methods or default_methods(name))
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        parser.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give at least 1 worker process")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        parser.error(f"--seeds {args.seeds}: give distinct non-negative integers")
    profile = dict(PROFILES[name])
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps {args.steps}: give at least 1 RL step")
        profile["steps"] = args.steps
    if args.eval_interval is not None:
        if "eval_interval" not in profile or args.eval_interval < 1:
            parser.error(f"--eval-interval {args.eval_interval}: only with --profile long, and at least 1")
        profile["eval_interval"] = args.eval_interval
    return name, profile, methods


def analyse_summary(path: Path) -> dict:
    """Redo summary["analysis"] (and table.md beside it) from the per-seed curves of an existing summary.json."""
    summary = json.loads(path.read_text())
    entries = [e for m in summary["methods"].values() for e in m["seeds"].values()]
    temps = sorted({temperature_key(e.get("eval_temperature", 1.0)) for e in entries}
                   | {t for e in entries for t in e["curves"].get("eval_by_temperature", {})}, key=float, reverse=True)
    from megatron_entcov.config import load_config

    mini_batches = load_config(str(BASE_CONFIG), []).optim.num_mini_batches
    for name, m in summary["methods"].items():      # summaries written before methods carried their settings
        m.setdefault("settings", method_overrides(summary["steps"], mini_batches).get(name))
    main = temperature_key(PROFILES.get(summary.get("profile"), {}).get(
        "main_temperature", entries[0].get("eval_temperature", 1.0)))
    summary["analysis"] = analyse(summary["methods"], summary["steps"], temps, main)
    path.write_text(json.dumps(summary, indent=1))
    print(write_table(path.parent, summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    if args.analyse_summary is not None:
        analyse_summary(args.analyse_summary)
        return 0
    name, profile, methods = _profile(args, parser)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sft_ckpt, sft_info = run_sft(out, profile, args.sft_checkpoint, threads=args.jobs)  # SFT runs alone
    specs = run_specs(out, profile, args.seeds, methods, sft_ckpt)
    if not args.report_only:
        run_all(out, specs, args.jobs)
    summary = summarise(out, specs, profile["steps"], profile.get("main_temperature"))
    wall = time.monotonic() - t0
    if args.report_only and (out / "summary.json").is_file():  # keep the time of the run that trained
        wall = json.loads((out / "summary.json").read_text()).get("wall_time_s", wall)
    summary.update(profile=name, steps=profile["steps"], seeds=args.seeds, sft=sft_info, wall_time_s=wall,
                   command=" ".join(sys.argv))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = write_table(out, summary)
    plot(out, summary)
    print(table)
    print(json.dumps(summary["goals"], indent=1))
    print(f"[reproduce] {name}: {summary['wall_time_s']:.0f} s; wrote {out / 'summary.json'}, table.md, entropy.png, "
          f"eval.png, law.png, pass_at_k.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
