"""Run a function on N local ranks (spawned processes) with a hard time-out; the tiny models and steps
the tests share (``TINY_MODEL``, ``TINY_STEP``, ``tiny_model``, ``set_args``).

Each worker gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment and an initialised process group:
gloo by default (CPU tests, also on a GPU machine); ``backend="auto"`` (GPU tests) gives nccl when CUDA is
available, gloo without, chosen in the parent. The group decides the device: init_parallel keeps it, so a GPU
test on gloo would build its model on the CPU. The parent collects each rank's return value or traceback,
terminates every rank on the first failure or on time-out (a failed rank must not hang the suite), and raises
with the failing rank's traceback.

Example:
    results = run_workers(_worker, world_size=2, args=(tmp_path,))   # _worker(rank, world_size, tmp_path)
    results = run_workers(_gpu_worker, 1, backend="auto")            # a GPU test: nccl on the GPU machine
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

TINY_MODEL_FIELDS = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                         vocab_size=32, make_vocab_size_divisible_by=8, max_position_embeddings=64)
"""ModelConfig fields of the tiny 2-layer policy the distributed and SLURM tests train."""
TRANSPORT_MODEL_FIELDS = dict(TINY_MODEL_FIELDS, num_layers=1, hidden_size=16, ffn_hidden_size=32,
                              num_attention_heads=2, num_query_groups=1, vocab_size=24)
"""... and of the smaller 1-layer model whose weights the SGLang transport unit tests sync (16 wide)."""


def tiny_model(**changes) -> list[str]:
    """``--set`` overrides of the tiny policy with ``changes`` to its fields (or more fields) written out:
    ``tiny_model(num_layers=4)`` is TINY_MODEL with ``model.num_layers=4`` in place of ``model.num_layers=2``."""
    fields = {**TINY_MODEL_FIELDS, **changes}
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items()]


TINY_MODEL = tiny_model()
"""Config overrides of the tiny 2-layer policy (``model.num_layers=2``, ...)."""
TINY_STEP = ["rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
             "sampling.max_new_tokens=6", "optim.micro_batch_size=2"]
"""... and of its small step: 4 prompts x 2 samples of at most 6 tokens, micro-batches of 2."""


def set_args(*overrides: str) -> list[str]:
    """The command-line form of config overrides: ``set_args("a=1", "b=2") == ["--set", "a=1", "--set", "b=2"]``."""
    return [x for kv in overrides for x in ("--set", kv)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKENDS = ("gloo", "nccl", "auto")


def worker_backend(requested: str = "gloo") -> str:
    """The process-group backend of the ranks: 'gloo' and 'nccl' as named, 'auto' -> nccl when this process sees
    CUDA, gloo without (as parallel.backend=auto decides it). ValueError for another name."""
    if requested not in BACKENDS:
        raise ValueError(f"run_workers(backend={requested!r}): expected one of {BACKENDS}")
    if requested != "auto":
        return requested
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_group(backend: str, rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RuntimeError(f"rank {rank}: run_workers chose backend 'nccl' but this process sees no CUDA "
                               "device; check CUDA_VISIBLE_DEVICES, or use backend='gloo'")
        torch.cuda.set_device(rank % count)
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def _entry(fn, rank, world_size, port, args, results, backend="gloo"):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        try:
            _init_group(backend, rank, world_size)
        except BaseException:  # noqa: BLE001 - the port may have been taken since free_port() looked
            text = traceback.format_exc()
            results.put((rank, "port_in_use" if "EADDRINUSE" in text else "error", text))
            return
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                from megatron_entcov.distributed.parallel import destroy_parallel

                destroy_parallel()
            except Exception:
                dist.destroy_process_group()


def _kill_tree(proc) -> None:
    """Terminate a rank and its own children (dist_checkpointing's Manager outlives a killed rank)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    proc.join(timeout=5)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_workers(fn, world_size: int, args: tuple = (), timeout: float = 240.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks in a process group of ``backend``
    (see :func:`worker_backend`; GPU tests pass "auto"); returns results by rank.

    free_port() cannot reserve its port: another process may take it before rank 0 listens. A group that fails
    to form for that reason (EADDRINUSE, before ``fn`` ran) is started again on a new port, up to 3 times."""
    chosen = worker_backend(backend)
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout, chosen)
        except _PortInUse:
            if attempt == 2:
                raise


class _PortInUse(RuntimeError):
    """Rank 0 could not listen on the port free_port() chose (taken in between); nothing of ``fn`` ran."""


def _run_once(fn, world_size: int, args: tuple, timeout: float, chosen: str) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Not daemonic: dist_checkpointing starts a multiprocessing Manager inside each rank.
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results, chosen))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed test timed out after {timeout:.0f} s; ranks done: {sorted(out)}")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died without a result (exit codes "
                                       f"{[procs[i].exitcode for i in dead]})")
                continue
            if status == "port_in_use":
                raise _PortInUse(f"rank {rank}: port {port} was taken before the group formed:\n{value}")
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                _kill_tree(p)
    return [out[r] for r in range(world_size)]


def read_safetensors(directory) -> dict:
    """Every tensor of the ``*.safetensors`` files of a Hugging Face directory, by name (sharded or not)."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_random_hf_model(model_overrides: list[str], directory, seed: int = 7) -> dict:
    """A Hugging Face checkpoint of ``model_overrides``' model with random weights (``torch.manual_seed(seed)``)
    and the character tokenizer, written to ``directory``; returns its weights as float32 tensors by name.
    ``save_pretrained`` writes the checkpoint's own names (per-expert ones for MoE: no process group here)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config import load_config
    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.tasks.tokenizer import build_char_tokenizer

    model_cfg = load_config(None, model_overrides).model
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(to_hf_config(model_cfg)).save_pretrained(directory)
    build_char_tokenizer(directory)
    return {k: v.float() for k, v in read_safetensors(directory).items()}
