# GPU tests (`@pytest.mark.gpu`): Transformer Engine spec, the vocab-parallel op on CUDA, and SGLang GPU servers
# (CUDA IPC tensor sync, NCCL broadcast sync, memory release/resume, a colocated RL step).
# Included from the Makefile; needs NVIDIA GPUs, a driver for CUDA 12.8+, and PyPI access. Never run by CI.
#
#   make test-gpu      # .venv-gpu (CUDA torch + the same pins) + the full SGLang GPU venv, then pytest -m gpu
#
# The trainer venv is separate from .venv: .venv holds the CPU build of torch on purpose (no CUDA build may
# slip into CI), .venv-gpu the CUDA build of the same version from PyPI.

GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_EXTRAS ?= transformer-engine[pytorch]

.PHONY: setup-gpu test-gpu

$(GPU_VENV)/.installed: setup.py requirements/cpu.txt
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --upgrade "pip>=24"
	$(GPU_PY) -m pip install -q "torch==2.13.0"
	$(GPU_PY) -m pip install -q -r requirements/cpu.txt
	$(GPU_PY) -m pip install -q --no-deps -e .
	# Transformer Engine is optional (model.transformer_impl=transformer_engine); a failed build only skips its test.
	-$(GPU_PY) -m pip install -q --no-build-isolation "$(GPU_EXTRAS)"
	$(GPU_PY) -c "import torch; assert torch.cuda.is_available(), 'torch in $(GPU_VENV) sees no GPU'"
	touch $@

setup-gpu: $(GPU_VENV)/.installed

test-gpu: setup-gpu sglang-env-gpu
	SGLANG_PY=$(SGLANG_GPU_VENV)/bin/python $(GPU_PY) -m pytest -m gpu tests/gpu $(PYTEST_FLAGS)
