"""bench/reproduce.py's report: table.md (per-method finals, and the analysis with its intervals) and the plots
entropy.png, eval.png, law.png, pass_at_k.png from summary.json.

Example:
    print(write_table(out, summary)); plot(out, summary)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_table", "analysis_table", "plot"]


def _fmt(st: dict, digits: int = 3) -> str:
    if st["mean"] is None:
        return "n/a"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}" if st["n"] > 1 else f"{st['mean']:.{digits}f}"


def write_table(out: Path, summary: dict) -> str:
    rows = ["| method | eval accuracy (greedy) | eval accuracy (avg@16) | pass@16 | final entropy (eval) | "
            "entropy drop, 1st quarter | law R² | law ceiling | corr(dH, -cov) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        mm = m["mean"]
        rows.append(f"| {name} | {_fmt(mm['final_eval_accuracy'])} | {_fmt(mm['final_eval_mean_accuracy'])} | "
                    f"{_fmt(mm['final_eval_pass_at_16'])} | "
                    f"{_fmt(mm['final_entropy'])} | {_fmt(mm['entropy_drop_first_quarter'], 2)} | "
                    f"{_fmt(mm['law_r2'], 2)} | {_fmt(mm['law_ceiling'])} | {_fmt(mm['cov_dh_corr'], 2)} |")
    text = "\n".join(rows) + ("\n\nmean ± sample std over seeds; the law is fitted on (held-out entropy, "
                               "avg@16) of every evaluation\n")
    if summary.get("analysis"):
        text += "\n" + analysis_table(summary["analysis"])
    (out / "table.md").write_text(text)
    return text


def _ci(value: float | None, ci: list | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.{digits}f}"
    return text if ci is None else f"{text} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _paired(block: dict, key: str) -> str:
    d = block.get(key)
    if d is None:
        return "n/a"
    p = "" if d["p_t"] is None else f", p {d['p_t']:.2f}"
    return _ci(d["mean"], d["ci95"]) + p


def _corr(block: dict | None) -> str:
    if not block or block["r"] is None:
        return "n/a"
    return _ci(block["r"], block["ci95"], 2)


def analysis_table(a: dict) -> str:
    """The analysis (summary["analysis"]) as markdown: lift, paired differences, mechanism; law form and
    predictability."""
    t = a["main_temperature"]
    rows = [f"| method | lift: mean residual | lift: last quarter | ceiling - GRPO's | avg@16 - GRPO (T={t}) | "
            f"pass@16 - GRPO (T={t}) | greedy - GRPO | pass@16 - step 0 (T={t}) | corr(dH, -cov) | "
            "corr(dH, first order) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, lf in a["lift"].items():
        if name == "reference":
            continue
        pv, st = a["paired_vs_grpo"].get(name, {}), a["vs_start"].get(name, {})
        mech = a["mechanism"].get(name, {})
        rows.append(f"| {name} | {_ci(lf['mean_residual'], lf['ci95'])} | {_ci(lf['late_residual'], lf['late_ci95'])}"
                    f" | {_ci(lf['ceiling_minus_grpo'], lf['ceiling_minus_grpo_ci95'])} | {_paired(pv, f'avg16_t{t}')}"
                    f" | {_paired(pv, f'pass16_t{t}')} | {_paired(pv, 'greedy_accuracy')} | "
                    f"{_paired(st, f'pass16_t{t}')} | {_corr(mech.get('corr_cov'))} | "
                    f"{_corr(mech.get('corr_first_order'))} |")
    rows += ["", "| runs | RMSE later half: exp / linear / log | exp - linear | law from 1st quarter / carry-forward "
             "| law - carry-forward |", "|---|---|---|---|---|"]
    for name, lf in a["law_form"].items():
        pr = a["predictability"].get(name)
        r = lf["rmse"]
        forms = " / ".join("n/a" if r[k] is None else f"{r[k]:.4f}" for k in ("exp", "linear", "log"))
        e = lf["exp_minus_linear"]
        fc = "n/a" if pr is None else " / ".join(
            "n/a" if pr["rmse"][k] is None else f"{pr['rmse'][k]:.4f}" for k in ("law", "carry_forward"))
        d = None if pr is None else pr["law_minus_carry_forward"]
        rows.append(f"| {name} | {forms} | {_ci(e['mean'], e['ci95'], 4)} | {fc} | "
                    f"{'n/a' if d is None else _ci(d['mean'], d['ci95'], 4)} |")
    return "\n".join(rows) + (
        f"\n\nAnalysis at T = {t} (bench/reproduce_analysis.py): lift = mean R - fit(H) against GRPO's law (all "
        "seeds), over every evaluation after step 0 and over the last quarter; paired differences are seed by "
        "seed (mean [t 95% interval], two-sided t p); other intervals are seed-bootstrap 95% (coarse at 3 seeds); "
        "correlations pool every step of every seed (Fisher 95%).\n")


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}

    def per_method(ax, x_key, y_key, sub=None):
        for name, m in methods.items():
            for i, e in enumerate(m["seeds"].values()):
                c = e["curves"]
                y = c[y_key] if sub is None else c[y_key][sub]
                ax.plot(c[x_key][:len(y)], y, color=colors[name], alpha=0.8, lw=1,
                        label=name if i == 0 else None)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    per_method(axes[0], "step", "entropy")
    axes[0].set(xlabel="RL step", ylabel="entropy (nats/token)", title="policy entropy on its samples")
    for name, m in methods.items():
        for i, e in enumerate(m["seeds"].values()):
            c = e["curves"]
            axes[1].scatter(-np.asarray(c["cov_mean"])[np.isin(c["cov_step"], c["delta_h_step"])],
                            np.asarray(c["delta_h_measured"])[np.isin(c["delta_h_step"], c["cov_step"])],
                            s=6, color=colors[name], label=name if i == 0 else None)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].axvline(0, color="k", lw=0.5)
    axes[1].set(xlabel="-cov/mean (batch Cov(log pi, A))", ylabel="measured entropy change of the step",
                title="dH ~ -eta Cov(log pi, A)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "entropy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    per_method(axes[0], "eval_step", "eval_accuracy")
    axes[0].set(xlabel="RL step", ylabel="held-out greedy accuracy", title="held-out accuracy (greedy)")
    per_method(axes[1], "eval_step", "eval_pass_at_k", "1")
    axes[1].set(xlabel="RL step", ylabel="held-out avg@16", title="held-out accuracy of samples (avg@16, T = 1)")
    per_method(axes[2], "eval_step", "eval_pass_at_k", "16")
    axes[2].set(xlabel="RL step", ylabel="held-out pass@16", title="held-out pass@16")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, m in methods.items():
        for i, e in enumerate(m["seeds"].values()):
            c = e["curves"]
            ax.scatter(c["eval_entropy"], c["eval_mean_accuracy"], s=10, color=colors[name],
                       label=name if i == 0 else None)
            if e["law_a"] is not None and name == "grpo":
                hh = np.linspace(0, max(c["eval_entropy"]) * 1.05, 50)
                ax.plot(hh, -e["law_a"] * np.exp(hh) + e["law_b"], color=colors[name], lw=1)
                ax.scatter([0], [e["law_ceiling"]], marker="*", s=60, color=colors[name])
    ax.set(xlabel="held-out entropy H (nats/token)", ylabel="held-out accuracy R (avg@16, temperature 1)",
           title="R = -a exp(H) + b (lines: GRPO fits; stars: ceiling at H = 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "law.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, m in methods.items():
        ks = sorted({int(k) for e in m["seeds"].values() for k in e["final_eval_pass_at_k"]})
        vals = [np.mean([e["final_eval_pass_at_k"][str(k)] for e in m["seeds"].values()]) for k in ks]
        ax.plot(ks, vals, marker="o", color=colors[name], label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="held-out pass@k (mean over seeds)", title="pass@k after RL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=110)
    plt.close(fig)
