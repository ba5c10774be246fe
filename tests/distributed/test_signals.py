"""Stopping a run with a signal, end to end on CPU: the run finishes the step in flight, checkpoints it, exits
with 128 + the signal number and leaves no process behind (torchrun, ranks, Megatron's checkpoint Manager,
multiprocessing's resource tracker); `--resume` continues from that step. No rendezvous socket of the run
listens on all interfaces. A run waiting for its SGLang servers (rollout.sglang.server_urls) stops at once,
saying what it waited for; a URL that answers but is not an SGLang server fails at once.

Before the fix: SIGTERM to an `--nproc` launcher killed the launcher and left torchrun and the ranks training;
SIGTERM to a one-process run killed it without a checkpoint and left the Manager and the resource tracker
running; torch's TCPStore servers listened on `*:<port>`. A run attached to a 404 server or a closed port
waited 600 s without a word, and SIGTERM did not end that wait.
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from dist_utils import TINY_MODEL, TINY_STEP

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]

# A tiny policy on the synthetic arithmetic task (see test_trainer.py); a console line every step.
TINY = TINY_MODEL + TINY_STEP + ["optim.num_mini_batches=2", "metrics.log_interval=1", "metrics.tensorboard=false"]
STARTUP_S = 300      # bounds on waits (a loaded 2-core machine), not speed assertions
STOP_S = 240
GONE_S = 30


def _sets(*kv: str) -> list[str]:
    return [x for item in (*TINY, *kv) for x in ("--set", item)]


class Run:
    """`python -m megatron_entcov ARGS` in its own session, output in a file, every process below it recorded
    while it runs; :meth:`cleanup` kills whatever is left (always called)."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        self.log = open(log, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        env.pop("MEGATRON_ENTCOV_LAUNCHED", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_entcov", *args], cwd=log.parent, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def output(self) -> str:
        return self.log_path.read_text()

    def record(self) -> None:
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            self.record()
            m = re.search(pattern, self.output(), re.M)
            if m:
                return m
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.output()}"
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        self.record()
        return [psutil.Process(self.proc.pid), *self.seen.values()]

    def survivors(self, timeout: float) -> list[str]:
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=timeout)
        alive = [p for p in alive if _running(p)]
        return [f"{p.pid} {' '.join(_cmdline(p))[:160]}" for p in alive]

    def cleanup(self) -> None:
        for pgid in {self.proc.pid} | {p.pid for p in self.seen.values() if _running(p) and _pgid(p.pid) == p.pid}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def listening(p: psutil.Process) -> list[tuple[str, int]]:
    """(address, port) of each listening TCP socket (IPv4 and IPv6) of a process (psutil reads
    /proc/<pid>/net/tcp{,6} and the process's socket descriptors)."""
    try:
        conns = p.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def _wildcard(ip: str) -> bool:
    return ip in ("0.0.0.0", "::", "::ffff:0.0.0.0", "")


def _check_listeners(run: Run) -> dict[int, list]:
    per_process = {p.pid: listening(p) for p in run.processes()}
    exposed = {pid: socks for pid, socks in per_process.items() if any(_wildcard(ip) for ip, _ in socks)}
    assert not exposed, f"listening on all interfaces: {exposed}"
    return per_process


def _latest_step(run_dir: Path) -> int | None:
    from megatron_entcov.run.checkpoint import find_latest

    latest = find_latest(run_dir / "checkpoints")
    return None if latest is None else int(latest.name.split("_")[1])


def _last_step_line(out: str) -> int:
    steps = [int(s) for s in re.findall(r"^step (\d+) \|", out, re.M)]
    assert steps, out
    return steps[-1]


def test_sigterm_to_an_nproc_launch_checkpoints_and_leaves_no_process(tmp_path):
    """SIGTERM to the `--nproc 2` launcher: it forwards the stop to the ranks, which finish their step, save
    it (no checkpoint.save_interval: the stop always saves) and exit; the launcher returns 143 and nothing it
    started survives. The rendezvous stores listen on 127.0.0.1 only. `--resume` continues from that step."""
    run_dir = tmp_path / "run"
    common = ["--set", f"output_dir={tmp_path}", "--set", "name=run"]
    run = Run(["train", "--nproc", "2", *_sets("steps=1000"), *common], tmp_path / "launch.log")
    try:
        run.wait_for(r"^step 1 \|", STARTUP_S)
        ranks = [p for p in run.processes() if "megatron_entcov" in _cmdline(p) and "torch.distributed.run" not in
                 " ".join(_cmdline(p)) and p.pid != run.proc.pid]
        assert len(ranks) == 2, [_cmdline(p) for p in run.processes()]
        listeners = _check_listeners(run)
        assert listeners[run.proc.pid], "the launcher hosts torchrun's rendezvous store"
        assert all(ip == "127.0.0.1" for ip, _ in listeners[run.proc.pid]), listeners[run.proc.pid]
        torchrun = [p for p in run.seen.values() if "torch.distributed.run" in " ".join(_cmdline(p))]
        assert torchrun and not listening(torchrun[0]), "torchrun should host no store of its own"

        os.kill(run.proc.pid, signal.SIGTERM)
        try:
            rc = run.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {STOP_S} s of SIGTERM:\n{run.output()}")
        out = run.output()
        assert rc == 128 + signal.SIGTERM, out
        survivors = run.survivors(GONE_S)
        assert not survivors, f"left running after the launcher exited: {survivors}"
        last = _last_step_line(out)
        assert f"stopped by SIGTERM after step {last} of 1000" in out, out
        assert _latest_step(run_dir) == last, (last, out)
        assert "Traceback" not in out, out
    finally:
        run.cleanup()

    resumed = Run(["train", "--resume", *_sets(f"steps={last + 1}"), *common], tmp_path / "resume.log")
    try:
        assert resumed.proc.wait(timeout=STARTUP_S) == 0, resumed.output()
        out = resumed.output()
        assert f"at step {last}" in out and re.search(rf"^step {last + 1} \|", out, re.M), out
        assert _latest_step(run_dir) == last + 1
    finally:
        resumed.cleanup()


@pytest.mark.parametrize("signame, to_group", [("SIGTERM", False), ("SIGUSR1", True)],
                         ids=["sigterm-to-the-process", "sigusr1-to-its-process-group"])
def test_a_stop_signal_to_a_one_process_run_stops_at_a_step_boundary(tmp_path, signame, to_group):
    """One process, no launcher: the signal stops the run after the step in flight with a checkpoint of it and
    exit code 128 + signal; Megatron's checkpoint Manager and the resource tracker exit with it. Sent to the
    whole process group (as SLURM and torchrun do), it must not kill the Manager before that last save."""
    sig = getattr(signal, signame)
    run_dir = tmp_path / "run"
    run = Run(["train", *_sets("steps=1000", "checkpoint.save_interval=1000"), "--set", f"output_dir={tmp_path}",
               "--set", "name=run"], tmp_path / "run.log")
    try:
        run.wait_for(r"^step 1 \|", STARTUP_S)
        helpers = [p for p in run.seen.values() if "multiprocessing" in " ".join(_cmdline(p))]
        assert helpers, "expected the checkpoint Manager and the resource tracker below the run"
        _check_listeners(run)
        if to_group:
            os.killpg(run.proc.pid, sig)
        else:
            os.kill(run.proc.pid, sig)
        try:
            rc = run.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not exit within {STOP_S} s of {signame}:\n{run.output()}")
        out = run.output()
        assert rc == 128 + sig, out
        survivors = run.survivors(GONE_S)
        assert not survivors, f"left running after the run exited: {survivors}"
        last = _last_step_line(out)
        assert f"stopped by {signame} after step {last} of 1000" in out, out
        assert _latest_step(run_dir) == last, (last, out)
        assert "Traceback" not in out, out
    finally:
        run.cleanup()


def _sglang_run(tmp_path: Path, url: str, limit_s: float) -> Run:
    """`train` with rollouts from the SGLang server at ``url`` (nothing is launched; no SGLang venv needed)."""
    return Run(["train", *_sets("steps=3", "rollout.engine=sglang", f"rollout.sglang.server_urls=[{url}]",
                                f"rollout.sglang.startup_timeout_s={limit_s:g}"),
                "--set", f"output_dir={tmp_path}", "--set", "name=run"], tmp_path / "run.log")


def _error_lines(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("megatron-entcov train:")]


def test_sigterm_ends_a_wait_for_an_attached_sglang_server(tmp_path):
    """Nothing listens at the server URL and the start-up limit is an hour: the wait logs what it waits for,
    and SIGTERM ends it at once with one line naming the wait (nothing to checkpoint: exit 128 + 15)."""
    from megatron_entcov.distributed.net import free_port

    url = f"http://127.0.0.1:{free_port()}"
    run = _sglang_run(tmp_path, url, 3600)
    try:
        run.wait_for(rf"waiting for the SGLang server at {re.escape(url)} \(rollout\.sglang\.server_urls\[0\]\) "
                     r"to answer /model_info: \d+ s of 3600 s \(rollout\.sglang\.startup_timeout_s\) so far; "
                     r"last: 'ConnectionRefusedError", STARTUP_S)
        os.kill(run.proc.pid, signal.SIGTERM)
        try:
            rc = run.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not exit within {STOP_S} s of SIGTERM:\n{run.output()}")
        out = run.output()
        assert rc == 128 + signal.SIGTERM, out
        assert _error_lines(out) == [
            f"megatron-entcov train: stopped at once by SIGTERM while waiting for the SGLang server at {url} "
            "(rollout.sglang.server_urls[0]) to answer /model_info; nothing saved since the last checkpoint"], out
        assert "stopping after the step in flight" not in out and "Traceback" not in out, out
        assert not run.survivors(GONE_S)
    finally:
        run.cleanup()


class _NotFound(http.server.BaseHTTPRequestHandler):
    """What `python3 -m http.server` answers for /model_info."""

    def do_GET(self):                                    # noqa: N802 - http.server's spelling
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["404", "closed-port"])
def test_an_attached_url_that_is_no_sglang_server_fails_with_one_line(tmp_path, server):
    """A 404 fails at once although the limit is 600 s; a closed port fails at the limit (3 s). One line each,
    exit 2 (a config value to fix)."""
    from megatron_entcov.distributed.net import free_port

    httpd = None
    if server == "404":
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
    else:
        url = f"http://127.0.0.1:{free_port()}"
    run = _sglang_run(tmp_path, url, 600 if httpd else 3)
    try:
        try:
            rc = run.proc.wait(timeout=STARTUP_S)     # well below the 600 s limit of the 404 case
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not fail within {STARTUP_S} s:\n{run.output()}")
        out = run.output()
        assert rc == 2, out
        lines = _error_lines(out)
        assert len(lines) == 1 and "Traceback" not in out, out
        head = f"megatron-entcov train: error: rollout.sglang.server_urls[0]='{url}'"
        if httpd:
            assert lines[0].startswith(f"{head} is not an SGLang server: GET /model_info answered 'HTTP 404: "), out
            assert lines[0].endswith("give the URL (http://HOST:PORT) of a running `python -m sglang.launch_server`, "
                                     "or leave rollout.sglang.server_urls empty to have the run launch its own "
                                     "servers"), out
        else:
            assert lines[0] == (f"{head}: no SGLang server answered GET /model_info within 3 s "
                                "(rollout.sglang.startup_timeout_s); last: 'ConnectionRefusedError: [Errno 111] "
                                "Connection refused'; start the server (or fix the URL), or raise "
                                "rollout.sglang.startup_timeout_s if it is still loading"), out
            assert f"waiting for the SGLang server at {url}" in out, out
    finally:
        run.cleanup()
        if httpd:
            httpd.shutdown()
            httpd.server_close()
