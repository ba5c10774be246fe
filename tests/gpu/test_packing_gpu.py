"""Packed sequences on a GPU: the THD path (Transformer Engine's attention when it is installed, else the local
attention per sample) gives the padded path's log-probs and gradient norm in float32, and in bf16 to bf16
tolerance. One process, the real Actor; long-tailed sample lengths so rows hold several samples."""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

TINY = ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=1024", "model.max_position_embeddings=256",
        "optim.micro_batch_size=2", "optim.num_mini_batches=1", "optim.lr=1e-3", "optim.optimizer=sgd",
        "rollout.prompts_per_step=16", "rollout.n_samples_per_prompt=1", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=112"]


def _batch(ps):
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.rollout.types import Sample

    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(16):
        r = 112 if i in (2, 9) else int(torch.randint(1, 24, (), generator=g))
        ids = torch.randint(1, 1000, (16 + r,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:16], response_ids=ids[16:], rollout_logprobs=[0.0] * r,
                              finish_reason="stop", weight_version=0, index=i))
    return rows_from_samples(samples, torch.randn(16, generator=g), pad_id=0, sample_ids=list(range(16)),
                             key_stride=128, device=ps.device)


@pytest.mark.parametrize("dtype, atol", [("float32", 2e-4), ("bfloat16", 0.1)])
def test_packed_matches_padded_on_the_gpu(dtype, atol, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.policy.actor import Actor

    cfg = load_config(None, TINY + [f"model.params_dtype={dtype}", f"output_dir={tmp_path}"]).resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    try:
        actor = Actor(cfg, ps, temperature=1.0)
        batch = _batch(ps)
        mask = batch.loss_mask.bool()

        def loss_fn(mb, logprobs, entropy):
            m = mb.loss_mask.float()
            return -(logprobs * m * mb.advantages).sum() / mask.sum(), {}

        out = {}
        params = [p for c in actor.chunks for p in c.parameters()]
        start = [p.detach().clone() for p in params]
        for budget in (0, 256):
            actor.max_tokens = budget
            lp, _ = actor.logprobs(batch)
            result = actor.train_step(batch, loss_fn)
            out[budget] = (lp[mask].float().cpu(), result.grad_norm)
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            actor.optimizer.reload_model_params()
        torch.testing.assert_close(out[256][0], out[0][0], atol=atol, rtol=0)
        assert out[256][1] == pytest.approx(out[0][1], rel=1e-3 if dtype == "float32" else 5e-2)
    finally:
        destroy_parallel()
