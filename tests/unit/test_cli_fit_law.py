"""`megatron-entcov fit-law` through the command, on runs whose event files are written here: the fitted law is
printed with its signs read from the values (never "--0.02" or "+ -0.3"), a fit outside its meaning (a <= 0, a
ceiling outside [0, 1] for rewards in [0, 1] or below every reward seen, too few points) is said in one warning
line each, and an --out that is a file or cannot be written is one error line naming it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_dir(path: Path, entropies, rewards) -> Path:
    """A run directory with eval/entropy and eval/accuracy logged at steps 0, 10, 20, ..."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(path / "tensorboard"))
    for i, (h, r) in enumerate(zip(entropies, rewards)):
        writer.add_scalar("eval/entropy", h, 10 * i)
        writer.add_scalar("eval/accuracy", r, 10 * i)
    writer.close()
    return path


def _fit_law(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*(wrap or []), sys.executable, "-m", "megatron_entcov", "fit-law", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _law(entropies, rewards) -> tuple[float, float]:
    """(c, b) of R = c exp(H) + b by numpy's least squares (the law's a is -c)."""
    c, b = np.polyfit(np.exp(np.asarray(entropies, dtype=np.float64)), np.asarray(rewards, dtype=np.float64), 1)
    return float(c), float(b)


def _signed(c: float, b: float) -> str:
    return f"R = {c:.4g} * exp(H) {'-' if b < 0 else '+'} {abs(b):.4g}"


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("megatron-entcov fit-law: warning: ")]


def test_a_rising_reward_on_three_points_prints_proper_signs_and_warns(tmp_path):
    """Reward rising with entropy (a < 0) on 3 points, its R(0) negative: the trial printed
    "R = --0.1918 * exp(H) + -0.249" and a negative 'ceiling' without a word."""
    h, r = [0.5, 1.0, 1.5], [0.05, 0.3, 0.6]
    c, b = _law(h, r)
    assert c > 0 and b < 0 and c + b < 0          # the case: a = -c < 0, R(0) = c + b below 0
    proc = _fit_law(str(_run_dir(tmp_path / "run", h, r)))
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(_signed(c, b) + "  (R^2 "), first
    assert "--" not in first and "+ -" not in first, first
    assert f"R at H = 0: {c + b:.4f}" in first and "ceiling" not in first, first
    warnings = _warnings(proc.stderr)
    assert len(warnings) == 3, proc.stderr
    assert "3 points" in warnings[0] and "at least 5" in warnings[0], warnings
    assert f"a = {-c:.4g} <= 0" in warnings[1] and "no ceiling" in warnings[1], warnings
    assert f"{c + b:.4f}" in warnings[2] and "outside [0, 1]" in warnings[2], warnings
    summary = json.loads((tmp_path / "run" / "entropy_law.json").read_text())
    assert summary["a"] == pytest.approx(-c) and summary["b"] == pytest.approx(b)
    assert summary["warnings"] == [w.removeprefix("megatron-entcov fit-law: warning: ") for w in warnings]


def test_a_falling_reward_prints_the_law_and_its_ceiling_without_warnings(tmp_path):
    h = np.linspace(0.3, 1.2, 6)
    r = -0.3 * np.exp(h) + 1.1 + np.array([0.004, -0.003, 0.002, -0.004, 0.003, -0.002])
    c, b = _law(h, r)
    proc = _fit_law(str(_run_dir(tmp_path / "run", h, r)))
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(_signed(c, b) + "  (R^2 ") and first.startswith("R = -0.3"), first
    assert first.endswith(f"predicted ceiling {c + b:.4f}"), first
    assert _warnings(proc.stderr) == [], proc.stderr


def test_a_ceiling_above_one_for_rewards_in_zero_one_is_a_warning(tmp_path):
    h = np.linspace(0.3, 1.0, 6)
    r = -0.5 * np.exp(h) + 1.6             # R in [0.24, 0.93], R(0) = 1.1
    c, b = _law(h, r)
    proc = _fit_law(str(_run_dir(tmp_path / "run", h, r)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(_signed(c, b)), proc.stdout
    warnings = _warnings(proc.stderr)
    assert len(warnings) == 1 and f"{c + b:.4f}" in warnings[0] and "outside [0, 1]" in warnings[0], warnings


def test_out_naming_a_file_is_one_error_line(tmp_path):
    run = _run_dir(tmp_path / "run", np.linspace(0.3, 1.2, 6), np.linspace(0.8, 0.2, 6))
    out = tmp_path / "report.png"
    out.write_text("a file")
    proc = _fit_law(str(run), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"megatron-entcov fit-law: error: --out {str(out)!r} is a file, not a "
                                   "directory; name a directory (it is created when missing)"), proc.stderr
    assert out.read_text() == "a file"


def _read_only_wrapper(directory: Path) -> list[str] | None:
    """A command prefix under which ``directory`` is read-only: a read-only bind mount in a private mount
    namespace as root (a mode does not stop root), a mode of 0o555 otherwise; None when neither works."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    script = f'mount --bind "{directory}" "{directory}" && mount -o remount,bind,ro "{directory}" && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]


def test_out_in_a_read_only_directory_is_one_error_line(tmp_path):
    run = _run_dir(tmp_path / "run", np.linspace(0.3, 1.2, 6), np.linspace(0.8, 0.2, 6))
    out = tmp_path / "reports"
    out.mkdir()
    wrap = _read_only_wrapper(out)
    if wrap is None:
        pytest.skip("no way to make a read-only directory here (root without unshare/mount namespaces)")
    proc = _fit_law(str(run), "--out", str(out), wrap=wrap)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"megatron-entcov fit-law: error: cannot write {str(out / 'entropy_law.json')!r}: "
                               ), lines
    assert "--out" in lines[0] and "writable" in lines[0], lines
    assert not list(out.iterdir())
