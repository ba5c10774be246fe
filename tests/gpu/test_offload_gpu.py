"""The colocated offload (policy/offload.py) on a GPU, bf16: the fp32 main weights and Adam moments are separate
storages there (on CPU in float32 the optimizer holds the model's own weights), copies are pinned and
non-blocking, storages are CUDA storages. One process, the real Actor, with and without the distributed
optimizer: offloading frees the device memory it says it frees, and a training step after a reload is
bit-identical to the same step without the round trip."""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

TINY = ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=1024", "model.max_position_embeddings=128",
        "model.params_dtype=bfloat16", "model.transformer_impl=local", "optim.micro_batch_size=4",
        "optim.num_mini_batches=1", "optim.lr=1e-3"]


def _step(actor, batch):
    def loss_fn(mb, logprobs, entropy):
        mask = mb.loss_mask.float()
        loss = -(logprobs * mask).sum() / mask.sum()
        return loss, {}
    return actor.train_step(batch, loss_fn, label="gpu offload test")


def _batch(ps, seed):
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.rollout.types import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(8):
        ids = torch.randint(1, 1000, (24,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:8], response_ids=ids[8:], rollout_logprobs=[0.0] * 16,
                              finish_reason="length", weight_version=0, index=i))
    return rows_from_samples(samples, torch.zeros(8), pad_id=0, sample_ids=list(range(8)), key_stride=24,
                             device=ps.device)


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_offload_frees_device_memory_and_a_step_after_reload_is_bit_identical(distributed_optimizer, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel, seed_everything
    from megatron_entcov.policy.actor import Actor
    from megatron_entcov.policy.offload import TrainerOffload

    cfg = load_config(None, TINY + [f"parallel.use_distributed_optimizer={str(distributed_optimizer).lower()}",
                                    f"output_dir={tmp_path}"]).resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    try:
        results = []
        for offload_between in (False, True):
            seed_everything(cfg.seed, ps)
            actor = Actor(cfg, ps, temperature=1.0)
            off = TrainerOffload(actor.chunks, actor.optimizer, enabled=True)
            _step(actor, _batch(ps, 1))                   # optimizer state exists from here on
            freed = 0
            if offload_between:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                off.offload(weights=False)
                after_optimizer = torch.cuda.memory_allocated()
                off.offload(weights=True)
                after_all = torch.cuda.memory_allocated()
                assert after_optimizer < before and after_all < after_optimizer
                freed = before - after_all
                # What was freed is what is held: the host copies plus the (uncopied) gradient buffers.
                grads = sum(m.nbytes for m in off._moved["grads"])
                n = sum(len(v) for v in off._moved.values())
                expected = off.host_bytes + grads            # the allocator rounds each block up to 512 bytes
                assert expected <= freed <= expected + 512 * n, (freed, off.host_bytes, grads, n)
                off.reload()
                assert torch.cuda.memory_allocated() == before and off.host_bytes == 0
            result = _step(actor, _batch(ps, 2))
            params = {n: p.detach().float().cpu() for c in actor.chunks for n, p in c.named_parameters()}
            results.append((result.grad_norm, params, freed))
            del actor, off
            torch.cuda.empty_cache()
        (norm_a, params_a, _), (norm_b, params_b, freed) = results
        assert freed > 0 and norm_a == norm_b
        assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    finally:
        destroy_parallel()
