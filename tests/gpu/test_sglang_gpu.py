"""SGLang on GPUs: the weight transports' GPU paths (CUDA IPC for 'tensor', NCCL for 'distributed'), the colocated
mode's memory release/resume, and RL steps with colocated servers that give their memory to the trainer.

Needs a CUDA GPU, a CUDA build of torch in the trainer venv and the FULL SGLang install (CUDA kernels):
`make test-gpu` builds both (mk/gpu.mk). Without that venv the tests skip, and fail instead under
ENTCOV_GPU_REQUIRE=sglang, which `make test-gpu` sets (tests/gpu/conftest.py). Each check mirrors a CPU test in
tests/sglang: a synced server must generate exactly what a server started from the same weights on disk
generates (float32 and torch-native attention on both sides, so the comparison is exact up to float rounding).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=32, make_vocab_size_divisible_by=8, max_position_embeddings=128, add_qkv_bias=True,
            tie_word_embeddings=True)
# Exact comparisons between servers: float32, torch-native attention and sampling, no CUDA graphs; a small
# static memory share so the trainer (and a second server) fit beside it.
GPU_ARGS = ["--attention-backend", "torch_native", "--sampling-backend", "pytorch", "--disable-cuda-graph",
            "--mem-fraction-static", "0.15"]
PROMPTS = [[2, 5, 6, 14, 7, 8, 17], [2, 9, 16, 4, 17], [2, 13, 15, 11, 17], [2, 6, 14, 6, 17]]


@pytest.fixture(scope="module")
def server_python(gpu_need) -> str:
    """The SGLang GPU venv's python; skips without it, or fails under ENTCOV_GPU_REQUIRE=sglang (conftest.py)."""
    from megatron_entcov.rollout.sglang.server import default_server_python

    python = default_server_python("cuda")
    ok = Path(python).is_file() and subprocess.run([python, "-c", "import sgl_kernel"], capture_output=True).returncode == 0
    gpu_need("sglang", None if ok else f"no SGLang GPU venv ({python} cannot import sgl_kernel): run "
                                       "`make sglang-env-gpu`")
    return python


@pytest.fixture(scope="module")
def tiny_cfg():
    from megatron_entcov.config import ModelConfig

    return ModelConfig(**TINY)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_cfg):
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(to_hf_config(tiny_cfg)).named_parameters()}
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        g = torch.Generator().manual_seed(seed)
        sd = {n: (1.0 + 0.1 * torch.randn(s, generator=g)) if n.endswith("norm.weight")
              else 0.3 * torch.randn(s, generator=g) for n, s in shapes.items()}
        out[name] = write_hf_model_dir(tiny_cfg, tmp_path_factory.mktemp("gpu_models") / name, state_dict=sd)
    return out


def _engine(cfg, model_dir, tmp_path, server_python, gpu_ids=None, **sglang_fields):
    from megatron_entcov.config import SGLangConfig
    from megatron_entcov.rollout.sglang import SGLangEngine

    sglang = SGLangConfig(server_device="cuda", server_args=GPU_ARGS, request_timeout_s=120, max_inflight=32,
                          **sglang_fields)
    return SGLangEngine(cfg, sglang, model_dir=model_dir, server_python=server_python, log_dir=tmp_path,
                        gpu_ids=gpu_ids)


def _cuda_buckets(model_dir, size=3):
    from safetensors.torch import load_file

    items = sorted(load_file(str(Path(model_dir) / "model.safetensors"), device="cuda").items())
    return [items[i:i + size] for i in range(0, len(items), size)]


def _greedy():
    from megatron_entcov.rollout.types import SamplingParams

    return SamplingParams(temperature=1.0, top_k=1, max_new_tokens=24)


def _assert_same(samples, ref, tol=1e-4):
    for s, r in zip(samples, ref, strict=True):
        assert s.response_ids == r.response_ids, (s.index, s.response_ids, r.response_ids)
        assert max(abs(x - y) for x, y in zip(s.rollout_logprobs, r.rollout_logprobs)) <= tol


@pytest.fixture(scope="module")
def reference_b(tiny_cfg, model_dirs, tmp_path_factory, server_python):
    """Greedy outputs of a GPU server started from weights 'b' on disk."""
    eng = _engine(tiny_cfg, model_dirs["b"], tmp_path_factory.mktemp("ref_logs"), server_python)
    try:
        return eng.generate(PROMPTS, _greedy())
    finally:
        eng.close()


@pytest.mark.parametrize("method, transport_attr, expected", [("tensor", "device", "cuda"),
                                                              ("distributed", "backend", "nccl")])
def test_gpu_sync_matches_a_server_started_from_disk(method, transport_attr, expected, tiny_cfg, model_dirs,
                                                      reference_b, tmp_path, server_python):
    """'tensor' sends CUDA IPC handles of GPU tensors to a server on this GPU; 'distributed' broadcasts over an
    NCCL group, whose ranks must be on different GPUs: its server goes on GPU 1 (this process holds GPU 0)."""
    gpu_ids = None
    if method == "distributed":
        if torch.cuda.device_count() < 2:
            # The prefix is conftest.OPTIONAL_SKIP: a machine with one GPU is allowed under ENTCOV_GPU_REQUIRE.
            pytest.skip("[optional dependency missing] a second GPU: the 'distributed' (NCCL) sync's server needs "
                        "a GPU of its own, NCCL refuses two ranks of one group on a GPU (\"Duplicate GPU "
                        "detected\"); this machine has one")
        torch.cuda.set_device(0)
        gpu_ids = [1]
    eng = _engine(tiny_cfg, model_dirs["a"], tmp_path, server_python, gpu_ids=gpu_ids, sync_method=method)
    try:
        eng.update_weights(_cuda_buckets(model_dirs["b"]), version=1)
        assert getattr(eng._transport, transport_attr) == expected
        out = eng.generate(PROMPTS, _greedy())
        assert all(s.weight_version == 1 for s in out)
        _assert_same(out, reference_b)
        sync = eng.last_sync
        print(f"\n[gpu] {method} sync: {sync['bytes'] / 1e6:.2f} MB in {sync['seconds']:.3f} s")
    finally:
        eng.close()


def test_release_and_resume_memory_gives_the_gpu_back(tiny_cfg, model_dirs, reference_b, tmp_path, server_python):
    eng = _engine(tiny_cfg, model_dirs["a"], tmp_path, server_python, sync_method="tensor", release_memory=True)
    try:
        free_before, total = torch.cuda.mem_get_info()
        eng.release_memory()
        free_released, _ = torch.cuda.mem_get_info()
        # The KV cache alone is most of the 15% static share.
        assert free_released - free_before > 0.05 * total, (free_before, free_released, total)
        with pytest.raises(RuntimeError, match="GPU memory is released"):
            eng.generate(PROMPTS, _greedy())
        with pytest.raises(RuntimeError, match="weights memory is released"):
            eng.update_weights(_cuda_buckets(model_dirs["b"]), version=1)
        eng.resume_memory(["weights"])                  # what the trainer does around a sync
        eng.update_weights(_cuda_buckets(model_dirs["b"]), version=1)
        eng.resume_memory()
        assert eng.health()["released"] == []
        free_resumed, _ = torch.cuda.mem_get_info()
        assert free_resumed < free_released - 0.05 * total
        _assert_same(eng.generate(PROMPTS, _greedy()), reference_b)
        print(f"\n[gpu] release_memory gave back {(free_released - free_before) / 2**30:.1f} GiB")
    finally:
        eng.close()


def test_colocated_rl_steps_release_memory_and_sync_by_cuda_ipc(tmp_path, server_python):
    """The colocated recipe on one GPU: servers on the training GPU, memory released while training, weights
    pushed as CUDA IPC tensors, the post-sync probe and the rollout/trainer log-prob gap both tight. (The trainer
    finds the same GPU venv itself; ``server_python`` only makes sure it exists.)"""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, [
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=32", "model.make_vocab_size_divisible_by=8",
        "model.max_position_embeddings=64", "model.add_qkv_bias=true", "parallel.backend=nccl",
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "optim.num_mini_batches=2", "optim.lr=1e-2",
        "loss.name=clip_cov", "loss.entropy_coef=0.01", "rollout.engine=sglang", "rollout.sglang.server_device=cuda",
        "rollout.sglang.release_memory=true", "rollout.sglang.sync_method=tensor",
        "rollout.sglang.server_args=[--attention-backend, torch_native, --sampling-backend, pytorch, "
        "--disable-cuda-graph, --mem-fraction-static, '0.15']", "steps=2", f"output_dir={tmp_path}",
        "name=colocated"]).resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    try:
        metrics = [trainer.train_step() for _ in range(2)]
        for m in metrics:
            assert m["rollout/logprob_gap"] < 1e-3 and m["sync/probe_gap"] < cfg.weight_sync.verify_tol, m
        assert trainer.engine.health()["weight_version"] == trainer.weight_version == 2
    finally:
        trainer.close()
        destroy_parallel()
