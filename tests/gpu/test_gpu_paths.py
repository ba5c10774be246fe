"""GPU-only paths: the vocab-parallel op on CUDA, NCCL process groups, the Transformer Engine layer spec.
Skipped without CUDA (CPU CI); run them with `pytest -m gpu` on a GPU machine. The Transformer Engine test skips
without TE, and fails instead under ENTCOV_GPU_REQUIRE=te (`make test-gpu` installs TE; tests/gpu/conftest.py)."""

import importlib

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_vocab_parallel_op_on_cuda_matches_float64_reference():
    from megatron_entcov.ops.vocab_parallel import logprobs_and_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(512, 4096, device="cuda", generator=g, dtype=torch.bfloat16) * 4
    labels = torch.randint(0, 4096, (512,), device="cuda", generator=g)
    z = logits.detach().clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy(z, labels)
    (lp.sum() + ent.sum()).backward()
    ref = logits.double().requires_grad_(True)
    logp = torch.log_softmax(ref, -1)
    ref_lp = logp.gather(-1, labels[:, None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(z.grad.double(), ref.grad, atol=2e-2, rtol=2e-2)


def _te_missing() -> str | None:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # noqa: BLE001 - a broken TE install is as missing as an absent one
        return f"transformer_engine.pytorch does not import ({type(e).__name__}: {e}); `make test-gpu` installs it"
    return None


def test_transformer_engine_spec_matches_local_spec(tmp_path, gpu_need):
    gpu_need("te", _te_missing())
    # One process, NCCL: init_parallel fills the env:// rendezvous for a single rank itself.
    tmp = str(tmp_path)
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.policy.model import build_model
    from megatron_entcov.run.checkpoint import load_model, save_model

    outs = {}
    for impl in ("local", "transformer_engine"):
        cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=256",
                                 "model.num_attention_heads=4", "model.num_query_groups=2", "model.add_qkv_bias=true",
                                 f"model.transformer_impl={impl}", "parallel.backend=nccl"]).resolve(1)
        ps = init_parallel(cfg.parallel, seed=3)
        chunks = build_model(cfg.model, cfg.parallel, ps)
        if impl == "local":
            save_model(chunks, f"{tmp}/ckpt")
        else:
            load_model(chunks, f"{tmp}/ckpt")
        ids = torch.arange(32, device="cuda").reshape(2, 16) % 100
        with torch.no_grad():
            outs[impl] = chunks[0](ids, torch.arange(16, device="cuda").expand(2, 16), None).float().cpu()
        destroy_parallel()
    torch.testing.assert_close(outs["local"], outs["transformer_engine"], atol=1e-3, rtol=1e-3)
