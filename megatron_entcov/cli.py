"""The `megatron-entcov` command.

    megatron-entcov train      --config X.yaml [--set a.b=v ...] [--nproc N] [--resume | --auto-resume] [LOG]
    megatron-entcov sft        --config X.yaml [--set ...] [--nproc N] [LOG]
    megatron-entcov quickstart [--config configs/quickstart.yaml] [--set ...] [LOG]   SFT warm start, then RL
    megatron-entcov fit-law    RUN_DIR [--out DIR] [--source auto|eval|train]
    megatron-entcov plan       --config X.yaml [--set ...] [--nodes N] [--gpus-per-node G] [--gpu-memory-gib M] [--json]
    megatron-entcov convert    hf-to-megatron|megatron-to-hf ...
    megatron-entcov bench      vocab-parallel|entropy-dynamics|selection-overhead [args]

LOG: `--verbose` also shows third-party internals that are filtered by default; `--log-level
debug|info|warning|error` (debug implies --verbose). `--nproc N` re-launches the command under torchrun on this
machine (on clusters, launch `python -m megatron_entcov train ...` with torchrun/srun: slurm/*.sbatch).
SIGTERM, SIGINT or SIGUSR1 make `train` finish the step in flight on every rank, checkpoint it and exit with
128 + the signal number; `--resume` continues from that step. A second SIGTERM/SIGINT stops at once.

Design notes (the launcher, stopping): docs/design/run.md
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from megatron_entcov.run.launch import (
    DEFAULT_STOP_TIMEOUT,
    LAUNCHED_ENV,
    REPORT_ENV,
    argv_without_nproc,
    report,
    run_ranks,
    torchrun_command,
)
from megatron_entcov.run.logs import LEVELS, setup_logging
from megatron_entcov.run.stop import StopNow, StopSignals, start_checkpoint_queue, stop_checkpoint_queue, stop_exit_code

__all__ = ["main"]

DEFAULT_QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _nproc(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give the number of local processes, "
                                         "e.g. --nproc 2") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a number of processes: give N >= 1 (omit --nproc for "
                                         "one process)")
    return n


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, default=None,
                   help="YAML file (sparse overrides of the defaults); omitted = the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set loss.name=kl_cov (repeatable)")
    p.add_argument("--nproc", type=_nproc, default=None, help="launch N local processes with torchrun")
    p.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                   help="--nproc: after SIGTERM/SIGINT/SIGUSR1, how long the ranks get to finish their step and "
                        f"save a checkpoint before they are killed (default {DEFAULT_STOP_TIMEOUT:.0f})")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything: third-party INFO records (Megatron config reprs, parameter lists) "
                        "and expected library warnings, filtered by default")
    p.add_argument("--log-level", choices=LEVELS, default="info",
                   help="level of the run's log on rank 0 (other ranks: warning and above); debug implies --verbose")


def _launch(args, argv: list[str]) -> int:
    """Check the config for ``args.nproc`` processes, then run this command under torchrun and supervise it
    (:func:`run_ranks`: the ranks' errors printed once, their exit code). A config that does not fit raises
    ValueError before anything is started."""
    cfg = _load(args, resume=getattr(args, "resume", False))
    cfg.resolve(args.nproc)
    if args.stop_timeout < 0:
        raise ValueError(f"--stop-timeout {args.stop_timeout:g} must be >= 0 seconds")
    from megatron_entcov.distributed.parallel import loopback_store

    store, port = loopback_store()          # lives as long as this process: torchrun's rendezvous
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **{LAUNCHED_ENV: "1"})
    try:
        return run_ranks(torchrun_command(args.nproc, port, argv_without_nproc(argv)), env,
                         stop_timeout=args.stop_timeout)
    finally:
        del store


def _load(args, resume: bool = False):
    """The run config from --config and --set; ``--resume`` sets checkpoint.resume, and ``--auto-resume`` sets it
    when the run directory already belongs to a run (its run.json exists), so a requeued job continues and a
    first launch starts."""
    from megatron_entcov.config import load_config
    from megatron_entcov.run.run_dir import RUN_FILE

    overrides = list(args.overrides)
    if resume:
        overrides.append("checkpoint.resume=true")
    cfg = load_config(args.config, overrides)
    if getattr(args, "auto_resume", False) and not cfg.checkpoint.resume and (cfg.run_dir / RUN_FILE).is_file():
        cfg = load_config(args.config, [*overrides, "checkpoint.resume=true"])
    return cfg


def _init(cfg):
    import torch.distributed as dist

    from megatron_entcov.distributed.parallel import init_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.resolve(world)
    start_checkpoint_queue()
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    assert dist.get_world_size() == world
    return ps


def _stopped(trainer, cfg, ps) -> int:
    """After a stop at a step boundary: one line on rank 0, the exit code (see _stop_exit_code)."""
    from megatron_entcov.distributed.parallel import destroy_parallel

    signum = trainer.stop_signal
    if ps.is_rank0:
        print(f"stopped by {signal.Signals(signum).name} after step {trainer.step} of {cfg.steps}; its checkpoint is "
              f"in {Path(cfg.run_dir) / 'checkpoints'}; continue with --resume", flush=True)
    destroy_parallel()
    return stop_exit_code(signum)


def _cmd_train(args) -> int:
    from megatron_entcov.distributed.parallel import destroy_parallel
    from megatron_entcov.trainer import Trainer

    cfg = _load(args, resume=args.resume)
    _STOPS.graceful = True       # a stop signal from here on ends the RL loop at a step boundary
    ps = _init(cfg)
    from megatron_entcov.plan.command import check_at_start

    check_at_start(cfg, ps)                      # on GPU machines: stop now, with the table, if it cannot fit
    trainer = Trainer(cfg, ps)
    try:
        last = trainer.train()
    finally:
        trainer.close()
    if getattr(trainer, "stop_signal", 0):
        return _stopped(trainer, cfg, ps)
    if ps.is_rank0:
        print(f"done: {cfg.steps} steps; run directory {cfg.run_dir}; reward {last.get('reward/mean', float('nan')):.3f}")
    destroy_parallel()
    return 0


def _cmd_sft(args) -> int:
    from megatron_entcov.distributed.parallel import destroy_parallel
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

    from megatron_entcov.distributed.parallel import destroy_parallel
    from megatron_entcov.monitor.law_report import write_law_report
    from megatron_entcov.run.run_dir import RunDir
    from megatron_entcov.sft import run_sft
    from megatron_entcov.trainer import Trainer

    args.config = args.config or str(DEFAULT_QUICKSTART)
    cfg = _load(args)
    ps = _init(cfg)
    t0 = time.monotonic()
    # The run directory (SFT in <run_dir>/sft, RL in <run_dir>) is one run: a re-run into it is refused with
    # the fixes (RunDir), never overwritten; --set checkpoint.resume=true continues its RL part.
    run = RunDir.open(cfg.run_dir, ps, resume=cfg.checkpoint.resume)
    trainer = None
    try:
        sft = None
        if cfg.sft.steps and not cfg.checkpoint.load and not cfg.checkpoint.resume:
            sft = run_sft(cfg, ps)
            cfg.checkpoint.load = sft["checkpoint"]
            if ps.is_rank0:
                print(f"[quickstart] SFT warm start: {cfg.sft.steps} steps, greedy accuracy {sft['accuracy']:.3f}",
                      flush=True)
        trainer = Trainer(cfg, ps, run=run)
        _STOPS.graceful = True   # from here a stop signal ends the RL loop at a step boundary
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:  # failed before RL started (no Trainer): the corrected command may start in this directory
        run.close(failed_to_start=trainer is None)
    if getattr(trainer, "stop_signal", 0):
        return _stopped(trainer, cfg, ps)
    if ps.is_rank0:
        summary = write_law_report(cfg.run_dir)
        run_dir = Path(cfg.run_dir).resolve()
        print(f"[quickstart] finished in {time.monotonic() - t0:.0f} s")
        print(f"[quickstart] {summary['reward_tag']} {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, "
              f"{summary['entropy_tag']} {summary['entropy_first']:.3f} -> {summary['entropy_last']:.3f}")
        print(f"[quickstart] TensorBoard logs: {run_dir / 'tensorboard'} (RL) and {run_dir / 'sft' / 'tensorboard'} "
              f"(SFT); every run of {run_dir.parent} side by side: tensorboard --logdir {run_dir.parent}")
        print(f"[quickstart] entropy-reward law plot: {summary['png']} "
              f"(a={summary['a']:.3g}, b={summary['b']:.3g}, ceiling {summary['predicted_ceiling']:.3f}); "
              "in TensorBoard: the law/fit image")
        print(f"[quickstart] open it: tensorboard --logdir {run_dir.parent}, then the CUSTOM SCALARS tab "
              "(http://localhost:6006/#custom_scalars) for the Entropy control dashboard")
    destroy_parallel()
    return 0


def _cmd_fit_law(args) -> int:
    from megatron_entcov.monitor.law_report import write_law_report

    summary = write_law_report(args.run_dir, args.out, source=args.source)
    at_zero = "predicted ceiling" if summary["a"] > 0 else "R at H = 0:"
    print(f"{summary['formula']}  (R^2 {summary['r2']:.3f}, {summary['num_points']} points of "
          f"{summary['entropy_tag']} / {summary['reward_tag']}); {at_zero} {summary['predicted_ceiling']:.4f}")
    print(f"wrote {summary['png']} and {Path(summary['png']).with_suffix('.json')}")
    for warning in summary["warnings"]:
        print(f"megatron-entcov fit-law: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_convert(args, rest) -> int:
    if args.direction == "hf-to-megatron":
        from megatron_entcov.weights.to_megatron import main_hf_to_megatron

        return main_hf_to_megatron(rest)
    from megatron_entcov.weights.to_hf import main_megatron_to_hf

    return main_megatron_to_hf(rest)


def _cmd_bench(args, rest) -> int:
    root = Path(__file__).resolve().parent.parent / "bench"
    script = {"vocab-parallel": "vocab_parallel.py", "entropy-dynamics": "entropy_dynamics.py",
              "selection-overhead": "selection_overhead.py"}[args.which]
    if not (root / script).is_file():
        print(f"bench/{script} is not in this installation (benchmarks live in the source tree)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(root / script), *rest])


_STOPS = StopSignals()
"""The stop-signal handlers of this training process (installed by main for train/sft/quickstart)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-entcov", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="RL training")
    _add_config_args(p, required=False)
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue the run when its directory already holds one, else start it (batch jobs that "
                        "may be requeued)")
    p = sub.add_parser("sft", help="supervised warm start")
    _add_config_args(p, required=False)
    p = sub.add_parser("quickstart", help="CPU quickstart: SFT warm start then RL, then the law plot")
    _add_config_args(p, required=False)
    p = sub.add_parser("plan", help="will it fit? each rank's GPU memory in each phase of a step, before launch",
                       description="What each rank role holds in each phase of an RL step (weights, gradients, "
                                   "optimizer state, activations, the rollout engine), whether it fits its GPU, "
                                   "and the changes that would. Exit 0: fits; 1: does not; 2: bad input. Needs no "
                                   "GPU (docs/design/plan.md).")
    from megatron_entcov.plan import command as plan_command

    plan_command.add_arguments(p)
    p = sub.add_parser("fit-law", help="fit R = -a exp(H) + b to a run and plot it")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default: the run directory)")
    p.add_argument("--source", choices=("auto", "eval", "train"), default="auto",
                   help="points to fit: held-out evaluations (eval/entropy, eval/accuracy), training rollouts "
                        "(entropy/mean, reward/mean_all), or auto: eval when the run logged evaluations")
    # convert/bench hand everything after the direction/benchmark to its own parser (its --help included).
    p = sub.add_parser("convert", help="Hugging Face <-> Megatron checkpoints",
                       description="Convert checkpoints. hf-to-megatron: a Hugging Face directory -> a Megatron "
                                   "dist checkpoint root; megatron-to-hf: a Megatron checkpoint (any tp/pp) -> a "
                                   "Hugging Face directory. Their options: megatron-entcov convert DIRECTION --help "
                                   "(docs/conversion.md).")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the direction's options, e.g. --hf-dir X --out Y (see DIRECTION --help)").required = False
    p = sub.add_parser("bench", help="benchmarks from bench/",
                       description="Run a benchmark script from bench/. Its options: megatron-entcov bench "
                                   "BENCHMARK --help.")
    p.add_argument("which", choices=["vocab-parallel", "entropy-dynamics", "selection-overhead"],
                   metavar="BENCHMARK", help="vocab-parallel | entropy-dynamics | selection-overhead")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the benchmark's options").required = False
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("convert", "bench"):
        if rest:  # options before the subcommand; those after it are in args.args
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return (_cmd_convert if args.command == "convert" else _cmd_bench)(args, args.args)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    setup_logging(verbose=getattr(args, "verbose", False), level=getattr(args, "log_level", None))
    if args.command == "quickstart":
        args.config = args.config or str(DEFAULT_QUICKSTART)
    launch = (getattr(args, "nproc", None) or 1) > 1 and not os.environ.get(LAUNCHED_ENV)
    training = args.command in ("train", "sft", "quickstart") and not launch
    if training:
        _STOPS.graceful = False
        _STOPS.install()
    try:
        return _run(args, argv, launch)
    except Exception:
        if not os.environ.get(REPORT_ENV):
            raise
        # A rank of the --nproc launcher: its traceback goes to the launcher, which prints it once for all ranks.
        return report(traceback.format_exc().rstrip("\n"), 1)
    finally:
        if training:
            _STOPS.restore()
            stop_checkpoint_queue()


def _run(args, argv: list[str], launch: bool) -> int:
    """The command (or, with ``launch``, the --nproc launcher running it); a user error is one line, exit 2
    (:func:`report`: on a rank of the launcher, printed once by the launcher for all ranks)."""
    from megatron_entcov.plan.command import run as _cmd_plan

    handlers = {"train": _cmd_train, "sft": _cmd_sft, "quickstart": _cmd_quickstart, "fit-law": _cmd_fit_law,
                "plan": _cmd_plan}
    try:
        if launch:
            return _launch(args, argv)
        return handlers[args.command](args)
    except ValueError as exc:
        # Bad configs and inputs: one clear line, no traceback.
        return report(f"megatron-entcov {args.command}: error: {exc}", 2)
    except RuntimeError as exc:
        from megatron_entcov.policy.actor import TrainingDivergedError

        if not isinstance(exc, TrainingDivergedError):
            raise
        return report(f"megatron-entcov {args.command}: stopped: {exc}", 1, rank0_only=True)
    except StopNow as stop:
        return report(f"megatron-entcov {args.command}: stopped at once by {stop}; nothing saved since the last "
                      "checkpoint", 128 + stop.signum, rank0_only=True)
