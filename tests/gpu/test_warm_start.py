"""A bfloat16 run started from Hugging Face weights trains from THOSE weights: the optimizer's float32 main
copies (built from the random init when the optimizer is built) are refreshed after the load. A step with an
lr far below bfloat16 resolution must leave the loaded weights exactly as they were; before the refresh it
wrote the random init back. GPU only: Megatron's mixed-precision optimizer (bfloat16 training) is CUDA-only;
it also needs the trainer's batches on the device (the GPU-path work)."""

from __future__ import annotations

import pytest
from dist_utils import run_workers

pytestmark = pytest.mark.gpu

MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.vocab_size=32", "model.make_vocab_size_divisible_by=8",
         "model.max_position_embeddings=64", "model.params_dtype=bfloat16", "rollout.max_prompt_len=16",
         "sampling.max_new_tokens=6"]


def _worker(rank, world_size, hf_dir, out_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.shards import iter_hf_weights

    cfg = load_config(None, MODEL + [
        f"model.hf_dir={hf_dir}", f"output_dir={out_dir}", "name=warm", "steps=1", "optim.lr=1e-30", "optim.optimizer=sgd",
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "optim.micro_batch_size=4",
        "metrics.tensorboard=false", "weight_sync.verify=version"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    try:
        trainer.train_step()
        return {n: t.float().cpu().numpy().copy() for bucket in iter_hf_weights(trainer.actor.chunks, cfg.model, ps)
                for n, t in bucket}
    finally:
        trainer.close()


def test_bf16_warm_start_keeps_the_loaded_weights(tmp_path):
    from safetensors.torch import load_file

    from megatron_entcov.config import load_config
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    hf_dir = write_hf_model_dir(load_config(None, MODEL).model, tmp_path / "hf", seed=3)
    loaded = {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    # backend="auto": nccl on the GPU machine; a gloo group would make init_parallel build the model on the CPU.
    (after,) = run_workers(_worker, 1, args=(str(hf_dir), str(tmp_path / "runs")), timeout=240, backend="auto")
    for name, tensor in after.items():
        assert (tensor == loaded[name]).all(), f"{name}: a zero-lr step changed the loaded weights"
