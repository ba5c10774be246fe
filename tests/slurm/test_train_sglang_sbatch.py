"""slurm/train_sglang.sbatch under a real (local, two-node) SLURM: the trainer on n1 and one SGLang server
(CPU, from the server venv) on n2 in one job. The server starts first; the trainer gets its URL, generates
every rollout there and pushes its weights to it over a gloo broadcast group ('distributed'); the server is
stopped when the trainer ends. A trainer that fails stops the server too, and the job reports the failure.
"""

from __future__ import annotations

import re
from pathlib import Path

import psutil
import pytest
from dist_utils import TINY_STEP, set_args, tiny_model
from slurm_utils import JOB_TIMEOUT_S, NODE_OPTIONS, ROOT, SLURM_DIR, describe, free_port, job_output

from megatron_entcov.rollout.sglang.server import default_server_python

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not Path(default_server_python()).is_file(),
    reason=f"SGLang server venv missing ({default_server_python()}); build it with `make sglang-env`")]

STEPS = 3
# The tiny policy of the distributed tests, 64 wide (the SGLang CPU tests' width), served in float32.
TINY = [*tiny_model(hidden_size=64, ffn_hidden_size=128), *TINY_STEP, "eval.interval=0", f"steps={STEPS}", "rollout.engine=sglang", "rollout.sglang.sync_method=distributed",
        "rollout.sglang.server_device=cpu", "rollout.sglang.request_timeout_s=120"]
GENERATES_PER_STEP = 4 * 2
"""rollout.prompts_per_step x n_samples_per_prompt of TINY_STEP: one /generate request each."""


def _submit(cluster, submit: Path, env: dict, *kv: str) -> tuple[int, int]:
    port = free_port()
    sets = set_args(*TINY, f"output_dir={submit / 'runs'}", "name=run", *kv)
    job = cluster.sbatch([*NODE_OPTIONS, "--nodes=2", str(SLURM_DIR / "train_sglang.sbatch"),
                          str(ROOT / "configs" / "quickstart.yaml"), *sets], cwd=submit,
                         env={**env, "NPROC_PER_NODE": "1", "SGLANG_PORT": str(port)})
    return job, port


def _listening(port: int) -> list:
    return [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"]


def test_the_trainer_generates_on_the_server_node(slurm_cluster, job_env, tmp_path):
    job, port = _submit(slurm_cluster, tmp_path, job_env)
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    out = job_output(tmp_path, job)
    url = f"http://n2:{port}"
    assert f"trainer on n1 (1 x 1 processes), SGLang servers {url}," in out, why
    assert f"SGLangEngine: 1 servers ['{url}'] (given)" in out, why           # the real URL reached the trainer
    assert f"done: {STEPS} steps" in out, why
    # The server ran on n2 (its task's SLURMD_NODENAME names the log) and served every rollout and sync.
    log = tmp_path / "logs" / f"entcov-train-sglang-{job}" / f"sglang-n2-{port}.log"
    text = log.read_text(errors="replace")
    generates = len(re.findall(r'"POST /generate HTTP/1\.1" 200', text))
    assert generates >= GENERATES_PER_STEP * STEPS, (generates, why)
    assert len(re.findall(r'"POST /update_weights_from_distributed HTTP/1\.1" 200', text)) >= STEPS, why
    assert "init custom process group" in text, why
    assert f"SIGTERM, stopping the server on port {port}" in out, why          # stopped when the trainer ended
    assert not _listening(port), why
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "checkpoints" / f"step_{STEPS:06d}" / "COMPLETE").is_file(), why
    assert list((run_dir / "tensorboard").glob("**/events.out.tfevents.*")), why


def test_a_failing_trainer_stops_the_server_and_fails_the_job(slurm_cluster, job_env, tmp_path):
    """The trainer starts (the server is up) and fails on a checkpoint that does not exist: the script stops the
    server step and exits with the trainer's code, so the job is FAILED."""
    job, port = _submit(slurm_cluster, tmp_path, job_env, f"checkpoint.load={tmp_path / 'no-such-checkpoint'}")
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", why
    out = job_output(tmp_path, job)
    assert f"wait-servers: http://n2:{port} is ready" in out, why              # the trainer started after it
    assert "no-such-checkpoint" in out, why                                     # and failed on the bad input
    assert f"SIGTERM, stopping the server on port {port}" in out, why
    assert re.search(r"training exited with [1-9]", out), why
    assert not _listening(port), why
