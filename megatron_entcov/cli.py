"""The `megatron-entcov` command.

    megatron-entcov train      --config X.yaml [--set a.b=v ...] [--nproc N] [--resume] [LOG]
    megatron-entcov sft        --config X.yaml [--set ...] [--nproc N] [LOG]
    megatron-entcov quickstart [--config configs/quickstart.yaml] [--set ...] [LOG]   SFT warm start, then RL
    megatron-entcov fit-law    RUN_DIR [--out DIR]
    megatron-entcov convert    hf-to-megatron|megatron-to-hf ...
    megatron-entcov bench      vocab-parallel|entropy-dynamics [args]

LOG: `--verbose` also shows third-party internals (Megatron's config reprs, parameter lists, expected
warnings) that are filtered by default; `--log-level debug|info|warning|error` (debug implies --verbose).
Multi-process runs: `--nproc N` re-launches the command under torchrun on this machine; on clusters,
launch `python -m megatron_entcov train ...` with torchrun/srun yourself (slurm/*.sbatch).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from megatron_entcov.logs import LEVELS, setup_logging
from megatron_entcov.net import free_port

__all__ = ["main"]

DEFAULT_QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, default=None,
                   help="YAML file (sparse overrides of the defaults); omitted = the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set loss.name=kl_cov (repeatable)")
    p.add_argument("--nproc", type=int, default=None, help="launch N local processes with torchrun")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything: third-party INFO records (Megatron config reprs, parameter lists) "
                        "and expected library warnings, filtered by default")
    p.add_argument("--log-level", choices=LEVELS, default="info",
                   help="level of the run's log on rank 0 (other ranks: warning and above); debug implies --verbose")


def _relaunch(nproc: int) -> int:
    """Re-run this exact command under torchrun with N processes (local machine)."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "megatron_entcov", *argv]
    env = dict(os.environ, MEGATRON_ENTCOV_LAUNCHED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def _load(args, resume: bool = False):
    from megatron_entcov.config import load_config

    overrides = list(args.overrides)
    if resume:
        overrides.append("checkpoint.resume=true")
    return load_config(args.config, overrides)


def _init(cfg):
    import torch.distributed as dist

    from megatron_entcov.parallel import init_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.resolve(world)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    assert dist.get_world_size() == world
    return ps


def _cmd_train(args) -> int:
    from megatron_entcov.parallel import destroy_parallel
    from megatron_entcov.trainer import Trainer

    cfg = _load(args, resume=args.resume)
    ps = _init(cfg)
    trainer = Trainer(cfg, ps)
    try:
        last = trainer.train()
    finally:
        trainer.close()
    if ps.is_rank0:
        print(f"done: {cfg.steps} steps; run directory {cfg.run_dir}; reward {last.get('reward/mean', float('nan')):.3f}")
    destroy_parallel()
    return 0


def _cmd_sft(args) -> int:
    from megatron_entcov.parallel import destroy_parallel
    from megatron_entcov.sft import run_sft

    cfg = _load(args)
    ps = _init(cfg)
    result = run_sft(cfg, ps)
    if ps.is_rank0:
        print(f"sft: checkpoint {result['checkpoint']}; greedy accuracy {result['accuracy']}")
    destroy_parallel()
    return 0


def _cmd_quickstart(args) -> int:
    import time

    from megatron_entcov.law_report import write_law_report
    from megatron_entcov.parallel import destroy_parallel
    from megatron_entcov.sft import run_sft
    from megatron_entcov.trainer import Trainer

    args.config = args.config or str(DEFAULT_QUICKSTART)
    cfg = _load(args)
    ps = _init(cfg)
    t0 = time.monotonic()
    sft = None
    if cfg.sft.steps and not cfg.checkpoint.load:
        sft = run_sft(cfg, ps)
        cfg.checkpoint.load = sft["checkpoint"]
        if ps.is_rank0:
            print(f"[quickstart] SFT warm start: {cfg.sft.steps} steps, greedy accuracy {sft['accuracy']:.3f}",
                  flush=True)
    trainer = Trainer(cfg, ps)
    try:
        trainer.train()
    finally:
        trainer.close()
    if ps.is_rank0:
        summary = write_law_report(cfg.run_dir)
        run_dir = Path(cfg.run_dir).resolve()
        print(f"[quickstart] finished in {time.monotonic() - t0:.0f} s")
        print(f"[quickstart] reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, "
              f"entropy {summary['entropy_first']:.3f} -> {summary['entropy_last']:.3f}")
        print(f"[quickstart] TensorBoard logs: {run_dir / 'tensorboard'}  "
              f"(tensorboard --logdir {run_dir / 'tensorboard'})")
        print(f"[quickstart] entropy-reward law plot: {summary['png']} "
              f"(a={summary['a']:.3g}, b={summary['b']:.3g}, ceiling {summary['predicted_ceiling']:.3f})")
    destroy_parallel()
    return 0


def _cmd_fit_law(args) -> int:
    from megatron_entcov.law_report import write_law_report

    summary = write_law_report(args.run_dir, args.out)
    print(f"R = -{summary['a']:.4g} * exp(H) + {summary['b']:.4g}  (R^2 {summary['r2']:.3f}, "
          f"{summary['num_points']} points); predicted ceiling {summary['predicted_ceiling']:.4f}")
    print(f"wrote {summary['png']} and {Path(summary['png']).with_suffix('.json')}")
    return 0


def _cmd_convert(args, rest) -> int:
    if args.direction == "hf-to-megatron":
        from megatron_entcov.weights.to_megatron import main_hf_to_megatron

        return main_hf_to_megatron(rest)
    from megatron_entcov.weights.to_hf import main_megatron_to_hf

    return main_megatron_to_hf(rest)


def _cmd_bench(args, rest) -> int:
    root = Path(__file__).resolve().parent.parent / "bench"
    script = {"vocab-parallel": "vocab_parallel.py", "entropy-dynamics": "entropy_dynamics.py"}[args.which]
    if not (root / script).is_file():
        print(f"bench/{script} is not in this installation (benchmarks live in the source tree)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(root / script), *rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-entcov", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="RL training")
    _add_config_args(p, required=False)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p = sub.add_parser("sft", help="supervised warm start")
    _add_config_args(p, required=False)
    p = sub.add_parser("quickstart", help="CPU quickstart: SFT warm start then RL, then the law plot")
    _add_config_args(p, required=False)
    p = sub.add_parser("fit-law", help="fit R = -a exp(H) + b to a run and plot it")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p = sub.add_parser("convert", help="Hugging Face <-> Megatron checkpoints", add_help=False)
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p = sub.add_parser("bench", help="benchmarks from bench/", add_help=False)
    p.add_argument("which", choices=["vocab-parallel", "entropy-dynamics"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("convert", "bench"):
        return (_cmd_convert if args.command == "convert" else _cmd_bench)(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(verbose=getattr(args, "verbose", False), level=getattr(args, "log_level", None))
    if getattr(args, "nproc", None) and args.nproc > 1 and not os.environ.get("MEGATRON_ENTCOV_LAUNCHED"):
        return _relaunch(args.nproc)
    handlers = {"train": _cmd_train, "sft": _cmd_sft, "quickstart": _cmd_quickstart, "fit-law": _cmd_fit_law}
    try:
        return handlers[args.command](args)
    except ValueError as exc:
        # Bad configs and inputs: one clear line, no traceback.
        print(f"megatron-entcov {args.command}: error: {exc}", file=sys.stderr)
        return 2
