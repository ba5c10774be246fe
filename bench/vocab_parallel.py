"""Benchmark of ops.vocab_parallel.logprobs_and_entropy against the naive torch formulation and a memcpy.

Run:
    python bench/vocab_parallel.py                      # default shapes, fp32 + bf16, table on stdout
    python bench/vocab_parallel.py --json out.json      # also write every measurement as JSON
    python bench/vocab_parallel.py --shapes 512x152064 --dtypes float32 --reps 3

What is measured, per (rows x vocab, dtype), on the same logits and upstream gradients:
- memcpy: `dst.copy_(logits)` into a preallocated tensor: the bandwidth floor of touching the logits once.
- naive: `log_softmax(z.float())`, gather, `-(softmax * log_softmax).sum(-1)`, then autograd backward of
  `sum(g_lp * logp + g_H * H)` (what RL code commonly writes, with the usual upcast to fp32).
- ours: `logprobs_and_entropy` forward + backward of the same objective, eager and torch.compile'd chunk
  kernels, with a new gradient tensor and with `inplace_backward=True` (gradient written into the logits).
Times are the median of --reps runs after --warmup runs (compilation happens in the first call, reported
separately); ratios use medians. Reps go round robin over the variants, so load from other processes on a
shared machine hits every variant alike; the minimum (least disturbed run) and the load average are
recorded too. The in-place variant gets a fresh copy of the logits before every run, outside the timer.

Peak extra memory is the kernel's resident-set high-water mark, not a sample: before a run we release free
heap (malloc_trim), reset the high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and read
VmRSS; after it we read VmHWM from /proc/self/status. Peak extra = VmHWM - VmRSS(before), with the logits,
labels and upstream gradients already resident. It counts every byte the process touched, including the
returned gradient (1x the logits when not in place) and allocator slack, so it is an upper bound on the op's
own working set. Memory runs are separate from timed runs. Linux only.

This is a measurement script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_entcov.ops.vocab_parallel import default_chunk_size, logprobs_and_entropy  # noqa: E402

TARGETS = {"ours_over_memcpy_max": 8.0, "naive_over_ours_min": 10.0, "peak_extra_inplace_max": 0.1}


# --------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _libc_malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed heap may stay resident, which only lowers the measured peak
        pass


def peak_extra_bytes(fn) -> int:
    """Resident-set high-water mark of fn() above the resident set just before it (bytes)."""
    gc.collect()
    _libc_malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024


# --------------------------------------------------------------------------------------------- workloads


def naive_fwd_bwd(logits, labels, g_lp, g_h):
    z = logits.detach().requires_grad_()
    logp_all = torch.log_softmax(z.float(), dim=-1)
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(torch.softmax(z.float(), dim=-1) * logp_all).sum(-1)
    (grad,) = torch.autograd.grad((logp * g_lp).sum() + (entropy * g_h).sum(), z)
    return grad


def ours_fwd_bwd(logits, labels, g_lp, g_h, *, inplace, use_compile, chunk_size):
    z = logits.detach().requires_grad_()
    logp, entropy = logprobs_and_entropy(
        z, labels, chunk_size=chunk_size, inplace_backward=inplace, use_compile=use_compile
    )
    (grad,) = torch.autograd.grad((logp * g_lp).sum() + (entropy * g_h).sum(), z)
    return grad


def _timed(fn, setup=None) -> float:
    if setup is not None:
        setup()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def bench_case(rows, vocab, dtype, *, reps, warmup, chunk_size, compile_modes):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    g_lp = torch.randn(rows, generator=gen)
    g_h = torch.randn(rows, generator=gen)
    work = torch.empty_like(logits)  # the in-place variant overwrites this copy, never `logits`
    work.copy_(logits)
    dst = torch.empty_like(logits)
    nbytes = logits.numel() * logits.element_size()

    # name -> (fn, setup, extra fields)
    variants = {
        "memcpy": (lambda: dst.copy_(logits), None, {}),
        "naive": (lambda: naive_fwd_bwd(logits, labels, g_lp, g_h), None, {}),
    }
    for use_compile in compile_modes:
        tag = "compiled" if use_compile else "eager"
        extra = {"chunk_rows": min(rows, chunk_size or default_chunk_size(vocab, use_compile))}
        variants[f"ours_{tag}"] = (
            lambda c=use_compile: ours_fwd_bwd(logits, labels, g_lp, g_h, inplace=False, use_compile=c,
                                               chunk_size=chunk_size),
            None, extra)
        variants[f"ours_{tag}_inplace"] = (
            lambda c=use_compile: ours_fwd_bwd(work, labels, g_lp, g_h, inplace=True, use_compile=c,
                                               chunk_size=chunk_size),
            lambda: work.copy_(logits), extra)

    first = {name: _timed(fn, setup) for name, (fn, setup, _) in variants.items()}  # compiles
    for _ in range(max(0, warmup - 1)):
        for fn, setup, _ in variants.values():
            _timed(fn, setup)
    # Round robin: every rep times each variant once, so a burst of load from other processes on a
    # shared machine hits all variants alike instead of one variant's whole series.
    times = {name: [] for name in variants}
    loads = []
    for _ in range(reps):
        for name, (fn, setup, _) in variants.items():
            times[name].append(_timed(fn, setup))
        loads.append(os.getloadavg()[0])

    results = []
    for name, (fn, setup, extra) in variants.items():
        if setup is not None:
            setup()
        peak = peak_extra_bytes(fn)
        med = statistics.median(times[name])
        results.append(
            {"variant": name, "median_s": med, "min_s": min(times[name]), "times_s": times[name],
             "first_call_s": first[name], "peak_extra_bytes": peak, "peak_extra_x_logits": peak / nbytes,
             **extra}
        )
        print(f"  {name:<24} median {med * 1e3:8.1f} ms   min {min(times[name]) * 1e3:8.1f} ms   "
              f"first {first[name]:6.2f} s   peak extra {peak / nbytes:6.3f}x", flush=True)
    print(f"  load average (1 min) during the timed reps: {min(loads):.2f}..{max(loads):.2f}", flush=True)
    base = {r["variant"]: r["median_s"] for r in results}
    for r in results:
        r["over_memcpy"] = r["median_s"] / base["memcpy"]
        r["naive_over"] = base["naive"] / r["median_s"]
    return {"rows": rows, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "logits_bytes": nbytes,
            "loadavg_during_reps": loads, "results": results}


def format_table(cases) -> str:
    lines = [
        "| logits | variant | chunk rows | fwd+bwd ms (median) | min ms | / memcpy | naive / this "
        "| peak extra (x logits) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        shape = f"{case['rows']}x{case['vocab']} {case['dtype']} ({case['logits_bytes'] / 2**20:.0f} MiB)"
        for r in case["results"]:
            name = r["variant"] if r["variant"] != "memcpy" else "memcpy (copy_ only)"
            lines.append(
                f"| {shape} | {name} | {r.get('chunk_rows', '')} | {r['median_s'] * 1e3:.1f} | "
                f"{r['min_s'] * 1e3:.1f} | "
                f"{r['over_memcpy']:.2f} | {r['naive_over']:.1f} | {r['peak_extra_x_logits']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x32768,1024x152064", help="comma-separated ROWSxVOCAB")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the op's)")
    parser.add_argument("--compile", choices=["both", "eager", "compiled"], default="both")
    parser.add_argument("--json", type=Path, default=None, help="write all measurements to this file")
    args = parser.parse_args(argv)

    compile_modes = {"both": [False, True], "eager": [False], "compiled": [True]}[args.compile]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "machine": platform.processor() or platform.machine(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpus']} cpus, {env['platform']}, "
          f"load {env['loadavg_start'][0]:.2f} (other processes on the machine skew timings)")
    cases = []
    for shape in args.shapes.split(","):
        rows, vocab = (int(v) for v in shape.lower().split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            print(f"{rows}x{vocab} {dtype_name}:", flush=True)
            cases.append(bench_case(rows, vocab, dtype, reps=args.reps, warmup=args.warmup,
                                    chunk_size=args.chunk_size, compile_modes=compile_modes))
    print()
    print(format_table(cases))
    print(f"\ntargets: ours/memcpy <= {TARGETS['ours_over_memcpy_max']}, naive/ours >= "
          f"{TARGETS['naive_over_ours_min']}, peak extra <= {TARGETS['peak_extra_inplace_max']}x logits (in place)")
    env["loadavg_end"] = os.getloadavg()
    if args.json is not None:
        args.json.write_text(json.dumps({"env": env, "targets": TARGETS, "cases": cases}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
