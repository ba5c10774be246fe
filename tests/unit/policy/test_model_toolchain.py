"""policy/model.py's choices on a GPU node, shown on CPU with a faked CUDA and a faked Transformer Engine:

- a TE whose top-level package imports but whose ``transformer_engine.pytorch`` fails (its CUDA libraries do not
  load) is not used: 'auto' builds the local spec and says why; 'transformer_engine' is one error naming the field
  and the import error. The probe imports once per process.
- without TE on a GPU, sequence parallelism (Megatron's WrappedTorchNorm asserts it off; compat/cpu.py's fix is
  CPU-only) and attention whose kept scores exceed the GPU's memory (the Qwen configs' 10k-token samples) are
  refused at build time, naming the field, with the bound's arithmetic checked against the numbers here.
- where Megatron's jit_fuser (torch.compile) fails, the TE path's TransformerConfig has bias_activation_fusion off
  and the log line names why.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_entcov.compat import toolchain
from megatron_entcov.config import ModelConfig, ParallelConfig, load_config
from megatron_entcov.policy import model as model_mod

REPO = Path(__file__).resolve().parents[3]
H100 = types.SimpleNamespace(total_memory=85_520_809_984, name="NVIDIA H100 80GB HBM3")
GPU = torch.device("cuda", 0)


class _BrokenTEPytorch(importlib.abc.MetaPathFinder):
    """``import transformer_engine.pytorch`` fails as it does when TE's CUDA libraries do not load."""

    def __init__(self):
        self.calls = 0

    def find_spec(self, name, path=None, target=None):
        if name == "transformer_engine.pytorch":
            self.calls += 1
            raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
        return None


@pytest.fixture
def gpu_node(monkeypatch):
    """A CUDA device is 'available' (an H100's properties) and Transformer Engine's top-level package imports."""
    toolchain.reset()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: H100)
    te = types.ModuleType("transformer_engine")
    te.__path__, te.__version__ = [], "2.8.0"
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.delitem(sys.modules, "transformer_engine.pytorch", raising=False)
    yield
    toolchain.reset()


@pytest.fixture
def broken_te(gpu_node, monkeypatch):
    finder = _BrokenTEPytorch()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    return finder


def test_te_whose_pytorch_module_fails_is_not_used_and_the_reason_is_named_once(broken_te, caplog):
    assert model_mod.te_available() is False
    probe = toolchain.transformer_engine()
    assert "transformer_engine.pytorch does not import (OSError: libcudnn.so.9" in probe.reason
    assert model_mod.uses_transformer_engine(ModelConfig()) is False
    spec = model_mod.build_layer_spec(ModelConfig())
    from megatron_entcov.policy.packing import PackedDotProductAttention

    assert spec.submodules.self_attention.submodules.core_attention is PackedDotProductAttention
    with pytest.raises(ValueError, match=r"model.transformer_impl='transformer_engine' needs Transformer Engine, "
                                         r"which is not usable here: transformer_engine.pytorch does not import "
                                         r"\(OSError: libcudnn"):
        model_mod.uses_transformer_engine(ModelConfig(transformer_impl="transformer_engine"))
    assert "local spec (model.transformer_impl=auto; Transformer Engine not usable: transformer_engine.pytorch " \
           "does not import (OSError" in model_mod._spec_choice(ModelConfig())
    assert broken_te.calls == 1                         # probed once for all the questions above


def test_te_that_imports_but_megatron_spec_found_no_te_is_not_used(gpu_node, monkeypatch):
    """transformer_engine.pytorch imports, but Megatron's TE layer spec module was imported without TE (HAVE_TE is
    False there): building the TE spec would fail, so TE is not usable."""
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch"))
    specs = importlib.import_module("megatron.core.models.gpt.gpt_layer_specs")
    monkeypatch.setattr(specs, "HAVE_TE", False)
    for name in ("megatron.core.extensions.transformer_engine",
                 "megatron.core.extensions.transformer_engine_spec_provider"):
        fake = types.ModuleType(name)
        fake.HAVE_TE = True
        monkeypatch.setitem(sys.modules, name, fake)
    probe = toolchain.transformer_engine()
    assert not probe.ok and "megatron.core.models.gpt.gpt_layer_specs found no Transformer Engine" in probe.reason
    monkeypatch.setattr(specs, "HAVE_TE", True)
    toolchain.reset()
    probe = toolchain.transformer_engine()
    assert probe.ok and probe.reason.startswith("transformer_engine 2.8.0:")


def test_no_cuda_means_no_te(monkeypatch):
    toolchain.reset()
    finder = _BrokenTEPytorch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        assert toolchain.transformer_engine() == toolchain.Probe(False, "no CUDA device (Transformer Engine's "
                                                                        "kernels are GPU-only)")
        assert finder.calls == 0                        # TE is not installed here: nothing was imported
    finally:
        toolchain.reset()


def _fake_ps(tp=1):
    return types.SimpleNamespace(device=GPU, tp_size=tp, is_first_stage=True, is_last_stage=True)


def test_sequence_parallel_without_te_on_a_gpu_is_refused_at_build_naming_the_field(broken_te):
    model = ModelConfig(num_attention_heads=4, num_query_groups=2, params_dtype="bfloat16")
    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    expected = (r"parallel.sequence_parallel=true needs Transformer Engine on a GPU \(Megatron's local spec norm, "
                r"WrappedTorchNorm, refuses it; this run would use the local spec \(model.transformer_impl=auto; "
                r"Transformer Engine not usable: transformer_engine.pytorch does not import \(OSError.*install "
                r"Transformer Engine and set model.transformer_impl=auto, or set parallel.sequence_parallel=false$")
    with pytest.raises(ValueError, match=expected):
        model_mod.build_model(model, parallel, _fake_ps(tp=2))
    # An explicit local spec too; on CPU nothing is refused (compat/cpu.py makes the norm work under SP).
    with pytest.raises(ValueError, match=r"model.transformer_impl=local\)"):
        model_mod.check_local_spec(ModelConfig(transformer_impl="local"), parallel, GPU)
    model_mod.check_local_spec(model, parallel, torch.device("cpu"))


@pytest.mark.parametrize("config, heads, layers", [("qwen2.5-7b_kl_cov.yaml", 28 // 4, 28),
                                                    ("qwen2.5-32b_kl_cov.yaml", 40 // 8, 64 // 2)])
def test_qwen_lengths_on_the_local_attention_are_refused_with_the_bound_s_arithmetic(broken_te, config, heads,
                                                                                     layers):
    cfg = load_config(str(REPO / "configs" / config), ["parallel.sequence_parallel=false"])
    extent = model_mod.sequence_extent(cfg)
    assert extent == {"max_seq_len": 2048 + 8192, "micro_batch_tokens": 10240}
    # Independent arithmetic: per head a [T, T] fp32 softmax output plus its bf16 copy (6 bytes) per sample, T =
    # 10240; one micro-batch of 10240 tokens holds one such sample; every layer of the stage keeps its own.
    need = heads * 10240 * 10240 * (4 + 2) * layers
    assert need > H100.total_memory
    message = (f"{heads} heads per rank x 10240 tokens per micro-batch x 10240 tokens of the longest sample x 6 bytes "
               f"(fp32 softmax + its bfloat16 copy) x {layers} layers = {need / 2**30:.1f} GiB > the 79.6 GiB of this "
               "GPU (NVIDIA H100 80GB HBM3)")
    with pytest.raises(ValueError) as err:
        model_mod.build_model(cfg.model, cfg.parallel, _fake_ps(cfg.parallel.tensor_model_parallel_size), **extent)
    text = str(err.value)
    assert text.startswith("model.transformer_impl='auto': the local spec (model.transformer_impl=auto; Transformer "
                           "Engine not usable: transformer_engine.pytorch does not import")
    assert message in text and "optim.max_tokens_per_micro_batch" in text and "\n" not in text


def test_short_samples_on_the_local_attention_pass_the_bound(broken_te):
    model = ModelConfig(num_layers=28, num_attention_heads=28, num_query_groups=4, hidden_size=3584,
                        ffn_hidden_size=18944, params_dtype="bfloat16")
    parallel = ParallelConfig(tensor_model_parallel_size=4)
    need, _ = model_mod.local_attention_bytes(model, parallel, max_seq_len=1024, micro_batch_tokens=4096)
    assert need == 7 * 4096 * 1024 * 6 * 28 < H100.total_memory
    model_mod.check_local_spec(model, parallel, GPU, max_seq_len=1024, micro_batch_tokens=4096)
    # Without the training lengths (a build that is not trained) nothing is judged, even at 32k positions.
    model.max_position_embeddings = 32768
    model_mod.check_local_spec(model, parallel, GPU)
    with pytest.raises(ValueError, match=r"7 heads per rank x 32768 tokens per micro-batch x 32768 tokens"):
        model_mod.check_local_spec(model, parallel, GPU, max_seq_len=32768)


def test_a_failing_jit_fuser_turns_the_te_fusions_off_and_the_log_says_why(monkeypatch, caplog):
    monkeypatch.setattr(toolchain, "transformer_engine", lambda: toolchain.Probe(True, "transformer_engine 2.8.0"))
    why = "Megatron's jit_fuser (torch.compile) fails on cuda:0 (BackendCompilerFailed: triton not found)"
    seen = []

    def probe(device, dtype=torch.float32):
        seen.append((device, dtype))
        return toolchain.Probe(False, why)

    monkeypatch.setattr(toolchain, "jit_fuser", probe)
    model, parallel = ModelConfig(params_dtype="bfloat16"), ParallelConfig()
    with caplog.at_level(logging.INFO, logger=model_mod.__name__):
        config = model_mod.build_transformer_config(model, parallel, device=GPU)
    assert config.bias_activation_fusion is False and config.gradient_accumulation_fusion is False
    assert seen == [(GPU, torch.bfloat16)]
    lines = [r.getMessage() for r in caplog.records if "fusion" in r.getMessage()]
    assert lines == [f"fusions: bias_activation_fusion off, the SwiGLU runs unfused: {why}"]
    # Where the probe passes, the fusion stays on (Megatron's TE-path setting).
    monkeypatch.setattr(toolchain, "jit_fuser", lambda device, dtype=torch.float32: toolchain.Probe(True, "works"))
    assert model_mod.build_transformer_config(model, parallel, device=GPU).bias_activation_fusion is True
