"""slurm/convert.sbatch under a real (local) SLURM: a tiny Hugging Face model becomes a complete Megatron dist
checkpoint (the conversion itself is checked tensor by tensor in tests/distributed/test_convert_roundtrip.py);
a directory without config.json fails the job naming it."""

from __future__ import annotations

import pytest
from dist_utils import TINY_MODEL_FIELDS
from slurm_utils import JOB_TIMEOUT_S, SLURM_DIR, describe, job_output

pytestmark = pytest.mark.slurm

# The scripts' header asks for 16 CPUs and 128 GB: a fake node has 2 CPUs and less memory.
CONVERT_OPTIONS = ["--cpus-per-task=2", "--mem=2G"]


def test_convert_writes_a_megatron_checkpoint(slurm_cluster, job_env, tmp_path):
    from megatron_entcov.config import ModelConfig
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    cfg = ModelConfig(**TINY_MODEL_FIELDS)
    hf = write_hf_model_dir(cfg, tmp_path / "hf", seed=3)
    out = tmp_path / "megatron"
    job = slurm_cluster.sbatch([*CONVERT_OPTIONS, str(SLURM_DIR / "convert.sbatch"), str(hf), str(out),
                                "--make-vocab-size-divisible-by", "8"], cwd=tmp_path, env=job_env)
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert f"{hf} -> {out} --make-vocab-size-divisible-by 8" in job_output(tmp_path, job), why
    step = out / "step_000000"
    assert (step / "COMPLETE").is_file() and (step / "model" / "metadata.json").is_file(), (sorted(out.rglob("*")), why)


def test_convert_without_a_model_directory_fails_naming_it(slurm_cluster, job_env, tmp_path):
    (tmp_path / "empty").mkdir()
    job = slurm_cluster.sbatch([*CONVERT_OPTIONS, str(SLURM_DIR / "convert.sbatch"), str(tmp_path / "empty"),
                                str(tmp_path / "out")], cwd=tmp_path, env=job_env)
    info = slurm_cluster.wait_job(job, timeout_s=JOB_TIMEOUT_S)
    why = describe(slurm_cluster, tmp_path, job, info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", why
    assert f"HF_DIR={tmp_path / 'empty'} has no config.json" in job_output(tmp_path, job), why
    assert not (tmp_path / "out").exists(), why
