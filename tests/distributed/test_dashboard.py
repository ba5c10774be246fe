"""What a user sees in TensorBoard after the comparison script, read back through TensorBoard's own loaders.

bench/quickstart_compare.py runs (shortened by --set overrides) its SFT warm start and GRPO, Clip-Cov and
KL-Cov from it, as sibling runs. The event files are then loaded the way `tensorboard --logdir` serves them
(EventMultiplexer + MultiplexerDataProvider, the custom-scalars plugin's own layout merge) and checked against
values computed here: run names, the merged "Entropy control" layout and that each of its charts finds its
scalars in every run, the law image (re-rendered from the scalars read back), histogram counts against the
logged token counts, the config text against resolved_config.yaml and the code revision against git.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_dashboard_browser import drawn_series, expected_series, open_browser, scalar_tags, tensorboard_server

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVAL_INTERVAL, IMAGE_INTERVAL, MIN_POINTS = 4, 2, 3, 3
METHODS = ("grpo", "clip_cov", "kl_cov")
OVERRIDES = ["sft.steps=10", "sft.eval_size=8", "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4",
             f"eval.interval={EVAL_INTERVAL}", "eval.num_prompts=8", "eval.n_samples=4", "eval.pass_k=[1,4]",
             f"metrics.law_fit_min_points={MIN_POINTS}", f"metrics.law_image_interval={IMAGE_INTERVAL}",
             "optim.micro_batch_size=16"]


@pytest.fixture(scope="module")
def revision():
    """The checkout's git revision when the runs start (None outside a git checkout): a commit made while they
    run (a shared working tree) must not make the recorded revision look wrong."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return sha.stdout.strip() if sha.returncode == 0 else None


@pytest.fixture(scope="module")
def logdir(tmp_path_factory, revision):
    """`runs/` holding `compare/` as the comparison script writes it."""
    runs = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "bench/quickstart_compare.py", "--out", str(runs / "compare"), "--steps", str(STEPS)]
    cmd += [x for kv in OVERRIDES for x in ("--set", kv)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert f"tensorboard --logdir {runs}" in out.stdout
    return runs


@pytest.fixture(scope="module")
def tb(logdir):
    """TensorBoard's loaders over the log directory, as `tensorboard --logdir runs` builds them."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = CustomScalarsPlugin(base_plugin.TBContext(data_provider=provider, logdir=str(logdir),
                                                       multiplexer=multiplexer))

    class TB:
        ctx = context.RequestContext()

        def scalars(self, plugin_name="scalars"):
            data = provider.read_scalars(self.ctx, experiment_id="", plugin_name=plugin_name, downsample=10**6)
            return {run: {tag: {p.step: p.value for p in points} for tag, points in tags.items()}
                    for run, tags in data.items()}

        def tensors(self, plugin_name):
            return provider.read_tensors(self.ctx, experiment_id="", plugin_name=plugin_name, downsample=10**6)

        def images(self):
            seqs = provider.read_blob_sequences(self.ctx, experiment_id="", plugin_name="images", downsample=10**6)
            return {run: {tag: {d.step: provider.read_blob(self.ctx, blob_key=d.values[2].blob_key) for d in data}
                          for tag, data in tags.items()} for run, tags in seqs.items()}

        def layout(self):
            import json

            return json.loads(plugin.layout_impl(self.ctx, ""))

        runs = staticmethod(lambda: sorted(multiplexer.Runs()))

    return TB()


def _run(method):
    return f"compare/{method}/tensorboard"


def test_every_run_is_listed_by_its_name(tb):
    assert tb.runs() == sorted([*map(_run, METHODS), "compare/sft/sft/tensorboard"])


def test_the_layout_opens_on_entropy_control_and_every_chart_finds_its_scalars(tb):
    from megatron_entcov.monitor.dashboard import LAYOUT_CATEGORY, entropy_control_layout

    layout = tb.layout()
    mine = entropy_control_layout()
    # Three runs wrote the same layout: TensorBoard merges it into one copy, Entropy control first.
    assert [c["title"] for c in layout["category"]] == list(mine)
    assert layout["category"][0]["title"] == LAYOUT_CATEGORY
    scalars = tb.scalars()
    for category in layout["category"]:
        charts = mine[category["title"]]
        assert [c["title"] for c in category["chart"]] == list(charts)
        for chart in category["chart"]:
            kind, tags = charts[chart["title"]]
            if kind == "Margin":
                (series,) = chart["margin"]["series"]
                assert [series["value"], series["lower"], series["upper"]] == tags
                for method in METHODS:
                    assert set(tags) <= set(scalars[_run(method)]), (method, tags)
                continue
            assert chart["multiline"]["tag"] == tags
            for method in METHODS:
                matched = [t for t in scalars[_run(method)] if any(re.match(p, t) for p in tags)]
                # Every chart of the dashboard shows something in every run (server throughput needs SGLang).
                if "server" not in chart["title"]:
                    assert matched, f"{method}: chart {chart['title']!r} matches none of its tags {tags}"
    # The share each method acts on is on the dashboard: its own tag, non-zero.
    assert max(scalars[_run("clip_cov")]["train/clip_cov_frac"].values()) > 0
    assert max(scalars[_run("kl_cov")]["train/kl_cov_frac"].values()) > 0


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium (skips where no browser can be installed: test_dashboard_browser.py)."""
    yield from open_browser()


def test_every_chart_draws_its_series_in_a_browser(chromium, logdir, tmp_path):
    """The CUSTOM SCALARS tab in headless Chromium (test_dashboard_browser.py): every chart of the layout draws
    one line per (run, tag) its regexes match in the event files (a band too for the Margin chart), counted
    here. Before the charted tags lost their "(unit)", "time per phase" and "memory per phase" drew nothing."""
    from megatron_entcov.monitor.dashboard import entropy_control_layout

    tags = scalar_tags(logdir)
    expected = expected_series(entropy_control_layout(), tags)
    assert all(v["lines"] > 0 for v in expected.values()), expected
    with tensorboard_server(logdir, tags, tmp_path / "tensorboard.log") as url:
        got, errors = drawn_series(chromium, url, expected)
    assert got == expected, (
        f"charts drawing other than their matched series: "
        f"{ {t: (got.get(t), e) for t, e in expected.items() if got.get(t) != e} }; page errors: {errors[:3]}")


def test_the_law_image_is_the_law_of_the_points_logged_so_far(tb):
    """law/fit every IMAGE_INTERVAL steps and at the end, equal to the image re-rendered from the held-out
    (eval/entropy, eval/accuracy) scalars read back (float32: the fit may differ in the last digits), and
    different from the image of the other step's points."""
    import matplotlib.image

    from megatron_entcov.monitor.law_report import law_snapshot

    images, scalars = tb.images(), tb.scalars()
    for method in METHODS:
        run = _run(method)
        pngs = images[run]["law/fit"]
        assert sorted(pngs) == sorted({IMAGE_INTERVAL, STEPS}), sorted(pngs)
        h, r = scalars[run]["eval/entropy"], scalars[run]["eval/accuracy"]
        assert sorted(h) == list(range(0, STEPS + 1, EVAL_INTERVAL))
        rendered = {}
        for step in pngs:
            points = [s for s in sorted(h) if s <= step]
            rendered[step] = law_snapshot([h[s] for s in points], [r[s] for s in points], points,
                                          min_points=MIN_POINTS, step=step, source="eval").astype(np.float64)
        for step, png in pngs.items():
            got = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255.0
            assert got.shape == rendered[step].shape, (method, step)
            assert np.abs(got - rendered[step]).mean() < 0.5, (method, step)
            other = rendered[STEPS if step != STEPS else IMAGE_INTERVAL]
            assert np.abs(got - other).mean() > 1.0, (method, step, "the images of both steps look the same")


def test_histograms_count_every_token_of_the_step(tb):
    """The default sample (4096 tokens) exceeds these batches: every response token is in cov/tokens and
    entropy/tokens; the chosen tokens exist for Clip-Cov and KL-Cov only."""
    scalars = tb.scalars()
    hist = tb.tensors("histograms")
    for method in METHODS:
        run = _run(method)
        tags = set(hist[run])
        chosen = {"cov/chosen_tokens", "entropy/chosen_tokens"}
        assert {"cov/tokens", "entropy/tokens"} <= tags and (chosen <= tags) == (method != "grpo"), (method, tags)
        tokens = scalars[run]["perf/tokens"]
        for tag in ("cov/tokens", "entropy/tokens"):
            counts = {d.step: d.numpy[:, 2].sum() for d in hist[run][tag]}
            assert counts == {s: tokens[s] for s in range(1, STEPS + 1)}, (method, tag)
        entropy = hist[run]["entropy/tokens"]
        for d in entropy:
            lo, hi = d.numpy[0, 0], d.numpy[-1, 1]
            assert 0.0 <= lo <= hi <= np.log(20) + 1e-6, (method, d.step, lo, hi)
        if method != "grpo":
            # Chosen tokens exactly when the logged share says some were chosen (counts: test_metrics_truth).
            frac = scalars[run]["train/clip_cov_frac" if method == "clip_cov" else "train/kl_cov_frac"]
            counts = {d.step: d.numpy[:, 2].sum() for d in hist[run]["cov/chosen_tokens"]}
            assert set(counts) == {s for s in range(1, STEPS + 1) if frac[s] > 0} != set(), (method, counts, frac)
            assert all(0 < counts[s] < tokens[s] for s in counts), (method, counts)


def test_config_and_code_revision_are_text_at_step_zero(tb, logdir, revision):
    text = tb.tensors("text")
    for run, run_dir in [(_run(m), logdir / "compare" / m) for m in METHODS] + \
                        [("compare/sft/sft/tensorboard", logdir / "compare" / "sft" / "sft")]:
        (config,) = text[run]["run/config/text_summary"]          # add_text's tag: name + /text_summary
        (source,) = text[run]["run/source/text_summary"]
        assert config.step == 0 and source.step == 0
        body = config.numpy.item().decode()
        assert all(line.startswith("    ") for line in body.splitlines()), "not a Markdown code block"
        resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
        assert yaml.safe_load("\n".join(line[4:] for line in body.splitlines())) == resolved
        if revision is not None:                  # a git checkout (CI clones one)
            assert f"| git revision | `{revision}" in source.numpy.item().decode()
