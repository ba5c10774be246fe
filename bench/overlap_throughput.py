"""Step time with overlapped rollouts (``rollout.overlap``) against the sequential step, in one run.

    .venv/bin/python bench/overlap_throughput.py                      # SGLang server on CPU (make sglang-env)
    .venv/bin/python bench/overlap_throughput.py --engine local       # the embedded engine (a thread)
    .venv/bin/python bench/overlap_throughput.py --out overlap.json

One process, one Trainer (world size 1, gloo, 1 intra-op thread), one rollout engine. It runs ``steps`` RL steps
sequentially, then switches the same trainer to overlapped rollouts and runs ``steps`` more (the first
overlapped step generates synchronously, as every overlapped run's first step does, and is not counted; the
first sequential step is a warm-up and is not counted either). From the sequential steps:
  rollout = step time - (train + sync)   (generation, scoring and packing: what the overlap can hide)
  train   = train + sync                 (the rest of the step; the sync cannot overlap, it follows the wait)
and it reports the mean overlapped step time over max(rollout, train) (1.0 = perfect overlap, the bound) and
over rollout + train (the sequential cost; max/sum is the best possible), with the mean wait for the prefetch.
Defaults are sized for rollout ~ train on a 2-core machine: the SGLang server runs with OMP_NUM_THREADS=1 (its
launcher's default here: half the cores), the trainer with one thread, so each has a core; the policy (2 layers x
256) is large enough that the trainer is compute-bound rather than bound by Python (the rollout thread's Python
shares the trainer process's interpreter lock). With the embedded engine both share the trainer's process and
its GIL: torch ops release it, Python between them does not.

This is a measurement script, not a test: it asserts nothing.

Measured (2-core KVM guest; README "Measured ratios" has the table): these defaults, quiet machine: sequential
2.303 s = rollout 1.035 + train/sync 1.268, overlapped 1.273 s = 1.00 x max (1.81x faster); another run 1.10 x
max. A 2 x 128 policy (Python-bound trainer), 8 prompts: 1.20-1.22 x max (1.55-1.62x faster), 1.7-1.9 x max with
another test suite running; embedded engine, load ~2: 1.16 x max.

API (bench/throughput.py imports it):
    measure_overlap(*, engine="sglang", steps=4, overrides=(), run_dir=None, threads=1) -> dict
        engine: "sglang" (one CPU server launched for the run) or "local" (embedded engine).
        steps: counted steps per mode (each mode also runs one uncounted step first).
        overrides: extra --set style config overrides ("model.hidden_size=64", ...) after the defaults.
        run_dir: where the run directory goes (None = a temporary directory, removed afterwards).
        threads: torch intra-op threads of the trainer.
    Returns {"engine", "steps", "sequential_step_s", "rollout_s", "train_s", "overlapped_step_s",
             "overlap_wait_s", "ratio_to_max", "ratio_to_sum", "best_ratio_to_sum", "speedup",
             "staleness", "config": [overrides used]} with times as means in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

DEFAULTS = [
    "model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=32", "model.make_vocab_size_divisible_by=8",
    "model.max_position_embeddings=128", "model.add_qkv_bias=true",
    "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4", "rollout.max_prompt_len=16",
    "sampling.max_new_tokens=40", "optim.micro_batch_size=4", "optim.num_mini_batches=4", "optim.lr=1e-3",
    "loss.name=clip_cov", "loss.entropy_coef=0.01", "loss.tis_cap=2.0", "metrics.tensorboard=false",
    "metrics.measure_entropy_change=false", "weight_sync.verify=version",
]
"""A tiny policy whose sequential step splits roughly evenly between rollout and training on 2 cores."""


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def measure_overlap(*, engine: str = "sglang", steps: int = 4, overrides=(), run_dir: str | None = None,
                    threads: int = 1) -> dict:
    """Sequential vs overlapped step time of one trainer (module docstring: what each number means)."""
    import torch

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.rollout.prefetch import RolloutPrefetch
    from megatron_entcov.trainer import Trainer

    torch.set_num_threads(threads)
    overrides = [*DEFAULTS, f"rollout.engine={engine}", *overrides]
    if engine == "sglang":
        overrides += ["rollout.sglang.server_device=cpu", "rollout.sglang.num_servers=1"]
    tmp = tempfile.TemporaryDirectory(prefix="overlap_bench_") if run_dir is None else None
    root = tmp.name if tmp is not None else run_dir
    cfg = load_config(None, [*overrides, f"steps={2 * steps + 2}", f"output_dir={root}",
                             "name=overlap_bench"]).resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    try:
        def run(n: int) -> list[dict]:
            out = []
            for _ in range(n):
                out.append(trainer.train_step())
                trainer.step += 1
            return out

        sequential = run(steps + 1)[1:]
        trainer.prefetch = RolloutPrefetch()     # the same trainer, engine and model, now overlapped
        overlapped = run(steps + 1)[1:]
    finally:
        trainer.close()
        destroy_parallel()
        if tmp is not None:
            tmp.cleanup()
    step_s = _mean([m["perf/step_time_s"] for m in sequential])
    train_s = _mean([m["perf/train_time_s"] + m["perf/sync_time_s"] for m in sequential])
    rollout_s = step_s - train_s
    over_s = _mean([m["perf/step_time_s"] for m in overlapped])
    bound = max(rollout_s, train_s)
    return {"engine": engine, "steps": steps, "sequential_step_s": step_s, "rollout_s": rollout_s,
            "train_s": train_s, "overlapped_step_s": over_s,
            "overlap_wait_s": _mean([m["perf/overlap_wait(s)"] for m in overlapped]),
            "ratio_to_max": over_s / bound, "ratio_to_sum": over_s / (rollout_s + train_s),
            "best_ratio_to_sum": bound / (rollout_s + train_s), "speedup": step_s / over_s,
            "staleness": _mean([m["rollout/staleness"] for m in overlapped]), "config": overrides}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("sglang", "local"), default="sglang")
    ap.add_argument("--steps", type=int, default=4, help="counted steps per mode")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the trainer")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", type=Path, help="also write the result as JSON")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result = measure_overlap(engine=args.engine, steps=args.steps, overrides=args.set, threads=args.threads)
    print(f"engine {result['engine']}: sequential step {result['sequential_step_s']:.3f} s = rollout "
          f"{result['rollout_s']:.3f} s + train/sync {result['train_s']:.3f} s")
    print(f"overlapped step {result['overlapped_step_s']:.3f} s (waited {result['overlap_wait_s']:.3f} s for the "
          f"prefetch, staleness {result['staleness']:.2f}): {result['ratio_to_max']:.3f} x max(rollout, train), "
          f"{result['ratio_to_sum']:.3f} x their sum (best possible {result['best_ratio_to_sum']:.3f}); "
          f"speed-up {result['speedup']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
