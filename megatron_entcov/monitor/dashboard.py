"""What TensorBoard shows beyond the scalars: the "Entropy control" custom-scalars layout and the run's identity
(resolved config, code revision) as text.

``tensorboard --logdir runs`` lists every run by its directory (``<name>/tensorboard`` for RL, its SFT warm
start as ``<name>/sft/tensorboard``); runs written side by side (bench/quickstart_compare.py) overlay on every
chart. The CUSTOM SCALARS tab (http://localhost:6006/#custom_scalars) opens on the "Entropy control" category:
the layout each run writes is merged by TensorBoard across runs, chart by chart, so three methods share one
dashboard. Chart tags are regular expressions matched from the start of a tag (TensorBoard's rule). A tag a
chart matches holds no "(": TensorBoard's charts then draw none of their series, so charted tags carry their
unit as a suffix (``perf/step_time_s``, ``mem/train/peak_GiB``; docs/design/monitor.md).

Example:
    logger.layout(entropy_control_layout())
    logger.text(step, "run/config", config_markdown(cfg))
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import yaml

from megatron_entcov.config import config_to_dict, source_revision

if TYPE_CHECKING:
    from megatron_entcov.config import RunConfig

__all__ = ["LAYOUT_CATEGORY", "config_markdown", "entropy_control_layout", "layout_tags", "source_markdown"]

LAYOUT_CATEGORY = "Entropy control"
"""The first category of the custom-scalars tab (TensorBoard opens it first)."""


def entropy_control_layout() -> dict:
    """The custom-scalars layout ({category: {chart: [kind, tags]}}, as SummaryWriter.add_custom_scalars takes
    it): "Entropy control" first, then "Rollouts and throughput". No tag these patterns match may hold "(" (module
    docstring); tests/distributed/test_dashboard.py counts what each chart draws in a browser."""
    return {
        LAYOUT_CATEGORY: {
            "policy entropy (nats/token): training samples, held-out samples": [
                "Multiline", [r"entropy/mean$", r"eval/entropy$"]],
            "reward (every sample, kept samples) and held-out accuracy, pass@k": [
                "Multiline", [r"reward/mean_all$", r"reward/mean$", r"eval/accuracy$", r"eval/pass@"]],
            "token covariance Cov(log pi, A): mean and quantiles": [
                "Multiline", [r"cov/mean$", r"cov/q"]],
            "token covariance: median with the 10-90% band": [
                "Margin", ["cov/q50", "cov/q10", "cov/q90"]],
            "share of tokens clipped (Clip-Cov, PPO) or penalised (KL-Cov)": [
                "Multiline", [r"train/clip_cov_frac$", r"train/kl_cov_frac$", r"train/clip_frac_",
                              r"train/high_entropy_frac$", r"train/archer_high_frac$"]],
            "entropy-reward law R = -a exp(H) + b: ceiling (R at H = 0) and R²": [
                "Multiline", [r"law/ceiling$", r"law/r2$"]],
            "entropy change per step: measured, exact first order (small vocabularies), predicted from the "
            "covariance": [
                "Multiline", [r"entropy/delta_measured$", r"entropy/delta_predicted$",
                              r"entropy/delta_first_order$"]],
            "entropy change per step by token class (measured shares; each partition adds up to the total)": [
                "Multiline", [r"entropy_class/delta_"]],
            "rollout vs trainer log-prob gap (after sync: probe gap)": [
                "Multiline", [r"rollout/logprob_gap$", r"sync/probe_gap$"]],
            "coefficients after annealing": ["Multiline", [r"coef/"]],
        },
        "Rollouts and throughput": {
            "response length: mean, longest, held-out": [
                "Multiline", [r"rollout/response_len$", r"rollout/response_len_max$", r"eval/response_len$"]],
            "time per phase (s)": [
                "Multiline", [r"perf/(rollout|reward|train|selection|sync|eval|step|histogram)_time"]],
            "tokens per second: trainer, servers": [
                "Multiline", [r"perf/tokens_per_s$", r"rollout/server[0-9]+/tokens_per_s$"]],
            "dynamic sampling: degenerate groups, refills": [
                "Multiline", [r"reward/degenerate_group_frac$", r"rollout/refill_"]],
            "memory per phase (GiB): GPU allocated, reserved, peak; host RSS; offloaded to the host": [
                "Multiline", [r"mem/"]],
        },
    }


def layout_tags(layout: dict) -> list[str]:
    """Every tag pattern of a layout (Multiline regexes and Margin tags), in order."""
    return [tag for charts in layout.values() for _, tags in charts.values() for tag in tags]


def config_markdown(cfg: "RunConfig") -> str:
    """The resolved config as a Markdown code block (every field, as resolved_config.yaml holds it)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip("\n")
    return "\n".join("    " + line for line in text.splitlines())


def source_markdown(world_size: int = 1) -> str:
    """The code and environment a run used, as a Markdown table: git revision, package and library versions,
    command line."""
    from megatron_entcov import __version__

    rows = [("git revision", source_revision()), ("megatron_entcov", __version__),
            ("python", sys.version.split()[0])]
    for module in ("torch", "megatron.core", "transformers"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            rows.append((module, getattr(mod, "__version__", "unknown")))
        except ImportError:
            rows.append((module, "not installed"))
    rows.append(("processes", str(world_size)))
    rows.append(("command", " ".join(sys.argv)))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | `{v}` |" for k, v in rows)
