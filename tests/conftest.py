"""Shared pytest set-up: skip GPU tests without CUDA; keep CPU threads modest (2-core CI machines)."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
