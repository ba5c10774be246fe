"""compat/toolchain.py's probes and policy/model.py's choices on a real GPU: Megatron's jit_fuser (torch.compile,
Triton) compiles there, so the TE path keeps bias_activation_fusion on; the Transformer Engine probe agrees with
the import it stands for; the local spec's memory bound is judged against this GPU's memory. Skipped without CUDA;
the TE test skips without TE and fails instead under ENTCOV_GPU_REQUIRE=te (tests/gpu/conftest.py). The CPU
tests of the same choices (faked CUDA and TE): tests/unit/policy/test_model_toolchain.py."""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def toolchain():
    from megatron_entcov.compat import toolchain

    toolchain.reset()
    yield toolchain
    toolchain.reset()


def test_megatron_jit_fuser_compiles_on_this_gpu(toolchain):
    probe = toolchain.jit_fuser(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    assert probe.ok, f"{probe.reason}: the TE path would run its SwiGLU unfused on this node"


def test_te_probe_agrees_with_the_import_and_the_te_config_keeps_its_fusion(toolchain, gpu_need):
    from megatron_entcov.config import ModelConfig, ParallelConfig
    from megatron_entcov.policy.model import build_transformer_config

    te = toolchain.transformer_engine()
    gpu_need("te", None if te.ok else te.reason)
    import transformer_engine.pytorch  # noqa: F401 - what the probe says imports, imports

    config = build_transformer_config(ModelConfig(params_dtype="bfloat16", transformer_impl="transformer_engine"),
                                      ParallelConfig(), device=torch.device("cuda", torch.cuda.current_device()))
    assert config.bias_activation_fusion is True


def test_local_spec_memory_bound_against_this_gpu(toolchain):
    from megatron_entcov.config import load_config
    from megatron_entcov.policy import model

    cfg = load_config(str(REPO / "configs" / "qwen2.5-7b_kl_cov.yaml"),
                      ["parallel.sequence_parallel=false", "model.transformer_impl=local"])
    extent = model.sequence_extent(cfg)
    need, _ = model.local_attention_bytes(cfg.model, cfg.parallel, **extent)
    assert need == 7 * 10240 * 10240 * 6 * 28
    device = torch.device("cuda", torch.cuda.current_device())
    if need > torch.cuda.get_device_properties(device).total_memory:
        with pytest.raises(ValueError, match=r"model.transformer_impl='local': the local spec .* keeps each layer's "
                                             r"attention scores for the backward, at least 7 heads per rank"):
            model.check_local_spec(cfg.model, cfg.parallel, device, **extent)
    else:                                     # a GPU with more memory than the bound (e.g. 141 GB): not refused
        model.check_local_spec(cfg.model, cfg.parallel, device, **extent)
