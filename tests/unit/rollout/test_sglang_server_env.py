"""The environment and command line a launched SGLang server gets (rollout/sglang/server.py), seen by a
stand-in server process (a shell script in place of the server venv's python that writes down its environment
and arguments).

Before the fix, a server launched from a torchrun rank inherited the rank's RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT and TORCHELASTIC_* variables, and SGLang's own rendezvous hung on them; and servers launched for
rollout.sglang.release_memory lacked SGLANG_MEMORY_SAVER_CUDA_GRAPH=1, so /release_memory_occupation never gave
back the CUDA-graph memory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_entcov.config import ModelConfig, SGLangConfig
from megatron_entcov.distributed.net import free_port
from megatron_entcov.rollout.sglang.server import SGLangServer, server_launch_args

TORCHRUN_RANK_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
"""Written from torch's elastic agent (local_elastic_agent.py, _start_workers), not from server.py."""
VENV_VARS = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
SHELL_VARS = {"PWD", "SHLVL", "_"}
"""Set by the stand-in's shell itself: not compared."""


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for the server venv's python: writes its environment (NUL-separated) and arguments, then
    sleeps until the test stops it."""
    dump = tmp_path / "server-env"
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{dump}.args'\nenv -0 > '{dump}.tmp'\n"
                      f"mv '{dump}.tmp' '{dump}'\nexec sleep 120\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, dump


def _launch(tmp_path: Path, env: dict[str, str], **kwargs) -> tuple[dict[str, str], list[str]]:
    """Start a server with the stand-in python and ``env`` as the rank's environment; its env and argv."""
    python, dump = _fake_python(tmp_path)
    server = SGLangServer(tmp_path / "model", port=free_port(), python=str(python), env=env,
                          log_path=tmp_path / "server.log", **kwargs)
    server.start()
    try:
        deadline = time.monotonic() + 60
        while not dump.exists() and time.monotonic() < deadline and server.alive():
            time.sleep(0.05)
        assert dump.exists(), f"the stand-in server wrote no environment; log: {server.log_tail()}"
        pairs = [item.split("=", 1) for item in dump.read_bytes().decode().split("\0") if item]
        argv = Path(f"{dump}.args").read_text().splitlines()
    finally:
        server.stop()
    return {k: v for k, v in pairs if k not in SHELL_VARS}, argv


def _torchrun_rank_env(tmp_path: Path, parent: dict[str, str]) -> dict[str, str]:
    """The environment torchrun gives rank 0 of a one-process job started from ``parent``."""
    out = tmp_path / "rank-env.json"
    script = tmp_path / "dump_env.py"
    script.write_text("import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    proc = subprocess.run([*torchrun, str(script), str(out)], env=parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_a_server_launched_from_a_torchrun_rank_gets_none_of_the_ranks_distributed_variables(tmp_path):
    parent = {k: v for k, v in os.environ.items() if k not in TORCHRUN_RANK_VARS and not k.startswith("TORCH")}
    parent.update(NCCL_DEBUG="INFO", CUDA_VISIBLE_DEVICES="3", MY_SETTING="kept", PYTHONPATH="/trainer/src")
    rank_env = _torchrun_rank_env(tmp_path, parent)
    added = set(rank_env) - set(parent)
    assert TORCHRUN_RANK_VARS <= added, f"torchrun did not set {sorted(TORCHRUN_RANK_VARS - added)}"

    env, _ = _launch(tmp_path, rank_env, device="cuda")

    assert not (TORCHRUN_RANK_VARS | VENV_VARS) & set(env)
    assert not [k for k in env if k.startswith("TORCHELASTIC_")]
    # Everything else torchrun added is an NCCL behaviour setting, which the server keeps, like the user's own.
    kept_from_torchrun = {k for k in added if k not in TORCHRUN_RANK_VARS and not k.startswith("TORCHELASTIC_")}
    assert kept_from_torchrun <= {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS"}
    expected = {k: v for k, v in rank_env.items()
                if k not in VENV_VARS | SHELL_VARS and (k in parent or k in kept_from_torchrun)}
    assert {k: v for k, v in env.items() if k in expected or k in rank_env} == expected
    assert env["NCCL_DEBUG"] == "INFO" and env["CUDA_VISIBLE_DEVICES"] == "3" and env["MY_SETTING"] == "kept"
    assert "SGLANG_MEMORY_SAVER_CUDA_GRAPH" not in env


@pytest.mark.parametrize("release_memory", [True, False])
def test_release_memory_launches_with_the_memory_saver_for_cuda_graphs_too(tmp_path, release_memory):
    sg = SGLangConfig(release_memory=release_memory, server_device="cuda", server_args=["--tp-size", "1"])
    args = server_launch_args(sg, ModelConfig(), "cuda", python="/unused")
    args.pop("python")
    base = {"PATH": os.environ["PATH"], "HOME": "/home/u", "RANK": "3", "TORCHELASTIC_RUN_ID": "x"}

    env, argv = _launch(tmp_path, base, **args)

    assert argv.count("--enable-memory-saver") == (1 if release_memory else 0)
    assert argv[-2:] == ["--tp-size", "1"] and "--skip-tokenizer-init" in argv
    if release_memory:
        assert env.pop("SGLANG_MEMORY_SAVER_CUDA_GRAPH") == "1"
    assert env == {"PATH": os.environ["PATH"], "HOME": "/home/u"}


def test_a_memory_saver_flag_given_in_server_args_is_not_doubled(tmp_path):
    sg = SGLangConfig(release_memory=True, server_device="cuda", server_args=["--enable-memory-saver"])
    args = server_launch_args(sg, ModelConfig(), "cuda", python="/unused")
    server = SGLangServer(tmp_path, port=1, **args)
    assert server.command().count("--enable-memory-saver") == 1
    assert server.environment()["SGLANG_MEMORY_SAVER_CUDA_GRAPH"] == "1"


def test_a_server_whose_port_was_taken_fails_at_once_naming_it(tmp_path):
    """The server's HTTP front end logs a bind error when its port was taken after it was chosen, and its process
    lives on without ever answering: the wait ends at once (not at the start-up limit) with PortTaken, which the
    pool answers with a launch on a new port, and the process is stopped."""
    from megatron_entcov.rollout.sglang.server import PortTaken

    port = free_port()
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\necho \"ERROR:    [Errno 98] error while attempting to bind on address "
                      f"('127.0.0.1', {port}): address already in use\"\nexec sleep 120\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    server = SGLangServer(tmp_path / "model", port=port, python=str(script), log_path=tmp_path / "server.log")
    server.start()
    with pytest.raises(PortTaken, match=rf"SGLang server http://127.0.0.1:{port} could not listen on port {port}: "
                                        r"another process took it after it was chosen; log "):
        server.wait_ready(600)
    assert not server.alive()
