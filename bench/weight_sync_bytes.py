"""Bytes each rank moves and holds in one weight sync, before and after gathering to the generating rank only.

Run:
    python bench/weight_sync_bytes.py                   # tp2 x pp2 on 4 gloo processes, ~70 s on 2 busy cores
    python bench/weight_sync_bytes.py --json out.json   # also write every figure as JSON
    python bench/weight_sync_bytes.py --tp 2 --pp 2 --layers 8 --hidden 256 --bucket-mb 4

Both algorithms are the real code (weights/shards.py ``iter_hf_weights``) on the same model, one after the other
in the same processes:
- before: ``dst="all"``, what ``WeightSync.push`` ran until it gathered to the generating rank: tp shards
  all-gathered on every tp rank, then each pipeline stage broadcasting its full tensors over its pp group, so
  every rank of the replica assembles every full tensor (the iterator is kept for callers that need that).
- after: ``dst="generator"``, what ``WeightSync.push`` runs now: tp shards gathered to each stage's tp rank 0,
  later stages' tp rank 0 sending each full tensor point to point to the generating rank (tp 0 of stage 0).
Every rank drains the iterator as ``WeightSync.push`` does (a loop over the buckets; the generating rank keeps
each bucket until the next one arrives, as an engine would).

What is counted, per rank, at the calls shards.py makes into megatron_entcov.distributed.collectives (the wrappers below):
- received: bytes other ranks' data put into this rank's buffers. all_gather over n ranks: (n-1) shards;
  gather: the root (n-1) shards, the others none; broadcast: the non-source ranks one tensor; recv: one tensor.
- sent: bytes of this rank's data that land on other ranks: all_gather (n-1) x its shard (whatever the
  algorithm, each peer ends up with a copy); gather: a non-root its shard; broadcast: the source (n-1) x the
  tensor; send: one tensor. These are logical payload bytes; what gloo or NCCL puts on the wire for a
  collective depends on its algorithm (a ring all-gather also forwards others' shards).
- metadata: pickled bytes of the object collectives (per-stage tensor lists), plus the 8-byte length torch
  sends with each object; counted as sent/received in the same way, reported apart.
- full tensors yielded: bytes of the full Hugging Face tensors the iterator hands this rank's caller.
- peak held: the high-water mark of bytes in tensor storages created during the sync and still alive (receive
  buffers, gathered and full tensors, buckets), tracked by a TorchDispatchMode over every torch op with a
  finaliser per storage; the parameters' own storages (and views of them) are not counted. Allocator slack
  and gloo's internal buffers are not in it.

Model: a Qwen2-shaped GPTModel (local spec, float32, untied output layer, QKV bias) built by the project's own
``build_model``, with random weights. Measured figures are in the README (weight sync section).
This is a measurement script, not a test (tests/distributed/test_weight_sync_gather.py checks the counts).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TENSOR_CALLS = ("gather", "all_gather", "broadcast", "send", "recv")
OBJECT_CALLS = ("broadcast_object_list", "gather_object")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _object_bytes(obj) -> int:
    return len(pickle.dumps(obj)) + 8


class Counter:
    """Wraps megatron_entcov.distributed.collectives' functions for the duration of a ``with`` block."""

    def __init__(self):
        self.recv = self.sent = self.meta_recv = self.meta_sent = 0

    def __enter__(self):
        from megatron_entcov.distributed import collectives

        self._originals = {name: getattr(collectives, name) for name in TENSOR_CALLS + OBJECT_CALLS}
        for name, fn in self._originals.items():
            setattr(collectives, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        from megatron_entcov.distributed import collectives

        for name, fn in self._originals.items():
            setattr(collectives, name, fn)
        return False

    def _wrap(self, name, fn):
        import torch.distributed as dist

        def counted(*args, **kw):
            group = kw.get("group")
            n, me = dist.get_world_size(group), dist.get_rank()
            out = fn(*args, **kw)
            if name == "gather":
                if kw["dst"] == me:
                    self.recv += (n - 1) * _nbytes(args[0])
                else:
                    self.sent += _nbytes(args[0])
            elif name == "all_gather":
                self.recv += (n - 1) * _nbytes(args[1])
                self.sent += (n - 1) * _nbytes(args[1])
            elif name == "broadcast":
                if kw["src"] == me:
                    self.sent += (n - 1) * _nbytes(args[0])
                else:
                    self.recv += _nbytes(args[0])
            elif name == "send":
                self.sent += _nbytes(args[0])
            elif name == "recv":
                self.recv += _nbytes(args[0])
            elif name == "broadcast_object_list":
                size = sum(_object_bytes(o) for o in args[0])       # filled on every rank after the call
                if kw["src"] == me:
                    self.meta_sent += (n - 1) * size
                else:
                    self.meta_recv += size
            elif name == "gather_object":
                obj, objs = args[0], args[1]
                if kw["dst"] == me:
                    self.meta_recv += sum(_object_bytes(o) for o in objs) - _object_bytes(obj)
                else:
                    self.meta_sent += _object_bytes(obj)
            return out

        return counted


def _live_storage_tracker(ignore_ptrs: set[int]):
    """A TorchDispatchMode recording the high-water mark of live bytes in storages created under it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def _free(self, ptr: int, n: int) -> None:
            self.live -= n
            self.seen.discard(ptr)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr == 0 or ptr in ignore_ptrs or ptr in self.seen:
                    continue
                self.seen.add(ptr)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, ptr, storage.nbytes())
            return out

    return Tracker()


def _one_sync(chunks, model_cfg, ps, dst: str, bucket_bytes: int) -> dict:
    from megatron_entcov.weights.shards import iter_hf_weights

    params = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    yielded = tensors = largest_bucket = 0
    with Counter() as counter, _live_storage_tracker(params) as tracker:
        for bucket in iter_hf_weights(chunks, model_cfg, ps, bucket_bytes=bucket_bytes, dst=dst):
            size = sum(_nbytes(t) for _, t in bucket)
            yielded += size
            tensors += len(bucket)
            largest_bucket = max(largest_bucket, size)
    return {"recv": counter.recv, "sent": counter.sent, "meta_recv": counter.meta_recv,
            "meta_sent": counter.meta_sent, "yielded": yielded, "tensors": tensors,
            "largest_bucket": largest_bucket, "peak_held": tracker.peak}


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megatron_entcov.config import ModelConfig, ParallelConfig
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.policy.model import build_model

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              backend="gloo")
    ps = init_parallel(parallel, seed=0)
    try:
        model_cfg = _model_cfg(args, ModelConfig)
        chunks = build_model(model_cfg, parallel, ps)
        bucket_bytes = int(args.bucket_mb * 2**20)
        result = {"rank": rank, "tp_rank": ps.tp_rank, "pp_rank": ps.pp_rank, "is_generator": ps.is_generator,
                  "params": sum(_nbytes(p) for c in chunks for p in c.parameters())}
        for dst, label in (("all", "before"), ("generator", "after")):
            result[label] = _one_sync(chunks, model_cfg, ps, dst, bucket_bytes)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        destroy_parallel()


def _model_cfg(args, model_config_cls):
    return model_config_cls(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                            num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                            make_vocab_size_divisible_by=128, max_position_embeddings=256, add_qkv_bias=True,
                            tie_word_embeddings=False, params_dtype="float32")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _table(results: list[dict], args) -> str:
    lines = [f"tp{args.tp} x pp{args.pp}, {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab "
             f"{args.vocab}, float32, untied; full model {_mib(results[0]['model_bytes'])} MiB; bucket "
             f"{args.bucket_mb:g} MiB. MiB per rank, before -> after:", "",
             "| rank (tp, pp) | role | received | sent | metadata recv/sent (KiB) | full tensors yielded | "
             "peak held |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        b, a = r["before"], r["after"]
        role = "generator" if r["is_generator"] else ("stage tp0 (relay)" if r["tp_rank"] == 0 else "tp > 0")
        lines.append(
            f"| {r['rank']} ({r['tp_rank']}, {r['pp_rank']}) | {role} | {_mib(b['recv'])} -> {_mib(a['recv'])} | "
            f"{_mib(b['sent'])} -> {_mib(a['sent'])} | {b['meta_recv'] / 1024:.1f}/{b['meta_sent'] / 1024:.1f} -> "
            f"{a['meta_recv'] / 1024:.1f}/{a['meta_sent'] / 1024:.1f} | {_mib(b['yielded'])} -> {_mib(a['yielded'])} | "
            f"{_mib(b['peak_held'])} -> {_mib(a['peak_held'])} |")
    total = {k: sum(r[k]["recv"] for r in results) for k in ("before", "after")}
    lines += ["", f"received over all ranks: {_mib(total['before'])} -> {_mib(total['after'])} MiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = p.parse_args(argv)

    import torch.multiprocessing as mp

    world = args.tp * args.pp
    with tempfile.TemporaryDirectory(prefix="weight-sync-bytes-") as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), args, out_dir), nprocs=world, join=True,
                           start_method="spawn")
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    # The full model: what the generating rank receives as HF tensors (the same for both algorithms).
    model_bytes = next(r for r in results if r["is_generator"])["after"]["yielded"]
    for r in results:
        r["model_bytes"] = model_bytes
    print(_table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "ranks": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
