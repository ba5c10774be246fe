"""The CUSTOM SCALARS dashboard as a user sees it: ``tensorboard`` served as a process on a free port, the tab
opened in headless Chromium (Debian's chromium and chromium-driver, driven by selenium), and the series each
chart draws counted in the page (the SVG lines of its plot, the bands of a Margin chart) against the series the
layout's regexes match in the run's event files, computed here with TensorBoard's Python loader.

Installs chromium and chromium-driver with apt-get when they are missing (root; ``make test`` does it first,
mk/browser.mk); skips, saying why, only where no browser can be installed. Every wait is bounded; the server is
always stopped. tests/distributed/test_dashboard.py runs the same check on the comparison's real runs.

Why a browser: TensorBoard 2.21's custom-scalar charts name a series "<tag> (<run>)" and read the run back with
/\\((.*)\\)$/, which starts at the first "(": a tag holding "(" yields a run name outside the colour domain, the
chart throws while drawing and shows none of its series. The loaders the Python tests read cannot see that.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from dist_utils import free_port

pytestmark = pytest.mark.distributed

PACKAGES = ("chromium", "chromium-driver")
PROGRAMS = ("chromium", "chromedriver")
WAIT_S = 90.0
# Polls (1 s apart) a drawing must stay the same, every series received, before it counts as final: a series
# whose data reached the card after its name can draw seconds later (3 polls once ended a check one line short).
STABLE_POLLS = 12
"""Bound on every wait: TensorBoard loading the runs, the page drawing its charts."""

# Every custom-scalar chart card, the lines its plot draws (not the faint unsmoothed "ghost" copies, not the
# outlines of a band) and the bands of a Margin chart; the series the card received from the server (frontend
# state, only to know when loading is over), per chart title. Cards and plots live in nested shadow roots.
_COUNT_JS = """
function all(root, sel, acc) {
  root.querySelectorAll(sel).forEach(e => acc.push(e));
  root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) all(e.shadowRoot, sel, acc); });
  return acc;
}
const drawn = (card, sel) => all(card.shadowRoot || card, sel, []).filter(p => (p.getAttribute('d') || '') !== '');
const out = {};
for (const card of all(document, 'tf-custom-scalar-multi-line-chart-card, tf-custom-scalar-margin-chart-card', [])) {
  out[card.title] = {lines: drawn(card, 'div.line-plot:not(.ghost):not(.area-plot) path.line').length,
                     bands: drawn(card, 'div.area-plot path.area').length,
                     received: card._nameToDataSeries ? Object.keys(card._nameToDataSeries).length : -1};
}
return out;
"""


def browser_unavailable() -> str | None:
    """Why no browser can run here (None when chromium and chromedriver are installed, or were just installed
    with apt-get: ``apt-get update`` first when the package lists do not know them)."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    need = f"chromium and chromedriver are not installed ({' '.join(PACKAGES)} from Debian)"
    if os.geteuid() != 0:
        return f"{need} and installing them needs root: apt-get install {' '.join(PACKAGES)}"
    if not shutil.which("apt-get"):
        return f"{need} and apt-get is not available to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=900)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0 or not all(shutil.which(p) for p in PROGRAMS):
        tail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["no output"]
        return f"{need} and `{' '.join(cmd)}` could not install them (exit {out.returncode}: {tail[0][:200]})"
    return None


def open_browser():
    """Headless Chromium under chromedriver, as a fixture's generator (the test skips where no browser can be
    installed); quit on exit."""
    reason = browser_unavailable()
    if reason:
        pytest.skip(f"no browser for the dashboard test: {reason}")
    from selenium import webdriver  # pinned in requirements/cpu.txt (make setup)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,1200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser():
    yield from open_browser()


def scalar_tags(logdir: Path) -> dict[str, set[str]]:
    """{run: its scalar tags}, read from the event files with TensorBoard's Python loader."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return {run: set(tags) for run, tags in multiplexer.PluginRunToTagToContent("scalars").items()}


def expected_series(layout: dict, tags: dict[str, set[str]]) -> dict[str, dict[str, int]]:
    """What each chart should draw over all runs: a Multiline chart one line per (run, tag) its regexes match
    (matched from the start of the tag, as TensorBoard matches them); a Margin chart one line and one band per
    run holding its value, lower and upper tags."""
    out = {}
    for charts in layout.values():
        for title, (kind, patterns) in charts.items():
            if kind == "Margin":
                n = sum(set(patterns) <= run_tags for run_tags in tags.values())
                out[title] = {"lines": n, "bands": n}
            else:
                n = sum(any(re.match(p, t) for p in patterns) for run_tags in tags.values() for t in run_tags)
                out[title] = {"lines": n, "bands": 0}
    return out


def _get_json(url: str):
    import json

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def tensorboard_server(logdir: Path, tags: dict[str, set[str]], log_path: Path):
    """``tensorboard --logdir logdir`` on 127.0.0.1 and a free port, yielding its URL once it serves every run's
    scalar tags; always stopped (by its PID) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast", "false"]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, served = time.monotonic() + WAIT_S, None
        while served != tags:
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.poll() is not None else f"not ready in {WAIT_S:.0f} s"
                raise AssertionError(f"tensorboard {state} (serving {served}); its log:\n"
                                     f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
            try:
                listing = _get_json(f"{url}/data/plugin/scalars/tags")
                served = {run: set(run_tags) for run, run_tags in listing.items()}
            except OSError:
                served = None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def drawn_series(driver, url: str, expected: dict[str, dict[str, int]]) -> tuple[dict, list[str]]:
    """({chart title: {"lines": n, "bands": n}} as the CUSTOM SCALARS tab draws them, the page's console errors).

    Polls the page until every chart draws what ``expected`` says, or until every chart received its series
    from the server and the drawing stayed the same for STABLE_POLLS polls in a row (a chart that fails to draw), or
    WAIT_S; then returns what the page draws (the caller compares)."""
    driver.get(f"{url}/#custom_scalars")
    deadline, last, same = time.monotonic() + WAIT_S, None, 0
    while time.monotonic() < deadline:
        page = driver.execute_script(_COUNT_JS)
        got = {title: {"lines": c["lines"], "bands": c["bands"]} for title, c in page.items()}
        if got == expected:
            break
        received = set(page) == set(expected) and all(
            page[t]["received"] == expected[t]["lines"] for t in expected)
        same = same + 1 if received and got == last else 0
        if same >= STABLE_POLLS:
            break
        last = got
        time.sleep(1.0)
    errors = sorted({entry["message"][:300] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"})
    return got, errors


def _write_toy_run(logdir: Path, layout: dict, tags: list[str]) -> None:
    """Two runs, each with ``layout`` and three steps of every tag in ``tags``."""
    from torch.utils.tensorboard import SummaryWriter

    for run in ("run1", "run2"):
        writer = SummaryWriter(str(logdir / run))
        writer.add_custom_scalars(layout)
        for step in range(3):
            for i, tag in enumerate(tags):
                writer.add_scalar(tag, float(step * (i + 1)), step)
        writer.close()


def test_a_chart_matching_a_tag_with_a_paren_draws_nothing(browser, tmp_path):
    """TensorBoard 2.21's behaviour that the project's charted tags avoid (dashboard.py): every chart whose
    regexes match a tag holding "(" draws none of its series, its other tags' included; tags with the unit as a
    suffix (``_s``, ``_GiB``), a ")" or "[...]" draw. Also shows that drawn_series sees an empty chart."""
    layout = {"toy": {
        "paren": ["Multiline", [r"a/with_paren", r"a/plain$"]],
        "suffix units": ["Multiline", [r"perf/step_time_s$", r"mem/train/peak_GiB$"]],
        "other brackets": ["Multiline", [r"c/"]],
        "band": ["Margin", ["b/mid", "b/low", "b/high"]],
    }}
    tags = ["a/with_paren(s)", "a/plain", "perf/step_time_s", "mem/train/peak_GiB", "c/close)", "c/time[s]",
            "b/mid", "b/low", "b/high"]
    _write_toy_run(tmp_path / "runs", layout, tags)
    run_tags = scalar_tags(tmp_path / "runs")
    expected = expected_series(layout, run_tags)
    assert expected == {"paren": {"lines": 4, "bands": 0}, "suffix units": {"lines": 4, "bands": 0},
                        "other brackets": {"lines": 4, "bands": 0}, "band": {"lines": 2, "bands": 2}}
    with tensorboard_server(tmp_path / "runs", run_tags, tmp_path / "tensorboard.log") as url:
        got, errors = drawn_series(browser, url, {**expected, "paren": {"lines": 0, "bands": 0}})
    assert {k: v for k, v in got.items() if k != "paren"} == {k: v for k, v in expected.items() if k != "paren"}
    assert got["paren"] == {"lines": 0, "bands": 0}, (
        f"TensorBoard now draws a chart matching a tag with '(' ({got['paren']}): the rule on charted tags in "
        "monitor/dashboard.py may be relaxed")
    assert any("was not in the domain" in e for e in errors), errors
