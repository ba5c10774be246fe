"""Helpers of the SLURM tests (imported as `slurm_utils`: this directory is on sys.path): the options and
environment of a job on the local cluster, its output, and what a failed assertion prints."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from local_slurm import GPU_TYPE, LocalSlurm

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "slurm"
NODE_OPTIONS = [f"--gpus-per-node={GPU_TYPE}:1", "--cpus-per-task=2"]
"""sbatch options that fit the scripts' GPU-node headers to the fake 2-CPU nodes (one typed GPU each)."""
JOB_TIMEOUT_S = 420
"""Bound on any one job's wait (a loaded 2-core machine; SGLang servers start in 25-70 s): not a speed check."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_environment() -> dict[str, str]:
    """Variables every job gets: the trainer venv's python first on PATH (and as $PYTHON), one thread per
    process, a free rendezvous port."""
    venv_bin = Path(sys.executable).parent
    return {"PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}


def job_output(submit_dir: Path, job_id: int) -> str:
    """The job's output file (``%x-%j.out`` in the submit directory), '' when not written yet."""
    files = list(Path(submit_dir).glob(f"*-{job_id}.out"))
    return files[0].read_text(errors="replace") if files else ""


def describe(cluster: LocalSlurm, submit_dir: Path, job_id: int, info: dict | None = None) -> str:
    """What a failed assertion prints: the job's state, its output, the server logs, the daemons' logs."""
    info = info if info is not None else cluster.job(job_id)
    parts = [f"job {job_id}: {info.get('JobState')} ExitCode={info.get('ExitCode')} Restarts={info.get('Restarts')} "
             f"Reason={info.get('Reason')}", f"--- job output\n{job_output(submit_dir, job_id)}"]
    for log in sorted(Path(submit_dir).glob("logs/**/*.log")):
        tail = log.read_text(errors="replace").splitlines()[-30:]
        parts.append(f"--- {log} (last 30 lines)\n" + "\n".join(tail))
    parts.append(cluster.logs())
    return "\n".join(parts)
