"""run_dir.RunDir and RunLock: a run directory belongs to one run (run.json) and one live process (run.lock).
A second run into it is refused with the fixes, --resume continues the same run id, --resume without a
checkpoint is an error, a lock held by a live process is refused naming its host and pid, a lock left by a
killed process is taken over with a warning. Single process (no process group); the lock holder of the
concurrency tests is a real second process."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_entcov.run.run_dir import RunDir, RunDirError

ROOT = Path(__file__).resolve().parents[3]


def _checkpoint(run_dir: Path, name: str, run_id: str | None) -> Path:
    """A complete step directory as the Checkpointer marks it (only what RunDir looks at)."""
    step = run_dir / "checkpoints" / name
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"run_id": run_id}) if run_id else "")
    return step


def _lock_state(run_dir: Path) -> tuple[bool, str]:
    """(free to flock, content) of run.lock."""
    path = run_dir / "run.lock"
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        free = True
    except BlockingIOError:
        free = False
    finally:
        os.close(fd)
    return free, path.read_text()


def test_a_new_run_records_its_identity_and_holds_the_lock(tmp_path):
    run = RunDir.open(tmp_path / "run", resume=False)
    identity = json.loads((tmp_path / "run" / "run.json").read_text())
    assert identity["run_id"] == run.run_id and re.fullmatch(r"[0-9a-f]{32}", run.run_id)
    free, content = _lock_state(tmp_path / "run")
    assert not free
    owner = json.loads(content)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    run.close()
    assert _lock_state(tmp_path / "run") == (True, "")
    run.close()  # idempotent


def test_a_second_run_into_a_run_directory_is_refused_and_resume_continues_it(tmp_path):
    run_dir = tmp_path / "quickstart"
    first = RunDir.open(run_dir, resume=False)
    first.close()
    with pytest.raises(RunDirError) as err:  # no checkpoint yet: --resume would not help, so it is not offered
        RunDir.open(run_dir, resume=False)
    text = str(err.value)
    assert str(run_dir) in text and first.run_id in text and "no complete checkpoint" in text, text
    assert "--set name=" in text and "remove" in text and "--resume" not in text, text
    assert _lock_state(run_dir) == (True, "")  # a refusal releases the lock

    _checkpoint(run_dir, "step_000100", first.run_id)
    _checkpoint(run_dir, "step_000150", first.run_id)
    with pytest.raises(RunDirError) as err:
        RunDir.open(run_dir, resume=False)
    text = str(err.value)
    assert "2 complete checkpoint(s), newest step_000150" in text and "--resume" in text, text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000100", "step_000150"]

    resumed = RunDir.open(run_dir, resume=True)
    assert resumed.run_id == first.run_id and resumed.resumed
    resumed.close()


def test_a_new_run_that_fails_to_start_gives_the_directory_back(tmp_path):
    """A config error found while building the model must not leave a run.json that refuses the corrected
    command; a run that saved a checkpoint, or a resumed one, keeps its identity."""
    run = RunDir.open(tmp_path / "typo", resume=False)
    run.close(failed_to_start=True)
    assert not (tmp_path / "typo" / "run.json").exists()
    assert _lock_state(tmp_path / "typo") == (True, "")
    again = RunDir.open(tmp_path / "typo", resume=False)
    assert again.run_id != run.run_id
    _checkpoint(tmp_path / "typo", "step_000001", again.run_id)
    again.close(failed_to_start=True)
    assert json.loads((tmp_path / "typo" / "run.json").read_text())["run_id"] == again.run_id
    resumed = RunDir.open(tmp_path / "typo", resume=True)
    (tmp_path / "typo" / "checkpoints" / "step_000001" / "COMPLETE").unlink()
    resumed.close(failed_to_start=True)
    assert (tmp_path / "typo" / "run.json").exists()


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(RunDirError, match=re.escape(
            f"checkpoint.resume=true but {str(empty)!r} holds no complete checkpoint; drop --resume")):
        RunDir.open(empty, resume=True)
    assert not (empty / "run.json").exists()
    # A run that stopped before its first save: dropping --resume would be refused too, so say what works.
    RunDir.open(empty, resume=False).close()
    (empty / "checkpoints" / "step_000010.tmp").mkdir(parents=True)  # a save killed midway is no checkpoint
    with pytest.raises(RunDirError, match="stopped before its first save; remove"):
        RunDir.open(empty, resume=True)


def test_a_directory_from_before_run_ids_is_continued_only_with_resume(tmp_path, caplog):
    old = tmp_path / "old"
    _checkpoint(old, "step_000150", None)
    with pytest.raises(RunDirError, match="checkpoints of an earlier run with 1 complete checkpoint"):
        RunDir.open(old, resume=False)
    with caplog.at_level(logging.WARNING, logger="megatron_entcov.run.run_dir"):
        run = RunDir.open(old, resume=True)
    run.close()
    assert json.loads((old / "run.json").read_text())["run_id"] == run.run_id
    assert any("had no run.json" in r.getMessage() and run.run_id in r.getMessage() for r in caplog.records)


def test_an_unreadable_run_json_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{ truncated")
    with pytest.raises(RunDirError, match=re.escape(f"{str(tmp_path / 'run' / 'run.json')!r} is unreadable")):
        RunDir.open(tmp_path / "run", resume=True)


_HOLDER = """
import sys, time
from megatron_entcov.run.run_dir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def _start_holder(run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir / "run.lock")], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_directory_in_use_is_refused_naming_the_owner(tmp_path):
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    try:
        for resume in (False, True):
            with pytest.raises(RunDirError) as err:
                RunDir.open(run_dir, resume=resume)
            text = str(err.value)
            assert f"run directory {str(run_dir)!r} is in use by another run" in text, text
            assert f"host {socket.gethostname()!r}, pid {holder.pid}" in text, text
        assert not (run_dir / "run.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    os.kill(holder.pid, signal.SIGKILL)   # dies holding it: the kernel drops the flock, the record stays
    holder.wait()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="megatron_entcov.run.run_dir"):
        run = RunDir.open(run_dir, resume=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"pid {holder.pid}" in m and "stale lock" in m and "its process is gone" in m
               for m in messages), messages
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    run.close()


@pytest.mark.parametrize("link", ["run", "output"])
def test_a_run_directory_behind_a_dangling_symlink_names_the_link_and_its_target(tmp_path, link):
    """The run directory (or the output directory above it) is a symlink to a missing target: say so, naming
    both, instead of "[Errno 17] File exists"; nothing is created at the target."""
    target = tmp_path / "gone" / "target"
    output = tmp_path / "output"
    if link == "run":
        output.mkdir()
        (output / "run").symlink_to(target)
        linked = output / "run"
    else:
        output.symlink_to(target)
        linked = output
    with pytest.raises(RunDirError) as err:
        RunDir.open(output / "run", resume=False)
    text = str(err.value)
    assert "\n" not in text, text
    assert f"{str(linked)!r} is a symlink to {str(target)!r}, which does not exist" in text, text
    assert "Errno" not in text, text
    assert f"mkdir -p {target}" in text and "output_dir" in text, text   # the fixes
    assert not target.exists() and not (tmp_path / "gone").exists()


def test_a_run_directory_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(RunDirError) as err:
        RunDir.open(tmp_path / "run", resume=False)
    text = str(err.value)
    assert f"{str(tmp_path / 'run')!r} is a file, not a directory" in text and "Errno" not in text, text


def test_train_into_a_dangling_symlink_says_so_in_one_line(tmp_path):
    """Through the command: `train` whose run directory is a symlink to a missing directory."""
    from dist_utils import TINY_MODEL, TINY_STEP, set_args

    target = tmp_path / "scratch" / "runs"
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "job").symlink_to(target)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("MEGATRON_ENTCOV_LAUNCHED", None)
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", "train",
                           *set_args(*TINY_MODEL, *TINY_STEP, "metrics.tensorboard=false", "steps=1",
                                     f"output_dir={tmp_path / 'output'}", "name=job")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("[")]   # log records: "[time r0]"
    assert errors == [f"megatron-entcov train: error: run directory {str(tmp_path / 'output' / 'job')!r} is a "
                      f"symlink to {str(target)!r}, which does not exist; create it (mkdir -p {target}), point "
                      f"the link elsewhere, or write elsewhere with --set output_dir=... (or --set name=...)"], \
        proc.stderr
