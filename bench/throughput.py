"""The two throughput ratios of the trainer, each measured in one run on this machine (README "Throughput").

1. Packed sequences under a token budget vs padded rows: trainer tokens/s on one batch of long-tailed response
   lengths (lognormal, median 1/16 of the maximum, 2% at the maximum), the quickstart model's proportions scaled
   to 4 layers x 256 hidden; and the peak activation memory of each (bench/packing_throughput.py).
2. Overlapped rollouts vs the sequential step, on a config where rollout and training take about the same time:
   the overlapped step time over max(rollout, train) and over their sum (bench/overlap_throughput.py).

    .venv/bin/python bench/throughput.py [--engine sglang|local] [--grid] [--out results.json]

Cost model (how the figures scale; see the two modules for the derivations):
- packing: padded rows cost N * T_max slots (and N * T_max^2 attention), packed rows sum(l_i) tokens (and
  sum(l_i^2): attention stays inside a sample), so the speed-up is about T_max / mean(l) when the linear layers
  dominate, more when attention does, and independent of the batch size N up to the last, partly filled
  micro-batch (``--grid`` measures T_max 256/512/1024 and N 32/64/128);
- overlap: the sequential step costs rollout + train, the overlapped one max(rollout, train) + what the two share
  (cores, memory bandwidth, the trainer process's interpreter lock) + the weight sync, which cannot overlap; the
  gain is largest when rollout ~ train and each has its own cores (on GPUs: separate servers), and vanishes when
  one of them dominates or they compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overlap_throughput import measure_overlap  # noqa: E402
from packing_throughput import format_packing, measure_packing  # noqa: E402


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # a torch without CUDA support raises here on some builds
        gpu = "no GPU"
    return f"{platform.machine()}, {cores} cores, {gpu}, load average {os.getloadavg()[0]:.1f} at start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("sglang", "local"), default="sglang",
                    help="rollout engine of the overlap measurement (sglang needs make sglang-env)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats of the packing measurement")
    ap.add_argument("--steps", type=int, default=4, help="counted steps per mode of the overlap measurement")
    ap.add_argument("--grid", action="store_true", help="the packing ratio's scaling in T_max and N as well")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    results: dict = {"machine": machine()}
    print(f"machine: {results['machine']}", flush=True)
    configs = [(512, 64)] + ([(256, 64), (1024, 64), (512, 32), (512, 128)] if args.grid else [])
    results["packing"] = []
    for max_len, samples in configs:
        r = measure_packing(max_len, samples, repeats=args.repeats)
        results["packing"].append(r)
        print("packing  " + format_packing(r), flush=True)
    o = measure_overlap(engine=args.engine, steps=args.steps)
    results["overlap"] = o
    print(f"overlap  {o['engine']}: sequential {o['sequential_step_s']:.3f} s = rollout {o['rollout_s']:.3f} + "
          f"train/sync {o['train_s']:.3f}; overlapped {o['overlapped_step_s']:.3f} s = {o['ratio_to_max']:.2f} x max, "
          f"{o['ratio_to_sum']:.2f} x sum (best {o['best_ratio_to_sum']:.2f}), speed-up {o['speedup']:.2f}x")
    main_packing = results["packing"][0]
    print(f"\nratio 1 (packed / padded tokens/s, T_max 512, N 64): {main_packing['speedup']:.2f}x  (goal >= 2x); "
          f"activation peak {main_packing['activation_peak_mib']['packed']:.0f} vs "
          f"{main_packing['activation_peak_mib']['padded']:.0f} MiB padded (goal: no higher)")
    print(f"ratio 2 (overlapped step / max(rollout, train)): {o['ratio_to_max']:.2f}  (goal <= 1.15)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
