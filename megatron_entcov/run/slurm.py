"""What the SLURM job scripts (slurm/*.sbatch) ask of the package: processes per node from the job's GPUs, the
SGLang servers of a job (how many per node, one server per task, waiting until they answer), the checks a
config must pass before its servers go on other nodes, and whether a run is finished (no requeue then).

Run as ``python -m megatron_entcov.run.slurm COMMAND``; CFG is ``--config X.yaml [--set key=value ...]`` as for
``train``. A bad value exits 2 with one line naming the variable or field, the value and the fix.

    nproc                      processes per node: $NPROC_PER_NODE, else the node's GPUs (typed GRES parsed)
    servers-per-node  CFG      SGLang servers per server node: $SERVERS_PER_NODE, else GPUs / server --tp-size
    check-remote      CFG      the config can use servers on other nodes (weight transport, no release_memory)
    serve --port-base P CFG    one SGLang server (this task's: port P + SLURM_LOCALID), until SIGTERM
    wait-servers --timeout S [--watch-pid PID] URL...   until every server answers (or PID exits)
    finished          CFG      exit 0 when the run's latest complete checkpoint is at its last step

Example: slurm/train_sglang.sbatch. Design notes: docs/design/run.md
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence

__all__ = ["JobError", "gres_count", "gpus_on_node", "nproc_per_node", "servers_per_node", "check_remote_servers",
           "run_finished", "main"]


class JobError(ValueError):
    """A job variable or config that cannot work; the message names it, its value and the fix."""


def _positive_int(name: str, value: str, example: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise JobError(f"{name}={value!r} is invalid: give a positive integer, e.g. {name}={example}")
    return n


_GRES_ITEM = re.compile(r"^(?:gpu:)?(?:[A-Za-z0-9_.-]+:)?(\d+)(?:\(.*\))?$")


def gres_count(name: str, value: str) -> int:
    """The GPU count in a SLURM GPU variable: ``8``, ``h100:8``, ``gpu:h100:8``, ``a100:4,v100:4`` (summed).
    JobError naming ``name`` for anything else."""
    total = 0
    for item in str(value).split(","):
        m = _GRES_ITEM.match(item.strip())
        if not m:
            raise JobError(f"{name}={value!r} is not a GPU count SLURM writes ('8', 'h100:8', 'gpu:h100:8'): "
                           "set NPROC_PER_NODE=<processes per node> to bypass it")
        total += int(m.group(1))
    return total


def gpus_on_node(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """(GPUs SLURM gave this node, the variable it came from): SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE
    (typed GRES such as ``h100:8`` parsed). None when the job asked for no GPUs."""
    env = os.environ if env is None else env
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "").strip()
        if value and value != "(null)":
            return gres_count(key, value), key
    return None


def nproc_per_node(env: Mapping[str, str] | None = None) -> int:
    """Training processes per node: $NPROC_PER_NODE when set (CPU nodes, or fewer ranks than GPUs), else one
    per GPU SLURM gave the node. JobError when neither gives a positive number."""
    env = os.environ if env is None else env
    if env.get("NPROC_PER_NODE", "").strip():
        return _positive_int("NPROC_PER_NODE", env["NPROC_PER_NODE"], "8")
    gpus = gpus_on_node(env)
    if gpus is None or gpus[0] < 1:
        got = "no GPUs were requested" if gpus is None else f"{gpus[1]} says {gpus[0]} GPUs"
        raise JobError(f"cannot tell how many training processes to start per node: {got}; request GPUs "
                       "(#SBATCH --gpus-per-node=8) or set NPROC_PER_NODE (e.g. NPROC_PER_NODE=1 on CPU nodes, "
                       "with sbatch --export=ALL)")
    return gpus[0]


def servers_per_node(cfg, env: Mapping[str, str] | None = None) -> int:
    """SGLang servers per server node: $SERVERS_PER_NODE when set, else the node's GPUs divided by one server's
    GPUs (``--tp-size`` in rollout.sglang.server_args), else 1 (a CPU node)."""
    from megatron_entcov.config import server_tp

    env = os.environ if env is None else env
    if env.get("SERVERS_PER_NODE", "").strip():
        return _positive_int("SERVERS_PER_NODE", env["SERVERS_PER_NODE"], "4")
    gpus = gpus_on_node(env)
    if gpus is None or gpus[0] == 0:
        return 1
    tp = server_tp(cfg.rollout.sglang.server_args)
    if gpus[0] < tp or gpus[0] % tp:
        raise JobError(f"{gpus[1]}={gpus[0]} GPUs per node do not hold whole servers of rollout.sglang.server_args "
                       f"--tp-size {tp}: request a multiple of {tp} GPUs per node, or set SERVERS_PER_NODE")
    return gpus[0] // tp


def check_remote_servers(cfg) -> None:
    """JobError unless ``cfg`` can use SGLang servers on other nodes: their weights must travel over the network
    ('distributed') or through storage both sides mount ('disk' with rollout.sync_dir); 'tensor' and
    release_memory need servers on the trainer's own GPUs; a router is not started by the job."""
    sg = cfg.rollout.sglang
    if sg.sync_method == "tensor":
        raise JobError("rollout.sglang.sync_method='tensor' is invalid for servers on other nodes: it hands tensors "
                       "over shared memory on one node; set rollout.sglang.sync_method=distributed (or disk with "
                       "rollout.sync_dir on shared storage)")
    if sg.sync_method == "disk" and not getattr(cfg.rollout, "sync_dir", ""):
        raise JobError("rollout.sync_dir='' is invalid for rollout.sglang.sync_method='disk' with servers on other "
                       "nodes: the weights would be written to this node's temporary directory, which they cannot "
                       "read; set rollout.sync_dir=/shared/path (mounted at the same path on every node) or "
                       "rollout.sglang.sync_method=distributed")
    if sg.release_memory:
        raise JobError("rollout.sglang.release_memory=True is invalid for servers on other nodes: there is no "
                       "trainer memory to give back there; set rollout.sglang.release_memory=false")
    if sg.router_url:
        raise JobError(f"rollout.sglang.router_url={sg.router_url!r}: the job passes its servers' URLs itself "
                       "(rollout.sglang.server_urls) and starts no router; unset it (rollout.sglang.router_url='')")


def run_finished(cfg) -> bool:
    """True when the run directory's newest complete checkpoint is at step ``cfg.steps`` or later."""
    from megatron_entcov.run.checkpoint import find_latest

    latest = find_latest(cfg.run_dir / "checkpoints")
    if latest is None:
        return False
    m = re.search(r"(\d+)$", latest.name)
    return bool(m) and int(m.group(1)) >= cfg.steps


def _serve(cfg, port_base: int, log_dir: str | None, startup_timeout_s: float) -> int:
    """One SGLang server for this task (port ``port_base + SLURM_LOCALID``, first GPU ``SLURM_LOCALID *
    --tp-size``), listening on every interface, launched like the engine launches its own
    (``server_launch_args``); kept until SIGTERM/SIGINT (then stopped, exit 0) or its exit (its code)."""
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    from megatron_entcov.config import server_tp
    from megatron_entcov.rollout.sglang.placement import resolve_device
    from megatron_entcov.rollout.sglang.server import SGLangServer, server_launch_args, write_hf_model_dir

    sg = cfg.rollout.sglang
    local_id = int(os.environ.get("SLURM_LOCALID", "0"))
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    device = resolve_device(sg.server_device)
    port = port_base + local_id
    tmp = None
    if cfg.model.hf_dir:
        model_dir = cfg.model.hf_dir
    else:  # random weights of the policy's architecture: the trainer pushes its own before the first rollout
        tmp = tempfile.mkdtemp(prefix=f"entcov-sglang-{port}-")
        model_dir = str(write_hf_model_dir(cfg.model, Path(tmp) / "model", seed=cfg.seed))
    args = server_launch_args(sg, cfg.model, device)     # release_memory: refused by check_remote_servers
    if device == "cuda":
        args["extra_args"] += ["--base-gpu-id", str(local_id * server_tp(sg.server_args))]
    log_path = Path(log_dir or ".") / f"sglang-{node}-{port}.log"
    server = SGLangServer(model_dir, port=port, host="0.0.0.0", log_path=log_path, **args)
    class _Stop(Exception):
        pass

    def _stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    # A preemption notice is for the trainer (it checkpoints); a server has nothing to save.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        server.start()
        print(f"slurm_job serve: node {node} task {local_id}: SGLang server {socket.gethostname()}:{port} "
              f"({device}) starting, log {log_path}", flush=True)
        # Until ready (it records the shared-memory files a killed server leaves, for stop() to remove).
        server.wait_ready(startup_timeout_s, limit="slurm_job serve --startup-timeout")
        print(f"slurm_job serve: node {node}: the server on port {port} is ready after {server.startup_s:.0f} s",
              flush=True)
        while server.alive():
            time.sleep(0.5)
        rc = server.proc.returncode
        print(f"slurm_job serve: node {node}: the server on port {port} exited ({rc}); log {log_path}:\n"
              f"{server.log_tail()}", file=sys.stderr, flush=True)
        return rc or 1
    except _Stop as stop:
        print(f"slurm_job serve: node {node}: {stop}, stopping the server on port {port}", flush=True)
        return 0
    except RuntimeError as err:          # exited or not ready during start-up (wait_ready's message)
        print(f"slurm_job serve: node {node}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        server.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_servers(urls: Sequence[str], timeout_s: float, watch_pid: int | None) -> int:
    """Poll each URL's /get_model_info until all answer 200; 1 with a line naming the silent ones when
    ``timeout_s`` passes or process ``watch_pid`` (the servers' srun) exits first."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        for url in list(pending):
            try:
                with urllib.request.urlopen(url.rstrip("/") + "/get_model_info", timeout=5) as r:
                    if r.status == 200:
                        pending.remove(url)
                        print(f"slurm_job wait-servers: {url} is ready", flush=True)
            except (urllib.error.URLError, OSError, ValueError):
                pass
        if not pending:
            break
        if watch_pid is not None and not _alive(watch_pid):
            print(f"slurm_job wait-servers: the servers' job step (pid {watch_pid}) exited before {pending} answered; "
                  "see its log", file=sys.stderr, flush=True)
            return 1
        if time.monotonic() > deadline:
            print(f"slurm_job wait-servers: {pending} did not answer within {timeout_s:.0f} s "
                  "(SERVER_STARTUP_TIMEOUT); "
                  "see the servers' logs", file=sys.stderr, flush=True)
            return 1
        time.sleep(2.0)
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _config(args):
    from megatron_entcov.config import load_config

    if not args.config:
        raise JobError(f"{args.command}: --config is missing: pass the run's --config X.yaml [--set key=value ...]")
    return load_config(args.config, list(args.overrides))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_entcov.run.slurm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("nproc", "servers-per-node", "check-remote", "serve", "finished"):
        s = sub.add_parser(name)
        s.add_argument("--config", default=None)
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "serve":
            s.add_argument("--port-base", type=int, required=True)
            s.add_argument("--log-dir", default=None)
            s.add_argument("--startup-timeout", type=float, default=1200.0)
    w = sub.add_parser("wait-servers")
    w.add_argument("--timeout", type=float, required=True)
    w.add_argument("--watch-pid", type=int, default=None)
    w.add_argument("urls", nargs="+")
    args, _ignored = p.parse_known_args(argv)     # train's other options (-v, --log-level) are not ours
    try:
        if args.command == "nproc":
            print(nproc_per_node())
        elif args.command == "servers-per-node":
            print(servers_per_node(_config(args)))
        elif args.command == "check-remote":
            check_remote_servers(_config(args))
        elif args.command == "serve":
            return _serve(_config(args), args.port_base, args.log_dir, args.startup_timeout)
        elif args.command == "wait-servers":
            return _wait_servers(args.urls, args.timeout, args.watch_pid)
        elif args.command == "finished":
            return 0 if run_finished(_config(args)) else 1
    except (JobError, ValueError, FileNotFoundError) as err:
        print(f"slurm_job {args.command}: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
