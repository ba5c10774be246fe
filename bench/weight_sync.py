"""Weight sync against its floor: each SGLang transport timed beside a memcpy (a write + read for 'disk') of the
same bytes, in the same run, on real CPU SGLang servers.

Run:
    .venv/bin/python bench/weight_sync.py                            # 0.2B float32 model, 1 and 2 servers
    .venv/bin/python bench/weight_sync.py --servers 1 --bucket-mb 64,256 --repeats 5 --out sync.json
    .venv/bin/python bench/weight_sync.py --hidden 2048 --layers 16 --vocab 32000   # ~1B parameters

What is timed: ``SGLangEngine.update_weights`` (the whole sync the trainer runs: pause, begin, the transport,
end, version, flush, continue, the version check) fed buckets of Hugging Face-named tensors the way
``weights/sync.py`` feeds it (a generator over the trainer's float32 tensors, ``--bucket-mb`` per bucket), after
one untimed warm-up sync per transport (it forms the 'distributed' group). Each figure is the median of
``--repeats`` syncs, with the spread (min-max).

The floor, measured in the same process before the syncs: the bytes every server must end up holding
(``bytes`` = model bytes x servers) moved once by a single-threaded memcpy (numpy ``copyto`` into a buffer
already touched), and for 'disk' one write of the model's bytes into the sync directory (the page cache) plus one
read per server. ``ratio_to_floor`` = the sync's seconds / the floor's seconds.

Servers: launched from the server venv (``make sglang-env``) with the bench's random model; the transports
reach them by URL (one engine per transport). ``--out FILE`` writes ``{"machine", "bytes", "transports":
{"tensor" | "distributed" | "disk": {"seconds", "gbps", "ratio_to_floor", ...}}, "floor", "runs"}``:
``transports`` is the first server count and bucket size given; ``runs`` every combination.
This is a measurement script, not a test; the README's weight-sync table quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRANSPORTS = ("tensor", "distributed", "disk")


def _model_cfg(args):
    from megatron_entcov.config import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 11 // 4,
                       num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                       max_position_embeddings=512, add_qkv_bias=True, tie_word_embeddings=False,
                       params_dtype=args.dtype)


def hf_buckets(state_dict: dict, bucket_bytes: int):
    """The trainer's tensors as ``iter_hf_weights`` yields them: lists of (name, tensor) of at most
    ``bucket_bytes`` (a larger tensor alone), lazily."""
    bucket, size = [], 0
    for name, t in state_dict.items():
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def memcpy_seconds(nbytes: int, repeats: int) -> list[float]:
    """Seconds of a single-threaded memcpy of ``nbytes`` between buffers already touched, ``repeats`` times."""
    import numpy as np

    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    np.copyto(dst, src)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out.append(time.perf_counter() - t0)
    return out


def write_read_seconds(nbytes: int, readers: int, directory: str | None, repeats: int) -> list[float]:
    """Seconds to write ``nbytes`` into a new file in ``directory`` (the page cache) and read it back
    ``readers`` times into a buffer, ``repeats`` times: the disk transport's floor."""
    import numpy as np

    data, back = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    out = []
    for _ in range(repeats):
        fd, path = tempfile.mkstemp(dir=directory, prefix="weight-sync-floor-")
        try:
            t0 = time.perf_counter()
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data))
            for _ in range(readers):
                with open(path, "rb") as f:
                    f.readinto(memoryview(back))
            out.append(time.perf_counter() - t0)
        finally:
            os.unlink(path)
    return out


def machine() -> dict:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "torch": torch.__version__,
            "load_avg": os.getloadavg()}


def time_transport(method: str, urls: list[str], model_cfg, state_dict: dict, bucket_bytes: int,
                   repeats: int, sync_dir: str | None) -> dict:
    """Seconds of ``repeats`` syncs by ``method`` to the servers at ``urls``, after one warm-up."""
    from megatron_entcov.config import SGLangConfig
    from megatron_entcov.rollout.sglang import SGLangEngine

    eng = SGLangEngine(model_cfg, SGLangConfig(server_device="cpu", server_urls=urls, sync_method=method),
                       sync_dir=sync_dir)
    seconds, stats = [], {}
    try:
        for rep in range(repeats + 1):
            version = eng.weight_version + 1
            t0 = time.perf_counter()
            eng.update_weights(hf_buckets(state_dict, bucket_bytes), version=version)
            dt = time.perf_counter() - t0
            if rep:
                seconds.append(dt)
            stats = eng.last_sync
    finally:
        eng.close()
    return {"seconds_all": seconds, "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}}


def run_servers(n: int, args, model_cfg, model_dir: Path, state_dict: dict, nbytes: int, floors: dict) -> list:
    """Launch ``n`` servers, time every transport and bucket size against them."""
    from megatron_entcov.config import SGLangConfig
    from megatron_entcov.rollout.sglang import SGLangEngine

    runs = []
    owner = SGLangEngine(model_cfg, SGLangConfig(server_device="cpu", num_servers=n, sync_method="disk"),
                         model_dir=model_dir)
    try:
        urls = [s.url for s in owner.servers]
        for bucket_mb in args.bucket_mb:
            for method in args.transports:
                res = time_transport(method, urls, model_cfg, state_dict, int(bucket_mb * 2**20), args.repeats,
                                     args.sync_dir)
                runs.append(_summarise(method, n, bucket_mb, res, nbytes * n, floors[n]))
                print(_line(runs[-1]), flush=True)
    finally:
        owner.close()
    return runs


def _summarise(method: str, servers: int, bucket_mb: float, res: dict, delivered: int, floor: dict) -> dict:
    med, lo, hi = _median_spread(res["seconds_all"])
    base = floor["write_read_s"] if method == "disk" else floor["memcpy_s"]
    return {"transport": method, "servers": servers, "bucket_mb": bucket_mb, "bytes": delivered,
            "seconds": med, "seconds_min": lo, "seconds_max": hi, "seconds_all": res["seconds_all"],
            "gbps": delivered / med / 1e9, "floor_s": base, "ratio_to_floor": med / base,
            "ratio_spread": [lo / base, hi / base], "stats": res["stats"]}


def _line(r: dict) -> str:
    return (f"{r['transport']:<11} servers={r['servers']} bucket={r['bucket_mb']:g} MiB: {r['seconds']:.3f} s "
            f"(min {r['seconds_min']:.3f}, max {r['seconds_max']:.3f}) = {r['gbps']:.2f} GB/s delivered; "
            f"floor {r['floor_s']:.3f} s; ratio {r['ratio_to_floor']:.2f} "
            f"({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f})")


def measure_floors(nbytes: int, servers: list[int], args) -> dict:
    out = {}
    for n in servers:
        mc = _median_spread(memcpy_seconds(nbytes * n, max(args.repeats, 5)))
        wr = _median_spread(write_read_seconds(nbytes, n, args.sync_dir, max(args.repeats, 3)))
        out[n] = {"memcpy_s": mc[0], "memcpy_spread": mc[1:], "write_read_s": wr[0], "write_read_spread": wr[1:]}
        print(f"floor, {n} server(s): memcpy of {nbytes * n / 1e6:.0f} MB {mc[0]:.3f} s ({mc[1]:.3f}-{mc[2]:.3f}) = "
              f"{nbytes * n / mc[0] / 1e9:.1f} GB/s; write + {n} read(s) of {nbytes / 1e6:.0f} MB {wr[0]:.3f} s "
              f"({wr[1]:.3f}-{wr[2]:.3f})", flush=True)
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--servers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--bucket-mb", type=_floats, default=[256.0, 64.0])
    p.add_argument("--transports", type=lambda s: s.split(","), default=list(TRANSPORTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sync-dir", default=None, help="where 'disk' writes (default: the system temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    bad = [t for t in args.transports if t not in TRANSPORTS]
    if bad:
        p.error(f"--transports: {bad} unknown; choose from {', '.join(TRANSPORTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model_cfg = _model_cfg(args)
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        model_dir = write_hf_model_dir(model_cfg, Path(tmp) / "model")
        from safetensors.torch import load_file

        state_dict = load_file(str(model_dir / "model.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
        print(f"model: {sum(t.numel() for t in state_dict.values()) / 1e6:.0f}M parameters, {nbytes / 1e6:.0f} MB "
              f"{args.dtype}; machine {machine()}", flush=True)
        floors = measure_floors(nbytes, args.servers, args)
        runs = []
        for n in args.servers:
            runs += run_servers(n, args, model_cfg, model_dir, state_dict, nbytes, floors)
    report = {"machine": machine(), "bytes": nbytes, "model": vars(args) | {"out": str(args.out)},
              "transports": {r["transport"]: r for r in runs
                             if r["servers"] == args.servers[0] and r["bucket_mb"] == args.bucket_mb[0]},
              "floor": {str(n): f for n, f in floors.items()}, "runs": runs}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
