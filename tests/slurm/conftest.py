"""Fixtures for the tests that submit the REAL slurm/*.sbatch scripts to a throw-away two-node SLURM cluster on
this machine (``local_slurm.py``): installed with apt-get when missing, started once per session, stopped at
the end (only the daemons it started). Skipped, with the reason, only where root or apt-get is missing.

Jobs run from a temporary submit directory with the trainer venv first on PATH (sbatch exports the
environment), one thread per process, and the options a 2-core node without GPUs needs on top of the scripts'
headers (``slurm_utils.NODE_OPTIONS``: one fake typed GPU per node, 2 CPUs per task).
"""

from __future__ import annotations

import pytest
from local_slurm import LocalSlurm, install_slurm, missing_requirements
from slurm_utils import job_environment


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits slurm/*.sbatch to a throw-away local SLURM cluster (root, "
                                       "apt-get; `make test-slurm`)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    install_slurm()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm_cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def job_env() -> dict[str, str]:
    return job_environment()
