# GPU tests (`@pytest.mark.gpu`): Transformer Engine spec, the vocab-parallel op on CUDA, and SGLang GPU servers
# (CUDA IPC tensor sync, NCCL broadcast sync, memory release/resume, a colocated RL step); and the one-GPU check.
# Included from the Makefile. Never run by CI.
#
#   make test-gpu         # NVIDIA GPUs, CUDA 12.8+ driver, PyPI: .venv-gpu (CUDA torch + the same pins + TE) and
#                         # the full SGLang GPU venv, then pytest -m gpu. Nothing may skip (ENTCOV_GPU_REQUIRE):
#                         # a failed TE build fails here; `make test-gpu GPU_EXTRAS=` opts out of TE (its test skips)
#   make gpu-wheelhouse   # any machine with PyPI: the cp312 wheels a GPU image without a registry lacks, <= 60 MiB
#   make gpu-check OUT=d  # on that GPU machine (tools/gpu_check.sh d): venv, offline install, checks, d/report.json
#   make gpu-check-dry-run OUT=d   # here, on .venv, CPU-sized (~1.5 min)
#
# The trainer venv is separate from .venv: .venv holds the CPU build of torch on purpose (no CUDA build may
# slip into CI), .venv-gpu the CUDA build of the same version from PyPI.

GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_EXTRAS ?= transformer-engine[pytorch]
GPU_WHEELHOUSE ?= gpu-wheelhouse
GPU_WHEELHOUSE_MAX_MIB ?= 60
OUT ?= runs/gpu-check
comma := ,
# What the GPU tests must find (tests/gpu/conftest.py): CUDA and the SGLang GPU venv always, TE unless opted out.
GPU_REQUIRE := cuda,sglang$(if $(strip $(GPU_EXTRAS)),$(comma)te)

.PHONY: setup-gpu test-gpu gpu-wheelhouse gpu-check gpu-check-dry-run

$(GPU_VENV)/.installed: setup.py requirements/cpu.txt
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --upgrade "pip>=24"
	$(GPU_PY) -m pip install -q "torch==2.13.0"
	$(GPU_PY) -m pip install -q -r requirements/cpu.txt
	$(GPU_PY) -m pip install -q --no-deps -e .
	$(GPU_PY) -c "import torch; assert torch.cuda.is_available(), 'torch in $(GPU_VENV) sees no GPU'"
	touch $@

# Transformer Engine (model.transformer_impl=transformer_engine): its own stamp, so opting in later installs it.
$(GPU_VENV)/.te-installed: $(GPU_VENV)/.installed
	$(GPU_PY) -m pip install -q --no-build-isolation "$(GPU_EXTRAS)" || { \
		echo "Transformer Engine ($(GPU_EXTRAS)) did not install: fix its build (CUDA toolkit, cuDNN headers)," >&2; \
		echo "or test without it: make test-gpu GPU_EXTRAS=  (its test then skips)" >&2; exit 1; }
	$(GPU_PY) -c "import transformer_engine.pytorch"
	touch $@

setup-gpu: $(GPU_VENV)/.installed $(if $(strip $(GPU_EXTRAS)),$(GPU_VENV)/.te-installed)

# One NCCL for the trainer and the servers: the 'distributed' weight sync (an NCCL group of both) fails at the first
# broadcast when their versions differ (torch 2.13 ships 2.29.7, SGLang's torch 2.14.1 2.30.7), and the engine refuses
# it at start (transports.check_nccl_versions). This installs the SGLang GPU venv's nvidia-nccl-cu* wheel into the
# trainer venv, whose torch loads that wheel's libnccl (pip warns that torch pinned the other version).
NCCL_DIST_PY := import importlib.metadata as m; print(next((d.metadata['Name'] + '==' + d.version for d in \
	m.distributions() if (d.metadata['Name'] or '').lower().startswith('nvidia-nccl-cu')), ''))
.PHONY: gpu-nccl-align
gpu-nccl-align: setup-gpu sglang-env-gpu
	spec=$$($(SGLANG_GPU_VENV)/bin/python -c "$(NCCL_DIST_PY)"); \
	if [ -n "$$spec" ]; then $(GPU_PY) -m pip install -q --no-deps "$$spec"; fi
	$(GPU_PY) -c "import torch; print('trainer NCCL', torch.cuda.nccl.version())"
	$(SGLANG_GPU_VENV)/bin/python -c "import torch; print('servers NCCL', torch.cuda.nccl.version())"

test-gpu: setup-gpu sglang-env-gpu gpu-nccl-align
	ENTCOV_GPU_REQUIRE=$(GPU_REQUIRE) SGLANG_PY=$(SGLANG_GPU_VENV)/bin/python \
		$(GPU_PY) -m pytest -m gpu tests/gpu $(PYTEST_FLAGS)

# The wheels a GPU image with Python 3.12, CUDA torch, transformers, triton, tensorboard, safetensors and pyyaml
# lacks (megatron-core, math-verify and its parser, psutil, matplotlib, pytest, their dependencies; pins from
# requirements/cpu.txt, list in tools/gpu_check.py), for cp312 manylinux x86_64: no Python 3.12 needed here.
# Replaced only when complete and within GPU_WHEELHOUSE_MAX_MIB: small enough to travel with the checkout.
gpu-wheelhouse:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3)"; exit 1; }
	$(PYTHON) tools/gpu_check.py wheelhouse $(GPU_WHEELHOUSE) --max-mib $(GPU_WHEELHOUSE_MAX_MIB)

gpu-check:
	GPU_WHEELHOUSE=$(GPU_WHEELHOUSE) tools/gpu_check.sh $(OUT)

# No `setup` prerequisite: VENV may be another checkout's venv, which a fresh clone's newer files would rebuild.
gpu-check-dry-run:
	VENV=$(VENV) tools/gpu_check.sh --cpu-dry-run $(OUT)
