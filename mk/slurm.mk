# The job scripts (slurm/*.sbatch) submitted for real to a throw-away two-node SLURM cluster on this machine:
# Debian's slurmctld/slurmd/slurm-client (installed with apt-get by the test fixture when missing), AuthType
# auth/none, two slurmd in private mount namespaces (tests/slurm/local_slurm.py). Needs root; skipped with the
# reason otherwise. Included from the Makefile.
#
#   make test-slurm    # pytest -m slurm tests/slurm: train (2 nodes, preemption + requeue), train + SGLang
#                      # server node (needs the server venv: make sglang-env), convert; 6-9 min measured on
#                      # 2 cores shared with other test suites (two CPU SGLang server start-ups dominate)

.PHONY: test-slurm

test-slurm: setup sglang-env
	$(PY) -m pytest -m slurm tests/slurm $(PYTEST_FLAGS)
