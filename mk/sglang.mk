# SGLang rollout servers: their own virtual environment, and the tests that run a real server on CPU.
# Included from the Makefile (`include mk/sglang.mk`); also usable alone: `make -f mk/sglang.mk sglang-env`.
#
#   make sglang-env    # build the server venv (~2.5 min, ~6.7 GB), cached outside the clone
#   make test-sglang   # pytest -m sglang against real servers started from that venv
#
# Why a separate venv: sglang pins torch 2.14.1 (+ torchvision, imported unconditionally), which cannot share
# an environment with the trainer's torch 2.13.0 CPU build. The trainer talks to the servers over HTTP only and
# never imports sglang. The venv is keyed by the pinned versions, so changing a pin builds a fresh one beside
# it; a fresh machine builds it by itself (only PyPI is needed).
#
# Slim install: sglang without its dependencies, then its requirements minus the CUDA-only kernel packages
# (they are large and useless on CPU; on a GPU machine drop SGLANG_SKIP to get them), plus IPython and dill,
# which sglang imports unconditionally without declaring both.

SGLANG_PYTHON ?= python3.11
SGLANG_VERSION ?= 0.5.23
SGLANG_TORCH ?= 2.14.1
SGLANG_TORCHVISION ?= 0.29.1
SGLANG_ROUTER_VERSION ?= 0.3.2
SGLANG_VENV ?= $(HOME)/.cache/megatron-entcov/sglang-venv-$(SGLANG_VERSION)-torch$(SGLANG_TORCH)
SGLANG_PY := $(SGLANG_VENV)/bin/python
# Requirement names (PEP 503-normalised) left out of the slim CPU install.
SGLANG_SKIP ?= flash-attn-4 flashinfer-python humming-kernels nvidia-cutlass-dsl nvshmem4py-cu13 quack-kernels \
	sgl-deep-ep sgl-deep-gemm sgl-flash-mla sglang-kernel tilelang
export SGLANG_PY

.PHONY: sglang-env test-sglang sglang-clean

$(SGLANG_VENV)/.installed:
	@command -v $(SGLANG_PYTHON) >/dev/null || { echo "need $(SGLANG_PYTHON) on PATH (or SGLANG_PYTHON=...)"; exit 1; }
	rm -rf $(SGLANG_VENV)
	$(SGLANG_PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install -q --upgrade "pip>=24"
	$(SGLANG_PY) -m pip install -q --no-deps "sglang==$(SGLANG_VERSION)"
	# sglang's own requirements for this platform, minus extras and the CUDA-only kernels (SGLANG_SKIP).
	$(SGLANG_PY) -c 'import importlib.metadata as m, sys; from pip._vendor.packaging.requirements import Requirement as R; \
		canon = lambda n: n.lower().replace("_", "-"); skip = set(sys.argv[1:]); \
		reqs = [R(r) for r in m.requires("sglang")]; \
		keep = [r for r in reqs if (r.marker is None or r.marker.evaluate({"extra": ""})) and canon(r.name) not in skip]; \
		open(sys.prefix + "/sglang-reqs.txt", "w").write("\n".join(str(r) for r in keep) + "\n")' $(SGLANG_SKIP)
	$(SGLANG_PY) -m pip install -q "torch==$(SGLANG_TORCH)" "torchvision==$(SGLANG_TORCHVISION)" \
		-r $(SGLANG_VENV)/sglang-reqs.txt IPython dill
	$(SGLANG_PY) -c 'import torch, sglang.srt.entrypoints.http_server; assert torch.__version__.startswith("$(SGLANG_TORCH)"), torch.__version__'
	touch $@

# sglang-router (a Rust binary wheel) in the same venv: the engine's rollout.sglang.router_url path is tested with it.
# A separate stamp, so a venv cached before the router was added gets it without a rebuild.
$(SGLANG_VENV)/.router-$(SGLANG_ROUTER_VERSION): $(SGLANG_VENV)/.installed
	$(SGLANG_PY) -m pip install -q --no-deps "sglang-router==$(SGLANG_ROUTER_VERSION)"
	$(SGLANG_PY) -c 'import sglang_router.launch_router'
	touch $@

sglang-env: $(SGLANG_VENV)/.installed $(SGLANG_VENV)/.router-$(SGLANG_ROUTER_VERSION)

# Real servers on CPU: a few minutes, mostly server start-ups.
# `setup` (the trainer venv) when included from the Makefile; alone, .venv must exist already.
SGLANG_TEST_DEPS ?= $(if $(VENV),setup,)
test-sglang: sglang-env $(SGLANG_TEST_DEPS)
	$(if $(PY),$(PY),.venv/bin/python) -m pytest -m sglang tests/sglang $(PYTEST_FLAGS)

sglang-clean:
	rm -rf $(SGLANG_VENV)

# GPU servers: the FULL install (CUDA kernels: sglang-kernel, flashinfer, ...), in its own venv beside the slim
# one; default_server_python('cuda') picks it when it exists. Only on a machine with NVIDIA GPUs and PyPI access.
SGLANG_GPU_VENV ?= $(HOME)/.cache/megatron-entcov/sglang-gpu-venv-$(SGLANG_VERSION)-torch$(SGLANG_TORCH)
.PHONY: sglang-env-gpu
sglang-env-gpu:
	$(MAKE) -f mk/sglang.mk sglang-env SGLANG_VENV=$(SGLANG_GPU_VENV) SGLANG_SKIP=
