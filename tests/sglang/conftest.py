"""Fixtures for tests against REAL SGLang servers on CPU, started from the server venv (``make sglang-env``).

Every test here is marked ``sglang``; without the server venv they are skipped with the command that builds it.
A server takes 25-70 s to start and ~3 GB of memory, so servers are module-scoped and shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_entcov.config import ModelConfig
from megatron_entcov.rollout.sglang.server import default_server_python

# A tiny random Qwen2 (QKV bias) in float32, the character tokenizer's ids inside its vocabulary.
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=32, make_vocab_size_divisible_by=8, max_position_embeddings=128, add_qkv_bias=True,
            tie_word_embeddings=True)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    python = default_server_python()
    if Path(python).is_file():
        return
    skip = pytest.mark.skip(reason=f"SGLang server venv missing ({python}); build it with `make sglang-env` "
                                   "(~4 min, ~7 GB, PyPI only) or set $SGLANG_PY to a python with sglang==0.5.23")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tiny_cfg) -> dict[str, Path]:
    """Two HF model directories of the same architecture with different random weights ('a' and 'b')."""
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    root = tmp_path_factory.mktemp("sglang_models")
    return {name: write_hf_model_dir(tiny_cfg, root / name, state_dict=_peaky_weights(tiny_cfg, seed))
            for name, seed in (("a", 0), ("b", 1))}


def _peaky_weights(cfg: ModelConfig, seed: int) -> dict:
    """Random weights with a large scale: peaked next-token distributions, so greedy responses vary along the
    sequence (HF's default 0.02 init makes a tiny model repeat one token) and differ between seeds."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(to_hf_config(cfg)).named_parameters()}
    return {n: (1.0 + 0.1 * torch.randn(s, generator=gen)) if n.endswith("norm.weight")
            else 0.3 * torch.randn(s, generator=gen) for n, s in shapes.items()}


def pytest_configure(config):
    # Also registered in pytest.ini by the lead; registering here keeps --strict-markers happy either way.
    config.addinivalue_line("markers", "sglang: runs real SGLang servers on CPU from the server venv "
                                       "(`make sglang-env`; `make test-sglang`)")
