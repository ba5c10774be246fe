"""slurm/train.sbatch under a real (local, two-node) SLURM: a 2-node x 1-process run completes with its
checkpoint and TensorBoard events; a preemption notice (USR1 to the batch shell) makes the trainer checkpoint
and stop, the job requeues itself and the run ends at its planned step with exactly the rewards of an
uninterrupted run; a bad NPROC_PER_NODE fails the job with a line naming it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from dist_utils import TINY_MODEL, TINY_STEP, set_args
from slurm_utils import JOB_TIMEOUT_S, NODE_OPTIONS, ROOT, SLURM_DIR, describe, job_environment, job_output

pytestmark = pytest.mark.slurm

STEPS = 16
"""Long enough that a notice sent at step 2 arrives well before the end (a step takes under a second)."""
TINY = [*TINY_MODEL, *TINY_STEP, "eval.interval=0", "metrics.log_interval=1", f"steps={STEPS}"]


def _sets(*kv: str) -> list[str]:
    return set_args(*TINY, *kv)


def _train_args(run_root: Path, name: str) -> list[str]:
    return [*NODE_OPTIONS, "--nodes=2", str(SLURM_DIR / "train.sbatch"), str(ROOT / "configs" / "quickstart.yaml"),
            *_sets(f"output_dir={run_root}", f"name={name}")]


def _latest_step(run_dir: Path) -> int | None:
    from megatron_entcov.run.checkpoint import find_latest

    latest = find_latest(run_dir / "checkpoints")
    return None if latest is None else int(latest.name.split("_")[1])


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """One TensorBoard scalar of a run by step, over all its event files (a resumed run adds one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("**/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            out.update((ev.step, ev.value) for ev in acc.Scalars(tag))
    return out


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    """An uninterrupted 2-node x 1-process run (processes per node from the typed GRES gpu:fake:1)."""
    submit = tmp_path_factory.mktemp("train_submit")
    job = slurm_cluster.sbatch(_train_args(submit / "runs", "reference"), cwd=submit, env=job_environment())
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    return dict(cluster=slurm_cluster, submit=submit, job=job, info=info, run_dir=submit / "runs" / "reference")


def test_two_nodes_complete_with_checkpoint_and_tensorboard(reference_run):
    r = reference_run
    cluster, submit, job, info = r["cluster"], r["submit"], r["job"], r["info"]
    why = describe(cluster, submit, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["NodeList"] == "n[1-2]", why
    out = job_output(submit, job)
    assert "2 nodes x 1 processes" in out, why                      # from SLURM_GPUS_ON_NODE (gpu:fake:1)
    assert "world=2 tp=1 pp=1 cp=1 dp=2" in out, why                 # one rank on each node
    assert f"done: {STEPS} steps" in out, why
    assert _latest_step(r["run_dir"]) == STEPS, why
    assert list((r["run_dir"] / "tensorboard").glob("**/events.out.tfevents.*")), why
    assert sorted(_scalars(r["run_dir"], "reward/mean")) == list(range(1, STEPS + 1)), why


def test_preemption_notice_requeues_and_the_run_ends_with_the_same_rewards(reference_run, slurm_cluster, job_env,
                                                                           tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@600` and a preemption notice send) at step 2: the trainer
    saves the step in flight and stops, the job requeues itself, the next start resumes (--auto-resume) and the
    run ends at step STEPS with per-step rewards and entropies equal to the uninterrupted run's."""
    job = slurm_cluster.sbatch(_train_args(tmp_path / "runs", "preempted"), cwd=tmp_path,
                               env={**job_env, "NPROC_PER_NODE": "1"})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not re.search(r"^step 2 \|", job_output(tmp_path, job), re.M):
        info = slurm_cluster.job(job)
        if info.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING") or time.monotonic() > deadline:
            pytest.fail(f"the job did not reach step 2:\n{describe(slurm_cluster, tmp_path, job, info)}")
        time.sleep(0.2)
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert int(info["Restarts"]) == 1, why
    out = job_output(tmp_path, job)
    stopped = re.search(r"stopped by SIGUSR1 after step (\d+) of (\d+)", out)
    assert stopped and int(stopped.group(1)) < STEPS, why
    assert "requeueing job" in out and f"done: {STEPS} steps" in out, why
    assert re.search(rf"^step {int(stopped.group(1)) + 1} \|", out, re.M), why    # continued after the stop
    run_dir = tmp_path / "runs" / "preempted"
    assert _latest_step(run_dir) == STEPS, why
    reference = reference_run["run_dir"]
    for tag in ("reward/mean", "entropy/mean"):
        got, want = _scalars(run_dir, tag), _scalars(reference, tag)
        assert sorted(want) == list(range(1, STEPS + 1)), (tag, want)
        assert got == want, (tag, {s: (got.get(s), want[s]) for s in want if got.get(s) != want[s]})


@pytest.mark.parametrize("value", ["abc", "0"])
def test_a_bad_nproc_per_node_fails_the_job_naming_it(slurm_cluster, job_env, tmp_path, value):
    job = slurm_cluster.sbatch(_train_args(tmp_path / "runs", "bad"), cwd=tmp_path,
                               env={**job_env, "NPROC_PER_NODE": value})
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", why
    assert f"NPROC_PER_NODE='{value}' is invalid: give a positive integer" in job_output(tmp_path, job), why
    assert not (tmp_path / "runs" / "bad").exists(), why


def test_a_config_that_cannot_fit_fails_the_job_with_the_plan(slurm_cluster, job_env, tmp_path):
    """The plan runs before srun: "GPUs" of 1 GiB (below the 2 GiB runtime reserve alone) fail the job with the
    plan's table (the 2-node x 1-process layout it was planned for) and no rank ever starts; with
    hardware.fit_check=warn the same job trains."""
    args = _train_args(tmp_path / "runs", "small")
    job = slurm_cluster.sbatch([*args, "--set", "hardware.gpu_memory_gib=1"], cwd=tmp_path, env=job_env)
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", why
    assert "2 node(s) x 1 GPUs of 1.0 GiB; tp 1 pp 1 dp 2" in out and "DOES NOT FIT" in out, why
    assert "train.sbatch: this job cannot fit its GPUs (the plan above); nothing was started" in out, why
    assert not (tmp_path / "runs" / "small").exists(), why
    job = slurm_cluster.sbatch([*args, "--set", "hardware.gpu_memory_gib=1", "--set", "hardware.fit_check=warn",
                                "--set", "steps=1"], cwd=tmp_path, env=job_env)
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "COMPLETED", why
    assert "starting anyway (hardware.fit_check=warn)" in job_output(tmp_path, job), why
