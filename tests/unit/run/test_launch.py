"""The `--nproc` launcher and the stop signals, without training: argument and layout errors before anything
is started; the torchrun command keeps the rendezvous on loopback; the rendezvous stores listen on one
address, never on all interfaces; the supervisor forwards a stop to the ranks (not to torchrun) and kills
what does not stop in time; the training process's handlers (stop at a step boundary, then at once).

The supervisor is exercised on a stand-in for torchrun: a Python process that starts two "ranks" in their
own sessions, as torchrun does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from megatron_entcov import cli
from megatron_entcov.run import launch, stop

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if anything would be started."""
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"started a process: {args} {kwargs}")

    monkeypatch.setattr(cli, "run_ranks", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_nproc_below_one_is_an_error_not_one_process(value, no_launch, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--nproc", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --nproc: {value if value != 'two' else repr(value)}" in err, err
    assert "--nproc" in err.splitlines()[-1] and ("N >= 1" in err or "e.g. --nproc 2" in err)


@pytest.mark.parametrize("command, args, names", [
    ("train", ["--nproc", "3", "--set", "parallel.tensor_model_parallel_size=2"],
     ["tensor_model_parallel_size", "world size 3", "multiple of 2"]),
    ("sft", ["--nproc", "3", "--set", "parallel.pipeline_model_parallel_size=2"],
     ["pipeline_model_parallel_size", "world size 3", "multiple of 2"]),
    # The quickstart's default config (64 prompts x 8, 2 mini-batches of micro-batches of 32) does not split
    # over 3 data-parallel ranks: checked in the launcher, with the default --config filled in.
    ("quickstart", ["--nproc", "3"], ["optim.micro_batch_size", "data_parallel_size=3"]),
])
def test_an_impossible_layout_fails_in_the_launcher_with_one_line(command, args, names, no_launch, capsys,
                                                                   tmp_path):
    rc = cli.main([command, *args, "--set", f"output_dir={tmp_path}"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"megatron-entcov {command}: error: "), err
    for name in names:
        assert name in err, (name, err)
    assert not list(tmp_path.iterdir()), "nothing may be written before the config is valid"


def test_torchrun_command_joins_a_loopback_rendezvous_without_hosting_one():
    argv = launch.argv_without_nproc(["train", "--nproc", "4", "--set", "steps=2", "--nproc=4", "--resume"])
    assert argv == ["train", "--set", "steps=2", "--resume"]
    cmd = launch.torchrun_command(4, 12345, argv)
    joined = " ".join(cmd)
    assert "--rdzv-backend c10d" in joined and "--rdzv-endpoint 127.0.0.1:12345" in joined
    assert "--rdzv-conf is_host=false" in joined and "--local-addr 127.0.0.1" in joined
    assert "--nproc-per-node 4" in joined and "--master-port" not in joined
    assert cmd[-len(argv) - 2:] == ["-m", "megatron_entcov", *argv]


_RENDEZVOUS = textwrap.dedent("""
    import json, os, socket, sys
    import psutil
    import torch.distributed as dist
    from megatron_entcov.distributed import parallel

    def listeners():
        return sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN})

    out = {}
    store, port = parallel.loopback_store()
    out["loopback_store"] = listeners()
    del store
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(k, None)
    parallel._init_process_group("gloo", 1)                  # one process, no launcher variables
    out["one_process_store"] = type(dist.distributed_c10d._get_default_store()).__name__
    dist.destroy_process_group()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); free = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free))
    parallel._init_process_group("gloo", 1)                  # env:// variables: rank 0 hosts the store
    out["env_store"] = listeners()
    out["env_port_bound"] = any(c.laddr.port == free and c.status == psutil.CONN_LISTEN
                                for c in psutil.Process().net_connections(kind="tcp"))
    dist.destroy_process_group()
    print(json.dumps(out))
""")


def test_rendezvous_stores_listen_on_one_address_not_all_interfaces():
    """torch's TCPStore server binds every interface (`*:<port>`); the project's stores listen on 127.0.0.1
    (the launcher's) or MASTER_ADDR (rank 0's), and a one-process run has no store socket at all."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _RENDEZVOUS], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    wildcard = {"0.0.0.0", "::"}
    assert out["loopback_store"] == ["127.0.0.1"], out
    assert not wildcard & set(out["env_store"]), out
    assert out["env_port_bound"], out
    assert out["one_process_store"] != "TCPStore", out


# ---------------------------------------------------------------- the supervisor, on a stand-in torchrun
_FAKE_TORCHRUN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    state = sys.argv[1]
    mode = sys.argv[2]            # "stop": ranks exit 0 on a stop signal; "stuck": ranks ignore it
    rank_code = '''
    import os, signal, sys, time
    state, mode, rank = sys.argv[1], sys.argv[2], sys.argv[3]
    def on_signal(signum, frame):
        open(f"{state}/rank{rank}.signal", "w").write(str(signum))
        if mode == "stop":
            sys.exit(0)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, on_signal)
    open(f"{state}/rank{rank}.pid", "w").write(str(os.getpid()))
    while True:
        time.sleep(0.1)
    '''
    def on_signal(signum, frame):                # torchrun would signal the ranks' groups and fail the run
        open(f"{state}/torchrun.signal", "w").write(str(signum))
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, on_signal)
    ranks = [subprocess.Popen([sys.executable, "-c", rank_code, state, mode, str(r)], start_new_session=True)
             for r in range(2)]
    sys.exit(max(abs(r.wait()) for r in ranks))
""")

_DRIVER = textwrap.dedent("""
    import sys
    from megatron_entcov.run import launch
    cmd = [sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]]
    sys.exit(launch.supervise(cmd, {}, stop_timeout=float(sys.argv[4])))
""")


def _pids(state: Path, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(list(state.glob("rank*.pid"))) < 2:
        assert time.monotonic() < deadline, "the stand-in ranks did not start"
        time.sleep(0.05)
    time.sleep(0.2)
    return [int(p.read_text()) for p in sorted(state.glob("rank*.pid"))]


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _supervise(state: Path, mode: str, stop_timeout: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", _DRIVER, _FAKE_TORCHRUN, str(state), mode, str(stop_timeout)],
                            env=env, start_new_session=True)


def _cleanup(driver: subprocess.Popen, pids: list[int]) -> None:
    for pid in [driver.pid, *pids]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    driver.wait(timeout=30)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_supervisor_forwards_a_stop_to_the_ranks_and_returns_128_plus_the_signal(tmp_path, signame):
    sig = getattr(signal, signame)
    driver, pids = _supervise(tmp_path, "stop", 60), []
    try:
        pids = _pids(tmp_path)
        os.kill(driver.pid, sig)
        assert driver.wait(timeout=60) == 128 + sig
        for r in range(2):
            assert (tmp_path / f"rank{r}.signal").read_text() == str(int(sig))
        assert not (tmp_path / "torchrun.signal").exists(), "the stop went to torchrun, not to the ranks"
        assert not _gone(pids, 10)
    finally:
        _cleanup(driver, pids)


def test_supervisor_kills_ranks_that_do_not_stop_in_time(tmp_path):
    driver, pids = _supervise(tmp_path, "stuck", 1.0), []
    try:
        pids = _pids(tmp_path)
        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=60) == 128 + signal.SIGKILL
        assert not _gone(pids, 10), "ranks left running"
    finally:
        _cleanup(driver, pids)


def test_supervisor_kills_at_once_on_a_second_signal(tmp_path):
    driver, pids = _supervise(tmp_path, "stuck", 600), []
    try:
        pids = _pids(tmp_path)
        os.kill(driver.pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while not (tmp_path / "rank0.signal").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=60) == 128 + signal.SIGKILL
        assert not _gone(pids, 10), "ranks left running"
    finally:
        _cleanup(driver, pids)


# ---------------------------------------------------------------- the training process's handlers
def _deliver(sig) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)         # the handler runs in the main thread at the next bytecode


def test_stop_signals_ask_for_a_step_boundary_then_stop_at_once():
    before = {sig: signal.getsignal(sig) for sig in stop.StopSignals.SIGNALS}
    stops = stop.StopSignals(graceful=True).install()
    try:
        stop.clear_stop()
        _deliver(signal.SIGUSR1)
        assert stop.stop_requested() == signal.SIGUSR1
        assert stop.agree_stop(None) == signal.SIGUSR1      # one process: its own request
        _deliver(signal.SIGUSR1)                                 # a repeated notice: still stopping, no raise
        with pytest.raises(stop.StopNow) as exc:
            _deliver(signal.SIGTERM)                             # asked twice: at once
        assert exc.value.signum == signal.SIGTERM
        stops.graceful = False
        stop.clear_stop()
        with pytest.raises(stop.StopNow):
            _deliver(signal.SIGINT)                              # SFT: no step boundary to stop at
        assert stop.stop_requested() == 0
    finally:
        stops.restore()
        stop.clear_stop()
    assert {sig: signal.getsignal(sig) for sig in stop.StopSignals.SIGNALS} == before


def test_stop_exit_codes(monkeypatch):
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    assert stop.stop_exit_code(0) == 0
    assert stop.stop_exit_code(signal.SIGTERM) == 143
    assert stop.stop_exit_code(signal.SIGUSR1) == 138
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")          # a rank of the launcher: torchrun must see success
    assert stop.stop_exit_code(signal.SIGTERM) == 0


# ---------------------------------------------------------------- errors the ranks find after launch
def _command(args: list[str], cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), extra_path) if p))
    env.pop(launch.LAUNCHED_ENV, None)
    env.pop(launch.REPORT_ENV, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=540)


def _not_logs(stderr: str) -> list[str]:
    """stderr without the run's log records ("[19:17:04 r0] INFO ...") and logging's warning records."""
    return [line for line in stderr.splitlines() if line.strip() and not re.match(r"^\[\d\d:\d\d:\d\d r\d+\] ", line)]


@pytest.mark.distributed
def test_a_user_error_of_the_ranks_is_printed_once_with_the_exit_code_of_one_process(tmp_path):
    """`train --nproc 2 --resume` of a finished run: both ranks find "already at step 1"; one process prints
    that line and exits 2. The launcher printed it twice, then torchrun's ChildFailedError block, exit 1."""
    from dist_utils import TINY_MODEL, TINY_STEP, set_args

    sets = set_args(*TINY_MODEL, *TINY_STEP, "metrics.tensorboard=false", "steps=1", f"output_dir={tmp_path}",
                    "name=done")
    first = _command(["-m", "megatron_entcov", "train", "--nproc", "2", *sets], tmp_path)
    assert first.returncode == 0, first.stderr
    run_id = json.loads((tmp_path / "done" / "run.json").read_text())["run_id"]

    again = _command(["-m", "megatron_entcov", "train", "--nproc", "2", "--resume", *sets], tmp_path)
    assert again.returncode == 2, again.stderr
    lines = _not_logs(again.stderr)
    assert len(lines) == 1, again.stderr
    assert lines[0].startswith(f"megatron-entcov train: error: steps=1 but run {run_id} in "
                               f"{str(tmp_path / 'done')!r} is already at step 1"), again.stderr
    assert "ChildFailedError" not in again.stderr and "Traceback" not in again.stderr, again.stderr
    assert "exitcode" not in again.stderr and "closing signal" not in again.stderr, again.stderr


_CRASHING_RANK = textwrap.dedent("""
    # A rank whose command crashes on an internal fault (not a user error): the same traceback on every rank.
    import sys
    from megatron_entcov import cli

    def _crash(args):
        return {}["internal fault"]

    cli._cmd_fit_law = _crash
    sys.exit(cli.main(["fit-law", "unused"]))
""")

_LAUNCHER = textwrap.dedent("""
    # The --nproc launcher's path (cli._launch) with the ranks running crashing_rank instead of megatron_entcov.
    import os, sys
    from megatron_entcov.distributed.parallel import loopback_store
    from megatron_entcov.run import launch

    store, port = loopback_store()
    cmd = launch.torchrun_command(2, port, [])
    assert cmd[-2:] == ["-m", "megatron_entcov"], cmd
    cmd[-1] = "crashing_rank"
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **{launch.LAUNCHED_ENV: "1"})
    sys.exit(launch.run_ranks(cmd, env, stop_timeout=60))
""")


@pytest.mark.distributed
def test_an_internal_crash_of_the_ranks_shows_its_traceback_once(tmp_path):
    (tmp_path / "crashing_rank.py").write_text(_CRASHING_RANK)
    proc = _command(["-c", _LAUNCHER], tmp_path, extra_path=str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("Traceback (most recent call last):") == 1, proc.stderr
    assert proc.stderr.count("KeyError: 'internal fault'") == 1, proc.stderr
    assert 'return {}["internal fault"]' in proc.stderr, proc.stderr
    assert "ChildFailedError" not in proc.stderr, proc.stderr
