"""Activation memory per rank of one long sample through one transformer layer at context parallel 1, 2 and 4.

Run:
    python bench/cp_memory.py                          # s = 4096 tokens, cp 1/2/4 (gloo processes), ~1 min
    python bench/cp_memory.py --seq-len 8192 --cps 1 2 --out cp_memory.json

What is measured: the bytes autograd saves for the backward during the forward of one Megatron
``TransformerLayer`` (local spec: RMSNorm, fused QKV, ContextParallelDotProductAttention, output projection,
SwiGLU MLP; float32, no dropout, no RoPE) on one sample of ``--seq-len`` tokens, through
``torch.autograd.graph.saved_tensors_hooks``, on every rank of a context-parallel group of each size (the
sample split as Megatron splits it, policy/cp_layout.py). Each storage counts once; the parameters (weights the
linear layers save) are not activations and are left out. The bytes saved while the core attention runs are
reported apart: its scores and softmax ([heads, s/cp, s]) shrink with cp, the gathered K and V ([s, groups,
dim], repeated to the heads for GQA as Megatron's local attention does) do not. At cp1 the module is
PackedDotProductAttention unchanged (a group of one rank).

The figure is a ratio of bytes per rank (cp / cp1), not a time: this is a measurement script, not a test
(tests/distributed/test_cp_attention_ranks.py checks the attention's values).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SavedBytes:
    """Bytes of the distinct storages autograd saves, minus the parameters', split by whether the core attention
    was running (``region`` is set by forward hooks on it)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.seen: set[int] = set()
        self.bytes = {"core_attention": 0, "rest": 0}
        self.region = "rest"

    def pack(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.region] += storage.nbytes()
        return t

    def watch(self, module) -> None:
        module.register_forward_pre_hook(lambda *_: setattr(self, "region", "core_attention"))
        module.register_forward_hook(lambda *_: setattr(self, "region", "rest"))


def _layer(args, cp: int):
    """One local-spec transformer layer with the context-parallel core attention."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_entcov.policy.cp_attention import ContextParallelDotProductAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        num_query_groups=args.groups, context_parallel_size=cp, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0,
        masked_softmax_fusion=False, bias_dropout_fusion=False, bias_activation_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return build_module(spec, config=config, layer_number=1)


def _measure(args, cp: int, cp_rank: int) -> dict:
    import torch

    from megatron_entcov.policy.cp_layout import cp_shard_index

    layer = _layer(args, cp)
    hidden = torch.randn(args.seq_len, 1, args.hidden, generator=torch.Generator().manual_seed(0))
    local = hidden[cp_shard_index([args.seq_len], cp, cp_rank)].requires_grad_()
    counter = SavedBytes({p.untyped_storage().data_ptr() for p in layer.parameters()})
    counter.watch(layer.self_attention.core_attention)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        out = layer(local, attention_mask=None)[0]
    out.float().pow(2).mean().backward()          # the saved graph is complete and differentiable
    return {"cp_rank": cp_rank, "local_tokens": local.shape[0], "saved_bytes": sum(counter.bytes.values()),
            "core_attention_bytes": counter.bytes["core_attention"], "rest_bytes": counter.bytes["rest"]}


def _worker(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from megatron_entcov.compat import cpu as cpu_compat

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cpu_compat.apply()
        mpu.initialize_model_parallel(context_parallel_size=world)
        cpu_compat.model_parallel_manual_seed(0, tp_rank=0)
        result = _measure(args, world, mpu.get_context_parallel_rank())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    """Every cp size of ``args.cps`` on that many gloo processes; per-rank figures and the ratios to cp1."""
    import torch.multiprocessing as mp

    by_cp = {}
    for cp in args.cps:
        with tempfile.TemporaryDirectory(prefix="cp-memory-") as out_dir:
            mp.start_processes(_worker, args=(cp, _free_port(), args, out_dir), nprocs=cp, join=True,
                               start_method="spawn")
            ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(cp)]
        by_cp[cp] = {"ranks": ranks, "max_saved_bytes": max(r["saved_bytes"] for r in ranks),
                     "max_core_attention_bytes": max(r["core_attention_bytes"] for r in ranks)}
    base = by_cp.get(1)
    ratios = {} if base is None else {
        f"cp{cp}/cp1": {"saved": v["max_saved_bytes"] / base["max_saved_bytes"],
                        "core_attention": v["max_core_attention_bytes"] / base["max_core_attention_bytes"]}
        for cp, v in by_cp.items() if cp != 1}
    return {"args": {k: v for k, v in vars(args).items() if k != "out"}, "cp": by_cp, "ratios": ratios}


def _table(result: dict) -> str:
    lines = ["| cp | tokens per rank | saved per rank, max (MiB) | core attention (MiB) | rest (MiB) | ratio to cp1 |",
             "|---|---|---|---|---|---|"]
    for cp, v in result["cp"].items():
        worst = max(v["ranks"], key=lambda r: r["saved_bytes"])
        ratio = result["ratios"].get(f"cp{cp}/cp1", {}).get("saved", 1.0 if cp == 1 else float("nan"))
        lines.append(f"| {cp} | {worst['local_tokens']} | {worst['saved_bytes'] / 2**20:.1f} | "
                     f"{worst['core_attention_bytes'] / 2**20:.1f} | {worst['rest_bytes'] / 2**20:.1f} | "
                     f"{ratio:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=352)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", type=Path, default=None, help="also write every figure here as JSON")
    args = p.parse_args(argv)
    if any(args.seq_len % (2 * cp) for cp in args.cps):
        p.error(f"--seq-len {args.seq_len} must be a multiple of 2 * cp for every cp of --cps {args.cps}")
    result = run(args)
    print(_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
