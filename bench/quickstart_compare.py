"""Entropy under plain GRPO vs Clip-Cov vs KL-Cov on the quickstart task, from one shared SFT warm start.

    python bench/quickstart_compare.py --out runs/compare [--steps 150] [--set key=value ...]

Runs the SFT warm start of configs/quickstart.yaml once, then RL from that checkpoint with
configs/quickstart_{grpo,clip_cov,kl_cov}.yaml (same seed, data order and step count), reads each run's
TensorBoard scalars and writes compare.png (training entropy per step, held-out accuracy per evaluation) and
compare.json (per method: mean entropy and reward over every generated sample over the first and last 20
steps, the step at which entropy first fell below 75% of its start, held-out greedy accuracy and pass@k at
the start and end, and R = -a exp(H) + b fitted on the held-out evaluations). Takes about 8-10 minutes on 2
CPU cores. The runs are siblings (--out/{sft/sft,grpo,clip_cov,kl_cov}): `tensorboard --logdir runs` overlays
them on every chart and on the "Entropy control" dashboard (CUSTOM SCALARS tab).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"grpo": "quickstart_grpo.yaml", "clip_cov": "quickstart_clip_cov.yaml", "kl_cov": "quickstart_kl_cov.yaml"}


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "megatron_entcov", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/compare", help="output directory (runs are written below it)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per method (default: the config's)")
    parser.add_argument("--report-only", action="store_true", help="only summarise runs already under --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for the SFT run and every RL run (repeatable)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    common = ["--set", f"output_dir={out}"] + (["--set", f"steps={args.steps}"] if args.steps else [])
    common += [x for kv in args.overrides for x in ("--set", kv)]
    sft_ckpt = out / "sft" / "sft" / "checkpoints"
    for method, config in ({} if args.report_only else METHODS).items():
        if method == "grpo":
            _run(["sft", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--set", "name=sft", *common])
        _run(["train", "--config", str(ROOT / "configs" / config), "--set", f"name={method}",
              "--set", f"checkpoint.load={sft_ckpt}", "--set", "checkpoint.save_interval=0", *common])

    from megatron_entcov.entropy_law import fit_entropy_law
    from megatron_entcov.monitor.metrics import read_scalars

    summary, curves = {}, {}
    for method in METHODS:
        s = read_scalars(out / method)
        h = np.array([v for _, v in s["entropy/mean"]])
        r = np.array([v for _, v in s["reward/mean_all"]])
        eval_steps = np.array([step for step, _ in s["eval/accuracy"]])
        acc = np.array([v for _, v in s["eval/accuracy"]])
        eval_h = np.array([v for _, v in s["eval/entropy"]])
        below = np.nonzero(h < 0.75 * h[:5].mean())[0]
        fit = fit_entropy_law(eval_h, acc)          # the paper's law: held-out accuracy against entropy
        pass_k = {tag.split("@")[1]: s[tag][-1][1] for tag in s if tag.startswith("eval/pass@")}
        summary[method] = {
            "entropy_first20": float(h[:20].mean()), "entropy_last20": float(h[-20:].mean()),
            "reward_all_first20": float(r[:20].mean()), "reward_all_last20": float(r[-20:].mean()),
            "entropy_drop_frac": float(1 - h[-20:].mean() / h[:20].mean()),
            "step_entropy_below_75pct": int(below[0]) + 1 if len(below) else None,
            "eval_accuracy_start": float(acc[0]), "eval_accuracy_final": float(acc[-1]),
            "eval_accuracy_best": float(acc.max()), "eval_pass_at_k_final": pass_k,
            "eval_entropy_start": float(eval_h[0]), "eval_entropy_final": float(eval_h[-1]),
            "law_points": len(acc), "law_a": fit.a, "law_b": fit.b, "law_r2": fit.r2, "law_ceiling": fit.ceiling,
        }
        curves[method] = (h, eval_steps, acc)
    (out / "compare.json").write_text(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(x, k=9):
        return np.convolve(x, np.ones(k) / k, mode="valid")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, (h, eval_steps, acc) in curves.items():
        axes[0].plot(np.arange(len(smooth(h))) + 5, smooth(h), label=method)
        axes[1].plot(eval_steps, acc, marker="o", ms=3, label=method)
    axes[0].set(xlabel="RL step", ylabel="entropy (nats/token)", title="policy entropy (9-step mean)")
    axes[1].set(xlabel="RL step", ylabel="held-out greedy accuracy", title="held-out evaluation")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    print(json.dumps(summary, indent=1))
    print(f"wrote {out / 'compare.png'} and {out / 'compare.json'}")
    print(f"the runs side by side (CUSTOM SCALARS tab: the Entropy control dashboard): "
          f"tensorboard --logdir {out.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
