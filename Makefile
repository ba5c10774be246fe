# Set-up and entry points. A fresh machine with Python 3.11 needs only:
#   make quickstart   # venv + install + CPU quickstart run
#   make test         # venv + install + lint + tests (what CI runs through .ci/run): core suite (its dashboard tests
#                     # in headless Chromium: root + apt-get; mk/browser.mk) + real SGLang servers
#                     # + slurm/*.sbatch on a throw-away local SLURM cluster (root + apt-get; mk/slurm.mk)
#   make test-gpu     # GPU machines only (mk/gpu.mk): the @pytest.mark.gpu tests
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_FLAGS ?=

.PHONY: setup quickstart lint test test-core test-slow test-all bench clean

include mk/sglang.mk
include mk/gpu.mk
include mk/slurm.mk
include mk/browser.mk

$(VENV)/.installed: setup.py requirements/cpu.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch first, pinned: the CPU wheel. Any later resolution then keeps it (no CUDA build pulled in).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import torch, megatron.core; assert not torch.version.cuda, 'a CUDA torch build got into the CPU venv'"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(PY) -m megatron_entcov quickstart

# pyflakes + import order (ruff.toml), and the floor plan: imports only go down the layers, no cycle (.importlinter).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-logo --no-cache

# Everything CI runs: the lint, the core suite, the tests against real SGLang servers (builds their venv once), then
# the job scripts under a local SLURM cluster.
test: lint test-core test-sglang test-slurm

test-core: setup browser
	$(PY) -m pytest -m "not gpu and not slow and not sglang and not slurm" $(PYTEST_FLAGS)

test-slow: setup
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_FLAGS)

test-all: setup sglang-env
	$(PY) -m pytest -m "not gpu" $(PYTEST_FLAGS)

bench: setup
	$(PY) bench/vocab_parallel.py
	$(PY) bench/entropy_dynamics.py --out runs/bench/entropy_dynamics

clean:
	rm -rf $(VENV) build *.egg-info
