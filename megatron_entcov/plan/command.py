"""``megatron-entcov plan``: whether a config fits its GPUs, per rank and phase, before a job waits in a queue;
and the trainer's start-up check, which runs the same command as a child process.

    megatron-entcov plan --config X.yaml [--set k=v ...] [--nodes N] [--gpus-per-node G] [--gpu-memory-gib M]
                         [--attention fused|local] [--json]

Exit status: 0 when every rank fits, 1 when one does not (the table says which phase and what would fit),
2 for a bad config or flag. Planning needs no GPU and never touches one: the models are built on the meta device
in a fake world (plan/states.py), in a process that sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["add_arguments", "run", "startup_plan", "check_at_start"]

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file (sparse overrides of the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set parallel.tensor_model_parallel_size=8 (repeatable)")
    p.add_argument("--nodes", type=_positive(int), default=None, help="nodes (default: hardware.nodes)")
    p.add_argument("--gpus-per-node", type=_positive(int), default=None,
                   help="GPUs per node, one rank each (default: hardware.gpus_per_node)")
    p.add_argument("--gpu-memory-gib", type=_memory, default=None,
                   help="memory of one GPU in GiB, or 'auto': this node's first GPU as nvidia-smi reports it (the "
                        "batch scripts; hardware.gpu_memory_gib where there is none); default: hardware.gpu_memory_gib")
    p.add_argument("--attention", choices=("fused", "local"), default=None,
                   help="attention kernels of the run: fused (Transformer Engine; the default unless "
                        "model.transformer_impl=local) or local (Megatron's local spec: [T, T] scores)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of the table")
    p.add_argument("--enforce", action="store_true",
                   help="batch scripts: the exit status follows the config's hardware.fit_check (error: 1 when it "
                        "does not fit; warn: 0 with a warning; off: 0 without planning)")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    return parse


def _memory(text: str):
    return "auto" if text == "auto" else _positive(float)(text)


def detected_gpu_memory_gib() -> float | None:
    """The first GPU's memory in GiB from ``nvidia-smi`` (no CUDA context in this process); None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
        return int(out.stdout.split()[0]) / 1024 if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _hide_gpus() -> None:
    """The planner allocates nothing anywhere; a GPU it can see would be initialised by Megatron's code paths."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if torch.cuda.is_available():            # CUDA was initialised before the variable could act
        raise RuntimeError("plan: this process already uses a GPU; run `megatron-entcov plan` as its own process")


def run(args) -> int:
    """The command: print the table (or JSON); exit 0 when it fits, 1 when not."""
    _hide_gpus()
    logging.getLogger("megatron_entcov").setLevel(logging.WARNING)     # the builds' per-stage lines
    from megatron_entcov.config import load_config
    from megatron_entcov.plan.advice import plan_with_advice
    from megatron_entcov.plan.report import plan_json, plan_table

    cfg = load_config(args.config, args.overrides)
    if args.enforce and cfg.hardware.fit_check == "off":
        print("plan: skipped (hardware.fit_check=off)")
        return 0
    memory = args.gpu_memory_gib
    if memory == "auto":
        memory = detected_gpu_memory_gib()
        if memory is None:
            print(f"plan: no GPU seen (nvidia-smi): planning for hardware.gpu_memory_gib="
                  f"{cfg.hardware.gpu_memory_gib:g}", file=sys.stderr)
    plan = plan_with_advice(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=memory,
                            attention=args.attention)
    if args.json:
        print(json.dumps(plan_json(plan), indent=1))
    else:
        print(plan_table(plan, source=args.config or "the defaults"))
    if not plan.fits and args.enforce and cfg.hardware.fit_check == "warn":
        print("plan: warning: a phase does not fit; starting anyway (hardware.fit_check=warn)", file=sys.stderr)
        return 0
    return 0 if plan.fits else 1


def startup_plan(cfg, *, world_size: int, gpus_per_node: int, gpu_memory_gib: float, attention: str,
                 timeout_s: float = 300.0) -> tuple[bool, str]:
    """The trainer's check (rank 0, before the model is built): plan the resolved ``cfg`` for the launched world
    in a child ``megatron-entcov plan`` that sees no GPU. Returns (fits, the table). Raises RuntimeError when the
    planner itself fails (its error output included)."""
    from megatron_entcov.config import dump_config

    with tempfile.TemporaryDirectory(prefix="entcov-plan-") as tmp:
        path = Path(tmp) / "config.yaml"
        dump_config(cfg, path)
        cmd = [sys.executable, "-m", "megatron_entcov", "plan", "--config", str(path),
               "--nodes", str(max(world_size // gpus_per_node, 1)),
               "--gpus-per-node", str(min(gpus_per_node, world_size)),
               "--gpu-memory-gib", f"{gpu_memory_gib:.4f}", "--attention", attention]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TORCHELASTIC_", "MASTER_", "LOCAL_", "GROUP_", "ROLE_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
        env["CUDA_VISIBLE_DEVICES"] = ""
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"the start-up memory plan failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}; set hardware.fit_check=off to skip it")
    return done.returncode == 0, done.stdout.rstrip()


def check_at_start(cfg, ps, *, gpu_memory_gib: float | None = None, gpus_per_node: int | None = None) -> None:
    """The trainer's start-up plan (collective over the world; before the model is built). On a GPU machine (or
    when ``gpu_memory_gib`` is given) rank 0 plans ``cfg`` for this world in a child process and every rank
    learns the answer; when a phase cannot fit, ``hardware.fit_check=error`` raises ValueError with the table on
    every rank and ``warn`` logs it. ``gpus_per_node`` defaults to LOCAL_WORLD_SIZE."""
    import torch

    from megatron_entcov.compat import toolchain
    from megatron_entcov.distributed import collectives
    from megatron_entcov.plan.planner import attention_kind

    if cfg.hardware.fit_check == "off":
        return
    if gpu_memory_gib is None:
        if not torch.cuda.is_available():
            return                          # CPU runs: the host's memory, not a GPU's, is what they use
        gpu_memory_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    gpus_per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", ps.world_size))
    answer = [None]
    if ps.is_rank0:
        te = toolchain.transformer_engine().ok if torch.cuda.is_available() else None
        try:
            answer[0] = startup_plan(cfg, world_size=ps.world_size, gpus_per_node=gpus_per_node,
                                     gpu_memory_gib=gpu_memory_gib, attention=attention_kind(cfg, te_usable=te))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            answer[0] = (None, str(exc))
    fits, table = collectives.broadcast_object_list(answer, src=0)[0]
    if fits is None:
        raise RuntimeError(table)
    if fits:
        if ps.is_rank0:
            logger.info("start-up memory plan: every rank fits\n%s", table)
        return
    if cfg.hardware.fit_check == "warn":
        if ps.is_rank0:
            logger.warning("start-up memory plan: a phase does not fit; starting anyway "
                           "(hardware.fit_check=warn)\n%s", table)
        return
    raise ValueError(f"this run does not fit its GPUs (megatron-entcov plan):\n{table}\nchange the config as "
                     "advised, or set hardware.fit_check=warn to start anyway")
