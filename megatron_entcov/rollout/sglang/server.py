"""SGLang server processes: launch, wait until ready, stop; plus the Hugging Face model directory a server loads
(written from a config, or a private hard-linked copy of synced weights for a restarted server).

The servers run from their OWN virtual environment (``make sglang-env``; sglang pins a torch that cannot share
the trainer's), so this module never imports sglang: a server is a child process started with that venv's
python, reached over HTTP. Each server runs in its own process group (``start_new_session``), so stopping it
stops its scheduler and detokenizer children too, and nothing else.

Example:
    model_dir = write_hf_model_dir(cfg.model, "/tmp/policy")            # config + random weights + tokenizer
    server = SGLangServer(model_dir, port=free_port(), log_path="/tmp/sglang-0.log")
    server.start(); server.wait_ready(timeout_s=300)
    ... HTTP to server.url ...
    server.stop()
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron_entcov.rollout.sglang.http import STARTUP_LIMIT, BoundedWait, ServerError, Waiter, http_json
from megatron_entcov.rollout.sglang.protocol import routing_spec

logger = logging.getLogger(__name__)

__all__ = ["SGLANG_VERSION", "DEFAULT_SERVER_PYTHON", "DEFAULT_GPU_SERVER_PYTHON", "default_server_python",
           "server_launch_args", "server_env", "RANK_ENV_VARS", "SGLangServer", "write_hf_model_dir",
           "link_model_dir"]

SGLANG_VERSION = "0.5.23"
SGLANG_TORCH = "2.14.1"
DEFAULT_SERVER_PYTHON = str(Path.home() / ".cache" / "megatron-entcov" /
                            f"sglang-venv-{SGLANG_VERSION}-torch{SGLANG_TORCH}" / "bin" / "python")
"""Where ``make sglang-env`` (mk/sglang.mk) puts the server venv's python (slim: serves on CPU)."""
DEFAULT_GPU_SERVER_PYTHON = str(Path.home() / ".cache" / "megatron-entcov" /
                                f"sglang-gpu-venv-{SGLANG_VERSION}-torch{SGLANG_TORCH}" / "bin" / "python")
"""Where ``make sglang-env-gpu`` puts the full server venv (CUDA kernels included) for GPU servers."""


_BIND_FAILED = "error while attempting to bind on address"
"""What the server's HTTP front end logs when its port is taken; its process does not exit then."""


class PortTaken(RuntimeError):
    """A launched server's port was taken between choosing it and listening on it: launch again on a new one."""


def default_server_python(device: str = "cpu") -> str:
    """$SGLANG_PY when set (mk/sglang.mk exports it); else, for GPU servers, the full venv of
    ``make sglang-env-gpu`` when it exists; else the slim venv of ``make sglang-env``."""
    if os.environ.get("SGLANG_PY"):
        return os.environ["SGLANG_PY"]
    if device == "cuda" and Path(DEFAULT_GPU_SERVER_PYTHON).is_file():
        return DEFAULT_GPU_SERVER_PYTHON
    return DEFAULT_SERVER_PYTHON


RANK_ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun's elastic agent sets for each rank besides TORCHELASTIC_* (torch/distributed/elastic/agent/
server/local_elastic_agent.py). A server launched with them joins the rank's rendezvous instead of its own."""
RANK_ENV_PREFIXES = ("TORCHELASTIC_",)
"""Prefixes of the torchelastic agent's own variables (run id, restart count, error/timer files, agent store)."""


def server_env(base: Mapping[str, str], *, device: str, memory_saver: bool = False,
               num_threads: int | None = None) -> dict[str, str]:
    """The environment of a launched server, built from ``base`` (the rank's): the rank's distributed
    variables (``RANK_ENV_VARS``, ``TORCHELASTIC_*``) and the trainer's venv (VIRTUAL_ENV, PYTHONPATH,
    PYTHONHOME) removed, everything else kept (NCCL_DEBUG, CUDA_VISIBLE_DEVICES, TORCH_NCCL_ASYNC_ERROR_HANDLING,
    ...); OMP_NUM_THREADS set for a CPU server (``num_threads``, default half the cores); with ``memory_saver``
    SGLANG_MEMORY_SAVER_CUDA_GRAPH=1, without which --enable-memory-saver leaves CUDA-graph memory held on
    release_memory_occupation (SGLang's LD_PRELOAD of torch_memory_saver is set by SGLang itself)."""
    drop = {*RANK_ENV_VARS, "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    env = {k: v for k, v in base.items() if k not in drop and not k.startswith(RANK_ENV_PREFIXES)}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(num_threads or max(1, (os.cpu_count() or 2) // 2))
    if memory_saver:
        env["SGLANG_MEMORY_SAVER_CUDA_GRAPH"] = "1"
    return env


def server_launch_args(sg, model_cfg, device: str, *, python: str | None = None) -> dict:
    """The :class:`SGLangServer` keyword arguments (besides model dir, port and log) of every server a run
    launches, the engine's own and the SLURM server nodes' alike: ``sg`` is rollout.sglang, ``model_cfg`` the
    model section, ``device`` the resolved server device. rollout.sglang.release_memory turns on SGLang's memory
    saver (flag and environment: ``SGLangServer(memory_saver=True)``); model.moe_routing_source=rollout adds
    ``--enable-return-routed-experts`` (each reply then carries the experts of every token: protocol.py)."""
    routing = ["--enable-return-routed-experts"] if routing_spec(model_cfg) is not None else []
    return dict(python=python or default_server_python(device), device=device, dtype=model_cfg.params_dtype,
                max_total_tokens=sg.max_total_tokens or (4096 if device == "cpu" else None),
                memory_saver=bool(sg.release_memory), extra_args=["--skip-tokenizer-init", *routing, *sg.server_args])


def write_hf_model_dir(model_cfg, out_dir: str | Path, *, state_dict=None, seed: int = 0,
                       tokenizer=None) -> Path:
    """Write a Hugging Face model directory an SGLang server can load: config.json, model.safetensors and
    tokenizer files.

    Args:
        model_cfg: ModelConfig of the policy.
        out_dir: directory to create (existing files are overwritten).
        state_dict: HF-named tensors to save; None = a random init drawn from ``seed`` (the trainer syncs its
            weights before the first rollout, so the initial values do not matter).
        tokenizer: HF tokenizer to save; None = the character tokenizer of the arithmetic task.
    Returns:
        The directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.rollout.expert_names import checkpoint_named_views
    from megatron_entcov.tasks.tokenizer import build_char_tokenizer, save_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg = to_hf_config(model_cfg)
    dtype = getattr(torch, model_cfg.params_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    # Mixture-of-experts models: transformers keeps each layer's experts fused ([E, ...] parameters); the files
    # carry the per-expert checkpoint names SGLang's loaders (and the weight sync) use (rollout/expert_names.py).
    params = model.state_dict()
    views = {view: (name, t) for name, p in params.items() for view, t in checkpoint_named_views({name: p}).items()}
    if state_dict is not None:                  # checkpoint names, or transformers' fused ones
        given = dict(state_dict)
        unexpected = [k for k in given if k not in views and k not in params]
        missing = [k for k, (fused, _) in views.items() if k not in given and fused not in given
                   and not (model_cfg.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"write_hf_model_dir: state_dict does not match {type(model).__name__}: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}")
        with torch.no_grad():
            for name, value in given.items():
                (views[name][1] if name in views else params[name]).copy_(value)
    # Not model.save_pretrained: transformers 5 writes nothing on ranks other than global rank 0 once
    # torch.distributed is initialised, and every data-parallel replica's generating rank needs this directory.
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    hf_cfg.torch_dtype = dtype
    hf_cfg.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(hf_cfg).save_pretrained(str(out_dir))
    tensors = {n: t.detach().contiguous() for n, (_, t) in views.items()
               if not (model_cfg.tie_word_embeddings and n == "lm_head.weight")}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is None:
        build_char_tokenizer(out_dir)
    else:
        save_tokenizer(tokenizer, out_dir)
    return out_dir


def link_model_dir(src: str | Path, dst: str | Path) -> Path:
    """A copy of the flat model directory ``src`` at ``dst`` made of hard links (no bytes copied; deleting
    ``src`` later leaves it intact); plain copies where the file system refuses links."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    return dst


class SGLangServer:
    """One ``sglang.launch_server`` child process (its own process group), with its log in a file."""

    def __init__(self, model_dir: str | Path, *, port: int, host: str = "127.0.0.1", python: str | None = None,
                 device: str = "cpu", dtype: str | None = None, max_total_tokens: int | None = 4096,
                 extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, num_threads: int | None = None, weight_version: int = 0,
                 memory_saver: bool = False):
        """
        Args:
            model_dir: HF model directory (config.json, safetensors, tokenizer files).
            port, host: where the server listens.
            python: the server venv's python (default: default_server_python()).
            device: 'cpu' (adds --model-impl transformers: SGLang's native CPU kernels need a CPU build of
                sgl-kernel that is not on PyPI; and --sleep-on-idle) or 'cuda'.
            dtype: model and KV-cache dtype ('float32', 'bfloat16', 'float16'); None = SGLang's 'auto', which
                serves a float32 checkpoint in float16 (log-probs then differ from a float32 trainer by ~1e-3).
            max_total_tokens: KV-cache size in tokens; on CPU keep it small (without it the KV cache takes ~70%
                of RAM). None = SGLang's default.
            extra_args: more launch_server flags, passed through.
            log_path: file for the server's stdout+stderr (default: /tmp/sglang-<port>.log).
            env: the environment the server's is built from (default: this process's), by :func:`server_env`.
            num_threads: OMP_NUM_THREADS of a CPU server (default: half the cores, at least 1).
            weight_version: the version the server reports for the weights in model_dir.
            memory_saver: launch with --enable-memory-saver and SGLANG_MEMORY_SAVER_CUDA_GRAPH=1, so that
                /release_memory_occupation frees weights, KV cache and CUDA graphs (GPU servers).
        """
        self.model_dir = str(model_dir)
        self.host, self.port = host, int(port)
        self.python = python or default_server_python(device)
        self.device = device
        self.dtype = dtype
        self.num_threads = num_threads
        self.weight_version = int(weight_version)
        self.max_total_tokens = max_total_tokens
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/sglang-{self.port}.log")
        self.env = env
        self.memory_saver = bool(memory_saver)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._shm_files: set[str] = set()
        self._t_start = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server", "--model-path", self.model_dir, "--device", self.device,
               "--host", self.host, "--port", str(self.port), "--weight-version", str(self.weight_version)]
        if self.device == "cpu":
            # --sleep-on-idle: an idle scheduler otherwise spins a whole core, taken from a colocated trainer.
            cmd += ["--model-impl", "transformers", "--sleep-on-idle"]
        if self.dtype is not None:
            cmd += ["--dtype", self.dtype]
        if self.max_total_tokens is not None:
            cmd += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.memory_saver and "--enable-memory-saver" not in self.extra_args:
            cmd.append("--enable-memory-saver")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The environment :meth:`start` gives the server (:func:`server_env` of ``env`` or this process's)."""
        return server_env(os.environ if self.env is None else self.env, device=self.device,
                          memory_saver=self.memory_saver, num_threads=self.num_threads)

    def start(self) -> None:
        if not Path(self.python).is_file():
            raise FileNotFoundError(f"SGLang server python {self.python!r} does not exist; build the server venv "
                                    "with `make sglang-env` (or pass server_python=/ set $SGLANG_PY)")
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        cmd = self.command()
        logger.info("SGLang server: starting %s (log %s)", " ".join(cmd), self.log_path)
        self._t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = 300.0, *, waiter: Waiter | None = None,
                   log_every_s: float | None = None, limit: str = STARTUP_LIMIT) -> float:
        """Block until GET /model_info answers; returns the start-up seconds. Logs what it waits for (with the
        server log's last line) while it waits (``BoundedWait``), sleeping through ``waiter`` (which may raise
        to end the wait: the server is stopped then). Raises RuntimeError when the process exits or the
        time-out passes (with the log's tail; ``limit`` names the setting of ``timeout_s``)."""
        wait = BoundedWait(f"the SGLang server launched at {self.url} to load its model (log {self.log_path})",
                           timeout_s, waiter=waiter, log_every_s=log_every_s, limit=limit)
        try:
            while True:
                if not self.alive():
                    rc = self.proc.returncode if self.proc else None
                    raise RuntimeError(f"SGLang server {self.url} exited (rc={rc}) during start-up; log "
                                       f"{self.log_path}:\n{self.log_tail()}")
                try:
                    http_json(self.url, "/model_info", timeout=5)
                except ServerError as err:
                    last = self.log_tail(1).strip() or err.reason
                    if _BIND_FAILED in self.log_tail(5):   # the process lives on but will never answer
                        raise PortTaken(f"SGLang server {self.url} could not listen on port {self.port}: another "
                                        f"process took it after it was chosen; log {self.log_path}")
                else:
                    self._record_shm()
                    self.startup_s = time.monotonic() - self._t_start
                    logger.info("SGLang server %s ready after %.1f s", self.url, self.startup_s)
                    return self.startup_s
                if wait.expired():
                    raise RuntimeError(f"SGLang server {self.url} not ready after {wait.limit_text()}; raise "
                                       f"{limit} if it is still loading; log {self.log_path}:\n"
                                       f"{self.log_tail()}")
                wait.pause(1.0, last)
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL the server's processes at once (also what a crash looks like: tests use it)."""
        self.stop()

    def stop(self) -> None:
        """SIGKILL every process of the server but Python's multiprocessing resource tracker, which then unlinks
        the semaphores they leave once they are gone; then remove the shared-memory files the server had open.
        Idempotent. Why no SIGTERM first: the launcher ignores it while its children live, and its own shutdown
        path kills the resource tracker first, leaking /dev/shm/sem.mp-* files; a rollout server has no state
        worth a graceful exit."""
        if self.proc is None:
            return
        self._record_shm()
        self._signal_group(signal.SIGKILL, spare_tracker=True)
        if self.proc.poll() is None:
            self.proc.wait()
        self._wait_group_gone(10.0)
        self._finish()

    def _finish(self) -> None:
        self._signal_group(signal.SIGKILL, spare_tracker=False)     # whatever is left, tracker included
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait()
        for path in self._shm_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._shm_files = set()

    def _group_pids(self) -> list[int]:
        if self.proc is None:
            return []
        return _pids_in_group(self.proc.pid)

    def _signal_group(self, sig: int, *, spare_tracker: bool) -> None:
        for pid in self._group_pids():
            if spare_tracker and "resource_tracker" in _cmdline(pid):
                continue
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait_group_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None:
                self.proc.poll()                 # reap the leader, or it stays a zombie in the group
            if not [p for p in self._group_pids() if not _is_zombie(p)]:
                return True
            time.sleep(0.2)
        return False

    def _record_shm(self) -> None:
        """Remember the /dev/shm/sglang_loads_*.shm files the server's processes have open or mapped: a killed
        server leaves them behind, and their names do not say whose they are."""
        for pid in self._group_pids():
            try:
                with open(f"/proc/{pid}/maps") as f:
                    self._shm_files.update(line.split()[-1] for line in f if "/dev/shm/sglang_loads_" in line)
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/sglang_loads_"):
                        self._shm_files.add(target)
            except OSError:
                continue


def _pids_in_group(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:               # fields after the command: state, ppid, pgrp, ...
            out.append(int(entry))
    return out


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
