"""`megatron-entcov fit-law RUN_DIR`: fit R = -a*exp(H) + b to a run's logged (entropy, reward) points and
write a PNG of R against H with the fitted curve, plus a JSON with the fit and the predicted ceiling.

Example:
    summary = write_law_report("runs/quickstart")   # -> runs/quickstart/entropy_law.{png,json}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_entcov.entropy_law import fit_entropy_law
from megatron_entcov.metrics import read_scalars

__all__ = ["write_law_report"]


def write_law_report(run_dir: str | Path, out_dir: str | Path | None = None, *,
                     entropy_tag: str = "entropy/mean", reward_tag: str = "reward/mean") -> dict:
    """Fit the law on the run's per-step (H, R) and write entropy_law.png / entropy_law.json."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    scalars = read_scalars(run_dir)
    for tag in (entropy_tag, reward_tag):
        if tag not in scalars:
            raise ValueError(f"run {str(run_dir)!r} has no '{tag}' scalars; is it an RL run directory?")
    h = dict(scalars[entropy_tag])
    r = dict(scalars[reward_tag])
    steps = sorted(set(h) & set(r))
    H = np.array([h[s] for s in steps])
    R = np.array([r[s] for s in steps])
    fit = fit_entropy_law(H, R)
    summary = {"run_dir": str(run_dir), "num_points": len(steps), "a": fit.a, "b": fit.b, "r2": fit.r2,
               "residual_std": fit.residual_std, "predicted_ceiling": fit.ceiling,
               "entropy_first": float(H[0]), "entropy_last": float(H[-1]),
               "reward_first": float(R[0]), "reward_last": float(R[-1])}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "entropy_law.json").write_text(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sc = ax.scatter(H, R, c=steps, cmap="viridis", s=18, label="steps")
    grid = np.linspace(0.0, max(H.max(), 1e-3) * 1.05, 200)
    ax.plot(grid, fit.predict(grid), "r-", label=f"R = -{fit.a:.3g} exp(H) + {fit.b:.3g}  (R²={fit.r2:.2f})")
    ax.axhline(fit.ceiling, color="gray", ls="--", lw=1, label=f"ceiling at H=0: {fit.ceiling:.3f}")
    ax.set_xlabel("policy entropy H (nats/token)")
    ax.set_ylabel("reward R")
    ax.legend(fontsize=8)
    fig.colorbar(sc, ax=ax, label="step")
    fig.tight_layout()
    fig.savefig(out_dir / "entropy_law.png", dpi=120)
    plt.close(fig)
    summary["png"] = str(out_dir / "entropy_law.png")
    return summary
