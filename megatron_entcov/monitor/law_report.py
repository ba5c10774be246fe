"""`megatron-entcov fit-law RUN_DIR`: fit R = -a*exp(H) + b to a run's logged (entropy, reward) points and
write a PNG of R against H with the fitted curve, plus a JSON with the fit and the predicted ceiling. The
points are the held-out evaluations when the run logged them (eval/entropy, eval/accuracy), else the training
rollouts (entropy/mean, reward/mean_all); ``--source`` chooses.

Example:
    summary = write_law_report("runs/quickstart")   # -> runs/quickstart/entropy_law.{png,json}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_entcov.entropy_law import EntropyLawFit, fit_entropy_law, law_caveats
from megatron_entcov.monitor.metrics import read_scalars

__all__ = ["LAW_SOURCES", "law_figure", "law_image", "law_snapshot", "law_tags", "write_law_report"]


LAW_SOURCES = {"eval": ("eval/entropy", "eval/accuracy"), "train": ("entropy/mean", "reward/mean_all")}
"""(entropy tag, reward tag) of each source of the law's points: held-out evaluation (entropy and greedy accuracy
of the same weights on the held-out prompts; what the paper fits) or the training rollouts (every sample)."""


def law_tags(scalars: dict, source: str = "auto") -> tuple[str, str]:
    """The (entropy, reward) tags to fit: 'auto' = 'eval' when the run logged evaluations, else 'train'."""
    if source == "auto":
        source = "eval" if LAW_SOURCES["eval"][1] in scalars else "train"
    if source not in LAW_SOURCES:
        raise ValueError(f"law source {source!r} is invalid: choose auto, eval or train")
    h, r = LAW_SOURCES[source]
    if source == "train" and r not in scalars and "reward/mean" in scalars:
        r = "reward/mean"            # runs logged before reward/mean_all existed
    return h, r


def write_law_report(run_dir: str | Path, out_dir: str | Path | None = None, *, source: str = "auto",
                     entropy_tag: str | None = None, reward_tag: str | None = None) -> dict:
    """Fit the law on the run's (H, R) points and write entropy_law.png / entropy_law.json. ``source`` picks
    the tags (:func:`law_tags`); explicit ``entropy_tag`` / ``reward_tag`` override them. The summary's
    ``formula`` is the fit with its signs and ``warnings`` what it does not mean (entropy_law.law_caveats).
    ValueError (one line) for a run without the tags or an output directory that is a file or unwritable."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, not a directory; name a directory (it is created "
                         "when missing)")
    scalars = read_scalars(run_dir)
    default_h, default_r = law_tags(scalars, source)
    entropy_tag, reward_tag = entropy_tag or default_h, reward_tag or default_r
    for tag in (entropy_tag, reward_tag):
        if tag not in scalars:
            raise ValueError(f"run {str(run_dir)!r} has no '{tag}' scalars; is it an RL run directory?")
    h = dict(scalars[entropy_tag])
    r = dict(scalars[reward_tag])
    steps = sorted(set(h) & set(r))
    H = np.array([h[s] for s in steps])
    R = np.array([r[s] for s in steps])
    fit = fit_entropy_law(H, R)
    summary = {"run_dir": str(run_dir), "entropy_tag": entropy_tag, "reward_tag": reward_tag,
               "num_points": len(steps), "a": fit.a, "b": fit.b, "r2": fit.r2,
               "residual_std": fit.residual_std, "predicted_ceiling": fit.ceiling, "formula": fit.formula(),
               "warnings": law_caveats(fit, R),
               "entropy_first": float(H[0]), "entropy_last": float(H[-1]),
               "reward_first": float(R[0]), "reward_last": float(R[-1])}
    _writing(out_dir, lambda: out_dir.mkdir(parents=True, exist_ok=True))
    json_path, png_path = out_dir / "entropy_law.json", out_dir / "entropy_law.png"
    _writing(json_path, lambda: json_path.write_text(json.dumps(summary, indent=1)))
    fig = law_figure(H, R, steps, fit, entropy_label=entropy_tag, reward_label=reward_tag)
    try:
        _writing(png_path, lambda: fig.savefig(png_path, dpi=120))
    finally:
        _close(fig)
    summary["png"] = str(png_path)
    return summary


def _writing(path: Path, write) -> None:
    """``write()``; an OSError becomes one line naming ``path`` (a read-only or full file system)."""
    try:
        write()
    except OSError as exc:
        verb = "create" if path.suffix == "" else "write"
        raise ValueError(f"cannot {verb} {str(path)!r}: {exc.strerror or exc}; name a writable directory with "
                         "--out") from None


def law_figure(entropies, rewards, steps, fit: EntropyLawFit | None, *, entropy_label: str, reward_label: str,
               title: str | None = None):
    """A matplotlib Figure: the (H, R) points coloured by step, the fitted R = -a exp(H) + b over [0, max H]
    and the predicted ceiling at H = 0 (no curve when ``fit`` is None). Close it with matplotlib's
    ``plt.close(fig)`` (or let :func:`law_image` do it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, R = np.asarray(entropies, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sc = ax.scatter(H, R, c=list(steps), cmap="viridis", s=18, label="steps")
    if fit is not None:
        grid = np.linspace(0.0, max(H.max(), 1e-3) * 1.05, 200)
        ax.plot(grid, fit.predict(grid), "r-", label=f"{fit.formula(digits=3)}  (R²={fit.r2:.2f})")
        ax.axhline(fit.ceiling, color="gray", ls="--", lw=1, label=f"ceiling at H=0: {fit.ceiling:.3f}")
    ax.set_xlabel(f"policy entropy H ({entropy_label}, nats/token)")
    ax.set_ylabel(f"R ({reward_label})")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.colorbar(sc, ax=ax, label="step")
    fig.tight_layout()
    return fig


def law_image(entropies, rewards, steps, fit: EntropyLawFit | None, *, entropy_label: str, reward_label: str,
              title: str | None = None) -> np.ndarray:
    """:func:`law_figure` rendered to a [H, W, 3] uint8 array (a TensorBoard image summary, dataformats HWC)."""
    fig = law_figure(entropies, rewards, steps, fit, entropy_label=entropy_label, reward_label=reward_label,
                     title=title)
    try:
        fig.set_dpi(100)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        _close(fig)


def law_snapshot(entropies, rewards, steps, *, min_points: int, step: int, source: str) -> np.ndarray:
    """The image the trainer logs as ``law/fit`` at ``step``: the law's (H, R) points so far (``source``: 'eval'
    or 'train', see LAW_SOURCES), with the least-squares fit and its ceiling once ``min_points`` exist."""
    fit = None
    if len(entropies) >= min_points:
        try:
            fit = fit_entropy_law(entropies, rewards)
        except ValueError:
            fit = None
    h_tag, r_tag = LAW_SOURCES[source]
    title = f"step {step}: {len(entropies)} points" + (
        f", ceiling {fit.ceiling:.3f}, R² {fit.r2:.2f}" if fit is not None else f" (fit from {min_points})")
    return law_image(entropies, rewards, steps, fit, entropy_label=h_tag, reward_label=r_tag, title=title)


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
