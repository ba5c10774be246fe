"""The SGLang rollout engine: the rollout protocol (``rollout/engine.py``) over HTTP to SGLang servers.

:class:`SGLangEngine` launches and supervises its servers (``server.py``, ``pool.py``), attaches to given URLs,
or generates through an ``sglang-router``; configured by ``rollout.sglang`` (``SGLangConfig``). The trainer
never imports sglang: JSON over stdlib HTTP (``http.py``, ``protocol.py``). One ``/generate`` request per
prompt entry on a bounded request executor, to the least-loaded live server, retried with backoff elsewhere
on failure (NoServerLeftError when none is left). Log-probs follow ``rollout/types.py``; greedy (top_k=1) is
refused with a temperature other than 1, for which SGLang reports another definition. Weight syncs
(``transports.py``) run pause -> begin -> transport -> end -> version -> flush -> continue on every server,
and every server's weight_version must then equal the new version.

Design notes: docs/design/rollout.md (and docs/sglang.md: the server venv, flags, measurements)
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_entcov.config import SGLangConfig, server_tp
from megatron_entcov.distributed.net import free_port
from megatron_entcov.rollout.engine import NamedTensors, RolloutEngine, validate_prompts, validate_seeds
from megatron_entcov.rollout.sglang.http import (
    Fanout,
    NoServerLeftError,
    ServerError,
    Waiter,
    http_json,
    sleep_waiter,
    wait_answering,
)
from megatron_entcov.rollout.sglang.placement import (
    colocated_gpu_ids,
    replica_server_urls,
    resolve_device,
    router_workers,
)
from megatron_entcov.rollout.sglang.pool import LIVE, STALE, Server, ServerPool
from megatron_entcov.rollout.sglang.protocol import (
    generate_payload,
    generate_payloads,
    parse_generate,
    parse_version,
    request_seed,
    routing_spec,
)
from megatron_entcov.rollout.sglang.server import (
    SGLangServer,
    default_server_python,
    link_model_dir,
    server_launch_args,
    write_hf_model_dir,
)
from megatron_entcov.rollout.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["SGLangEngine", "ServerError", "NoServerLeftError", "http_json"]

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""What /release_memory_occupation can give back (sglang/srt/constants.py)."""


def _check_settings(cfg: SGLangConfig, device: str, gpu_ids, *, max_retries: int, backoff_s: float) -> None:
    """ValueError naming the setting and the fix for limits or a server layout the engine cannot run."""
    if max_retries < 0 or backoff_s < 0:
        raise ValueError(f"SGLangEngine: max_retries={max_retries} (must be >= 0), backoff_s={backoff_s} "
                         "(>= 0): pass valid limits")
    if cfg.release_memory and device != "cuda":
        raise ValueError(f"SGLangEngine: rollout.sglang.release_memory=True needs GPU servers (server_device "
                         f"resolved to {device!r}); SGLang's memory saver does not exist on CPU: set "
                         "rollout.sglang.release_memory=false")
    if gpu_ids is not None and not cfg.server_urls and len(gpu_ids) != cfg.num_servers:
        gpu_ids = list(gpu_ids)
        raise ValueError(f"SGLangEngine: gpu_ids={gpu_ids} names {len(gpu_ids)} GPUs for "
                         f"rollout.sglang.num_servers={cfg.num_servers}: give one first GPU per server")


def _check_distributed_sync(cfg: SGLangConfig, device: str, gpu_ids, python: str) -> None:
    """The 'distributed' weight sync over NCCL (this process sees a GPU; launched CPU servers sync over gloo and are
    not checked): launched GPU servers must not share this
    process's GPU (NCCL refuses two ranks of one group on a GPU: "Duplicate GPU detected"), and this process
    and the servers must load one NCCL version (transports.check_nccl_versions). ValueError/RuntimeError."""
    import torch

    from megatron_entcov.rollout.sglang.transports import check_nccl_versions

    if cfg.sync_method != "distributed" or not torch.cuda.is_available():
        return
    launched = not cfg.server_urls and not cfg.router_url
    if launched and device == "cpu":
        return                  # CPU servers: the group is gloo (transports.choose_sync_backend), no NCCL to match
    if launched and device == "cuda":
        mine, tp = torch.cuda.current_device(), server_tp(cfg.server_args)
        firsts = list(gpu_ids) if gpu_ids is not None else [0] * cfg.num_servers
        if any(first <= mine < first + tp for first in firsts):
            raise ValueError(f"SGLangEngine: rollout.sglang.sync_method=distributed with servers launched on this "
                             f"process's GPU {mine} (first GPUs {firsts}, rollout.sglang.server_device=cuda): NCCL "
                             "refuses two ranks of the weight-sync group on one GPU; set rollout.sglang.sync_method="
                             "tensor (CUDA IPC, made for colocated servers), or run the servers on other GPUs")
    check_nccl_versions(python if launched else None,
                        f"the launched SGLang servers ({python})" if launched else
                        "the SGLang servers at rollout.sglang.server_urls / router_url")


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang servers over HTTP; implements ``RolloutEngine`` (docs/design/rollout.md).

    Args:
        model_cfg: ModelConfig of the policy (vocabulary, lengths, dtype for weight syncs).
        sglang: the servers and the weight transport (``SGLangConfig``, ``rollout.sglang``): ``server_urls`` are
            THIS engine's servers (``from_config`` splits a run's between replicas); empty = launch
            ``num_servers``. None = ``SGLangConfig()``. ``server_device='auto'`` is resolved here.
        model_dir: HF model directory the launched servers load; None = write one with random weights and
            the character tokenizer into a temporary directory (the trainer syncs its weights before the
            first rollout). Ignored with server URLs.
        gpu_ids: GPU servers: the first GPU of each launched server (``--base-gpu-id``; a server with
            ``--tp-size k`` takes k GPUs from there); None = SGLang's default, GPU 0.
        sync_dir: where the 'disk' method writes its temporary safetensors (default: the system temp dir;
            the servers must be able to read it: local servers or a shared file system).
        sync_master_address: address the servers reach this process at for 'distributed' (default:
            ``rollout.sglang.sync_master_addr``, else transports.choose_master_address: 127.0.0.1 when every
            server is local, else the local address of the route to the first remote server).
        log_dir: server logs (default: a temporary directory).
        seed: engine seed, mixed with a call counter when SamplingParams.seed is None.
        server_python: the server venv's python (default: $SGLANG_PY, else the ``make sglang-env`` path).
        waiter: how the waits for servers (start-up, a restart) sleep between attempts (``http.Waiter``); the
            trainer passes ``run.stop.wait_or_stop``, which ends them when the process is asked to stop.
            Default: time.sleep. Their limit is ``rollout.sglang.startup_timeout_s``.
        backoff_s: first retry delay of a failed request; doubles per retry, with jitter.
        max_retries: retries of one request after failures on live servers (failover away from a dead
            server does not count).

    Example:
        engine = SGLangEngine(cfg.model, SGLangConfig(num_servers=2))     # writes a random-init HF dir, launches
        samples = engine.generate(prompts, SamplingParams.from_config(cfg.sampling, seed=step))
        engine.update_weights(iter_hf_weights(...), version=step + 1)       # pause, load, set version, resume
        assert engine.health()["weight_version"] == step + 1
        engine.close()                                                      # stops the servers it launched
    """

    def __init__(self, model_cfg, sglang: SGLangConfig | None = None, *, model_dir: str | Path | None = None,
                 gpu_ids: Sequence[int] | None = None, sync_dir: str | Path | None = None,
                 sync_master_address: str | None = None, log_dir: str | Path | None = None, seed: int = 0,
                 server_python: str | None = None, backoff_s: float = 0.5, max_retries: int = 3,
                 waiter: Waiter | None = None):
        cfg = sglang if sglang is not None else SGLangConfig()
        device = resolve_device(cfg.server_device)
        _check_settings(cfg, device, gpu_ids, max_retries=max_retries, backoff_s=backoff_s)
        _check_distributed_sync(cfg, device, gpu_ids, server_python or default_server_python(device))
        self.model_cfg = model_cfg
        self.routing = routing_spec(model_cfg)
        """model.moe_routing_source=rollout: each reply's routing, checked against this (protocol.RoutingSpec)."""
        self.request_timeout_s = float(cfg.request_timeout_s)
        self.max_inflight = int(cfg.max_inflight)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.seed = int(seed)
        self.sync_method = cfg.sync_method
        self.sync_dir = str(sync_dir) if sync_dir else None
        # None: transports.choose_master_address picks the address the route to the servers leaves from.
        self.sync_master_address = sync_master_address or cfg.sync_master_addr or None
        self.sync_only_changed = False     # weight_sync.only_changed (from_config): leave out unchanged tensors
        self.release_memory_enabled = bool(cfg.release_memory)
        self._tmp = Path(tempfile.mkdtemp(prefix="sglang-engine-"))
        self._sync_lock = threading.Lock()     # one sync at a time
        self._paused = threading.Event()
        self._closed = False
        self._calls = 0
        self._weight_version = 0
        self._synced = False               # a sync has succeeded: a restarted server's initial weights are stale
        self._kept: tuple[Path, int] | None = None      # the last complete disk-synced weights (keep_weights)
        self._kept_lock = threading.Lock()
        self._private_dirs: list[str] = []
        self._transport = None
        self._seen: set[str] = set()
        self._released: set[str] = set()
        self.last_sync: dict = {}
        self.last_generate: dict = {}
        self.startup_s: list[float] = []
        self.model_dir: str | None = None      # what launched servers load; None with given URLs
        self.pool: ServerPool | None = None    # the servers
        self.router: Server | None = None
        self._router_lock = threading.Lock()
        self._requests: ThreadPoolExecutor | None = None     # runs the /generate requests
        self._launch_args = server_launch_args(cfg, model_cfg, device, python=server_python)
        self._log_dir = Path(log_dir) if log_dir else self._tmp / "logs"
        self._gpu_ids = list(gpu_ids) if gpu_ids is not None else None
        self._waiter = waiter or sleep_waiter

        servers = self._start_servers(cfg, model_dir, seed=seed)

        self._requests = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="sglang-req")
        logger.info("SGLangEngine: %d servers %s (%s%s), max_inflight=%d, timeout=%.0fs, sync=%s, start-up %s s",
                    len(servers), [s.url for s in servers], "given" if self.model_dir is None else "launched",
                    f", generation through the router {self.router.url}" if self.router else "",
                    self.max_inflight, self.request_timeout_s, self.sync_method,
                    [round(t, 1) for t in self.startup_s])

    # ------------------------------------------------------------------------------------------------ start-up

    def _start_servers(self, cfg: SGLangConfig, model_dir: str | Path | None, *, seed: int) -> list[Server]:
        """The engine's servers, answering and agreeing on one weight version: attached at ``server_urls`` (or
        the router's workers), else ``num_servers`` launched here; each may take ``startup_timeout_s``. On any
        failure (or a stop while waiting) everything started so far is stopped (``close``) and the error
        re-raised."""
        startup_timeout_s = cfg.startup_timeout_s
        try:
            server_urls = list(cfg.server_urls)
            names = [f"rollout.sglang.server_urls[{i}]" for i in range(len(server_urls))]
            fix = {}
            if cfg.router_url:
                self.router = Server(url=cfg.router_url.rstrip("/"), index=-1)
                if not server_urls:
                    server_urls = router_workers(self.router.url, startup_timeout_s, waiter=self._waiter)
                    names = ["a worker of rollout.sglang.router_url"] * len(server_urls)
                    fix = {"fix": "check the router's --worker-urls"}
            servers: list[Server] = []
            # Built first, so that close() reaches servers launched before a failure.
            self.pool = ServerPool(servers, launch=self._launch if not server_urls else None,
                                   max_restarts=cfg.max_server_restarts, startup_timeout_s=startup_timeout_s,
                                   is_current=self._is_current, on_ready=self._restarted, waiter=self._waiter)
            if server_urls:
                servers.extend(Server(url=u.rstrip("/"), index=i) for i, u in enumerate(server_urls))
                for s, name in zip(servers, names):
                    wait_answering(s.url, startup_timeout_s, name=name, waiter=self._waiter, **fix)
            else:
                if model_dir is None:
                    model_dir = write_hf_model_dir(self.model_cfg, self._tmp / "init_model", seed=seed)
                self.model_dir = str(model_dir)
                self._launch_servers(servers, cfg.num_servers, startup_timeout_s)
            self._weight_version = self._agreed_version(servers)
        except BaseException:
            self.close()
            raise
        return servers

    def _launch_servers(self, servers: list[Server], num_servers: int, startup_timeout_s: float) -> None:
        """Launch ``num_servers`` into ``servers`` (the pool's list), all before waiting: start-ups overlap."""
        for i in range(num_servers):
            s = Server(url="", index=i)
            s.proc = self._launch(s)
            s.url = s.proc.url
            servers.append(s)
        self.startup_s = [s.proc.wait_ready(startup_timeout_s, waiter=self._waiter) for s in servers]

    def _agreed_version(self, servers: list[Server]) -> int:
        """The weight version every server reports; RuntimeError when they differ (different weights)."""
        versions = {s.url: self._server_version(s) for s in servers}
        if len(set(versions.values())) != 1:
            raise RuntimeError(f"SGLangEngine: servers report different weight versions {versions}; they hold "
                               "different weights: restart them from one checkpoint, or give only servers of "
                               "one run in rollout.sglang.server_urls")
        return next(iter(versions.values()))

    def _launch(self, s: Server) -> SGLangServer:
        """Start a server process for slot ``s`` on a fresh port (not waiting for it): from the last weights
        the 'disk' transport synced when there are any (a private hard-linked copy, so the next sync may
        retire them meanwhile), else from the initial model directory."""
        port = free_port()
        args = dict(self._launch_args)
        if self._gpu_ids is not None:          # a restarted server keeps its slot's GPUs
            args["extra_args"] = [*args["extra_args"], "--base-gpu-id", str(self._gpu_ids[s.index])]
        model_dir, version = self.model_dir, 0
        with self._kept_lock:
            if self._kept is not None:
                src, version = self._kept
                model_dir = str(link_model_dir(src, src.parent / f"{src.name}-restart{s.index}-{port}"))
                self._private_dirs.append(model_dir)
        s.weights_version = version
        proc = SGLangServer(model_dir, port=port, log_path=self._log_dir / f"server{s.index}-{port}.log",
                            weight_version=version, **args)
        proc.start()
        return proc

    def _restarted(self, s: Server) -> None:
        """A restarted server is ready: its private weights copy can go; while the others' GPU memory is
        released, it releases its own too (a colocated server must not hold memory while the trainer trains)."""
        if s.proc.model_dir in self._private_dirs:        # loaded: the server holds the weights now
            shutil.rmtree(s.proc.model_dir, ignore_errors=True)
            self._private_dirs.remove(s.proc.model_dir)
        if self._released:
            http_json(s.url, "/release_memory_occupation", {"tags": sorted(self._released)}, timeout=120)

    def keep_weights(self, directory: str | Path | None, version: int | None) -> None:
        """Called by the 'disk' transport after a complete sync: ``directory`` holds every weight of
        ``version``; restarted servers launch from it. The previously kept directory is deleted; None
        forgets (and deletes) it. Only an engine that launches its servers (it has a model_dir) keeps anything."""
        new = None if directory is None or self.model_dir is None else (Path(directory), version)
        with self._kept_lock:
            old, self._kept = self._kept, new
        if old is not None:
            shutil.rmtree(old[0], ignore_errors=True)
        if directory is not None and new is None:
            shutil.rmtree(directory, ignore_errors=True)

    def _is_current(self, s: Server) -> bool:
        """A restarted server holds the current weights: no sync yet, or it loaded the last synced ones."""
        return not self._synced or s.weights_version == self._weight_version

    @classmethod
    def from_config(cls, cfg, *, dp_rank: int = 0, dp_size: int = 1, **overrides) -> SGLangEngine:
        """The engine a run config asks for (``cfg.rollout.sglang``), for data-parallel replica ``dp_rank``.

        Launched servers (no ``server_urls``): ``num_servers`` per replica, loading ``cfg.model.hf_dir`` (or
        random weights: the trainer syncs before the first rollout), logging into ``<run_dir>/sglang/``; GPU
        servers go on this replica's own GPUs (``colocated_gpu_ids``).
        Given URLs are split between the replicas: replica r gets ``server_urls[r::dp_size]`` (each replica
        pushes its weights to its own servers; two replicas syncing one server would interleave).
        The 'disk' transport writes under ``rollout.sync_dir`` (shared storage for servers on other nodes).
        ``overrides`` go to the constructor.
        """
        sg = cfg.rollout.sglang
        if sg.router_url and dp_size > 1:
            raise ValueError(f"rollout.sglang.router_url={sg.router_url!r} with {dp_size} data-parallel replicas: "
                             "a router spreads every replica's requests over all its workers, including those "
                             "another replica is syncing; give each replica its own servers "
                             "(rollout.sglang.server_urls, no router) or use dp=1")
        device = resolve_device(sg.server_device)
        gpu_ids = None
        if device == "cuda" and not sg.server_urls and not sg.router_url:
            gpu_ids = colocated_gpu_ids(sg.num_servers, list(sg.server_args))
        replica = dataclasses.replace(sg, server_device=device,
                                      server_urls=replica_server_urls(sg.server_urls, dp_rank, dp_size))
        kwargs = dict(model_dir=cfg.model.hf_dir, gpu_ids=gpu_ids, seed=cfg.seed + 7 * dp_rank,
                      log_dir=Path(cfg.run_dir) / "sglang" / (f"dp{dp_rank}" if dp_size > 1 else ""),
                      sync_dir=cfg.rollout.sync_dir or None)
        kwargs.update(overrides)
        engine = cls(cfg.model, replica, **kwargs)
        engine.sync_only_changed = bool(cfg.weight_sync.only_changed)
        return engine

    # ------------------------------------------------------------------------------------------------ state

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def servers(self) -> list[Server]:
        return self.pool.servers if self.pool is not None else []

    def live_servers(self) -> list[Server]:
        return self.pool.live()

    def wait_restarts(self, timeout_s: float = 600.0) -> bool:
        """Block until no server restart is in progress; True when none is left."""
        return self.pool.wait_restarts(timeout_s)

    def pause(self) -> None:
        """In-flight responses end with 'abort' (servers abort them); generate raises until resume()."""
        self._paused.set()
        self.pool.post_all(self.live_servers(), "/pause_generation", {"mode": "abort"}, check=False)

    def resume(self) -> None:
        self._paused.clear()
        self.pool.post_all(self.live_servers(), "/continue_generation", {}, check=False)

    def health(self) -> dict:
        servers = []
        for s in self.servers:
            info = {"url": s.url, "state": s.state, "alive": s.alive, "requests": s.requests,
                    "failures": s.failures, "restarts": s.restarts, "generated_tokens": s.generated_tokens,
                    "last_error": s.last_error}
            if s.state in (LIVE, STALE) and not self._closed:
                try:
                    info["weight_version"] = self._server_version(s, timeout=10)
                except ServerError as err:
                    info["error"] = str(err)
            servers.append(info)
        return {"ok": not self._closed and any(s.alive for s in self.servers), "weight_version": self._weight_version,
                "engine": "sglang", "paused": self._paused.is_set(), "released": sorted(self._released),
                "servers": servers, "last_sync": self.last_sync, "last_generate": self.last_generate}

    def server_stats(self) -> list[dict]:
        """Cumulative per-server counters, cheap (no HTTP): name ('server<i>', or 'router' for what went
        through a router), url, state, generated_tokens, requests, restarts."""
        out = [{"name": f"server{s.index}", "url": s.url, "state": s.state, "generated_tokens": s.generated_tokens,
                "requests": s.requests, "restarts": s.restarts} for s in self.servers]
        if self.router is not None:
            r = self.router
            out.append({"name": "router", "url": r.url, "state": "router", "generated_tokens": r.generated_tokens,
                        "requests": r.requests, "restarts": 0})
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._requests is not None:
            self._requests.shutdown(wait=False, cancel_futures=True)
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception as err:  # closing must not mask the caller's error
                logger.warning("SGLangEngine: closing the weight transport failed: %s", err)
        if self.pool is not None:
            self.pool.close()
        self.keep_weights(None, None)
        for d in self._private_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SGLangEngine is closed")

    # ------------------------------------------------------------------------------------------------ servers

    def _server_version(self, s: Server, timeout: float = 30.0) -> int:
        return parse_version(http_json(s.url, "/model_info", timeout=timeout).get("weight_version"))

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> list[Sample]:
        """One Sample per prompt entry, in order (``Sample.index`` = position in ``prompts``).

        Args:
            seeds: None, or one integer >= 0 per entry: request i's ``sampling_seed`` is then
                ``request_seed(seeds[i])``, whatever the entry's index, call, server or replica
                (``protocol.request_seeds``); ``params.seed`` is not used. None = ``request_seed(base, i)`` with
                base = params.seed, else mixed from the engine seed and its call counter.
        Raises:
            ValueError for a bad prompt (naming its index), bad seeds or top_k=1 with temperature != 1;
            RuntimeError when paused, released or closed, NoServerLeftError when every server died, ServerError
            when a request failed more than ``max_retries`` times on live servers.
        """
        self._check_open()
        params, prompts = self._check_request(prompts, params)
        seeds = validate_seeds(seeds, len(prompts))
        if not prompts:
            return []
        call = self._calls
        self._calls += 1
        base = request_seed(self.seed, call) if params.seed is None else int(params.seed)
        t0 = time.monotonic()
        before = {x["name"]: x["generated_tokens"] for x in self.server_stats()}
        payloads = generate_payloads(prompts, params, base=base, seeds=seeds, routing=self.routing is not None)
        futures = [self._requests.submit(self._generate_one, i, p, payload)
                   for i, (p, payload) in enumerate(zip(prompts, payloads))]
        samples, first_error = [], None
        for f in futures:                      # wait for all, so no request outlives the call
            try:
                samples.append(f.result())
            except BaseException as err:
                first_error = first_error or err
        if first_error is not None:
            raise first_error
        dt = time.monotonic() - t0
        n_tok = sum(x.num_response_tokens for x in samples)
        # Per-server generation throughput of this call: each server's tokens over the call's wall time.
        self.last_generate = {"seconds": dt, "tokens": n_tok, "tokens_per_s": n_tok / max(dt, 1e-9),
                              "server_tokens_per_s": {x["name"]: (x["generated_tokens"] - before.get(x["name"], 0))
                                                      / max(dt, 1e-9) for x in self.server_stats()}}
        return samples

    def _check_request(self, prompts, params: SamplingParams):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params is a {type(params).__name__}; expected SamplingParams")
        if params.top_k == 1 and params.temperature != 1.0:
            raise ValueError(f"generate: top_k=1 (greedy) with temperature={params.temperature}: SGLang reports "
                             "greedy log-probs without the temperature; use temperature=1.0 for greedy decoding")
        prompts = validate_prompts(prompts, params, self.model_cfg)
        if self._paused.is_set():
            raise RuntimeError("generate: the engine is paused; call resume() first")
        if self._released:
            raise RuntimeError(f"generate: the servers' GPU memory is released ({sorted(self._released)}); call "
                               "resume_memory() first")
        return params, prompts

    def _generate_one(self, index: int, prompt: list[int], payload: dict) -> Sample:
        retries, avoid = 0, None
        while True:
            if self._closed:
                raise RuntimeError("SGLangEngine is closed")
            if self._paused.is_set():       # not sent yet: a paused server would hold it until resume()
                return Sample(prompt_ids=list(prompt), response_ids=[], rollout_logprobs=[], finish_reason="abort",
                              weight_version=self._weight_version, index=index)
            s = self.router if self.router is not None else self.pool.pick(avoid)
            sample = None
            try:
                out = http_json(s.url, "/generate", payload, timeout=self.request_timeout_s)
                sample = parse_generate(out, prompt, index, self.routing)
                if sample.finish_reason == "abort" and not self._paused.is_set():
                    # Not our pause: the server aborted it (overload, a weight update with abort, shutdown).
                    raise ServerError(s.url, "/generate", f"aborted by the server: {out.get('meta_info', {})}")
                return sample
            except ServerError as err:
                sample = None
                if not err.retryable:
                    raise
                if s is not self.router:
                    self.pool.mark_failure(s, err, generation=True)
                avoid = s
                if s.alive:                   # failover from a dead server does not use up the retries
                    retries += 1
                    if retries > self.max_retries:
                        raise ServerError(s.url, "/generate", f"prompt {index} failed {retries} times; last: {err}")
                    time.sleep(self.backoff_s * 2 ** (retries - 1) * (0.5 + random.random()))
                logger.info("SGLangEngine: prompt %d retried after %s", index, err)
            finally:
                tokens = sample.num_response_tokens if sample else 0
                if s is self.router:
                    with self._router_lock:
                        s.requests += sample is not None
                        s.generated_tokens += tokens
                else:
                    self.pool.release(s, tokens=tokens, ok=sample is not None)

    def probe(self, prompt: Sequence[int], params: SamplingParams) -> list[tuple[str, Sample]]:
        """Send one request to EVERY live server (no failover): ``[(url, sample)]``. The weight-sync check
        (weights/probe.py) compares each server's log-probs with the trainer's."""
        self._check_open()
        params, prompts = self._check_request([prompt], params)
        payload = generate_payload(prompts[0], params, seed=int(params.seed or 0))
        servers = self.live_servers()
        if not servers:
            raise NoServerLeftError("probe: no SGLang server left")
        replies = Fanout([s.url for s in servers], "/generate", payload, timeout=self.request_timeout_s).wait()
        out = []
        for s in servers:
            reply = replies[s.url]
            err = reply.get("error")
            if isinstance(err, ServerError) and err.retryable:
                self.pool.mark_failure(s, err)
                if not s.alive:               # died after the sync: its replacement is probed after its sync
                    continue
            if err is not None:
                raise RuntimeError(f"probe: {s.url}/generate failed: {err}")
            out.append((s.url, parse_generate(reply, prompts[0], 0)))
        if not out:
            raise NoServerLeftError("probe: every SGLang server died: " + "; ".join(
                f"{s.url}: {s.last_error}" for s in servers))
        return out

    # ------------------------------------------------------------------------------------------------ memory

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated GPU mode: the servers give back their GPU memory (default: weights, KV cache and CUDA
        graphs) so the trainer can use it; generate raises until ``resume_memory`` brought everything back."""
        self._check_open()
        tags = self._memory_tags(tags, "release_memory")
        todo = [t for t in tags if t not in self._released]
        if todo:
            self._memory_call("/release_memory_occupation", todo)
            self._released.update(todo)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Give the servers their GPU memory back (default: everything released). Weights before a sync;
        the KV cache and CUDA graphs after it, once the trainer's sync buffers are gone."""
        self._check_open()
        tags = self._memory_tags(tags, "resume_memory")
        todo = [t for t in tags if t in self._released]
        if todo:
            self._memory_call("/resume_memory_occupation", todo)
            self._released.difference_update(todo)

    def _memory_call(self, path: str, tags: list[str]) -> None:
        """Live servers must succeed; stale ones (a restarted server, released on start-up; a re-admitted one,
        whose memory state is its own) are told without checking."""
        servers = self.pool.standing()
        self.pool.post_all([s for s in servers if s.state == LIVE], path, {"tags": tags})
        self.pool.post_all([s for s in servers if s.state == STALE], path, {"tags": tags}, check=False)

    def _memory_tags(self, tags, what: str) -> list[str]:
        if not self.release_memory_enabled:
            raise RuntimeError(f"{what}: the servers were not launched with --enable-memory-saver; set "
                               "rollout.sglang.release_memory=true (GPU servers only)")
        tags = list(MEMORY_TAGS if tags is None else tags)
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise ValueError(f"{what}: unknown memory tags {bad}; choose from {list(MEMORY_TAGS)}")
        return tags

    # ------------------------------------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load HF-named full tensors into every live (and stale) server; afterwards every server's
        weight_version == version.

        Buckets are streamed (a generator that gathers lazily is consumed as it goes). Unknown names or wrong
        shapes raise ValueError naming the tensor; on any error the iterable is first run to its end (a
        producer running gather collectives must not be left hanging) and the version is unchanged. The first
        sync must send every tensor. A server that dies during the sync is dropped from it (the others still
        get the weights; with 'distributed' the sync fails instead: see transports.py); a restarted
        server gets the next sync that sends every tensor, and is live again after it.
        """
        try:
            self._update_weights(named_tensors, version)
        except BaseException:
            for _ in named_tensors if not isinstance(named_tensors, dict) else ():
                pass
            raise

    def _update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        from megatron_entcov.rollout.sglang.transports import TransportContext, build_transport, expected_shapes

        self._check_open()
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"update_weights: version={version!r} is invalid: must be an integer >= 0")
        if "weights" in self._released:
            raise RuntimeError("update_weights: the servers' weights memory is released; call "
                               "resume_memory(['weights']) first")
        with self._sync_lock:
            if self._transport is None:
                self._transport = build_transport(self.sync_method, TransportContext(
                    model_cfg=self.model_cfg, pool=self.pool, shapes=expected_shapes(self.model_cfg),
                    sync_dir=self.sync_dir, model_dir=self.model_dir, master_address=self.sync_master_address,
                    keep_weights=self.keep_weights, only_changed=self.sync_only_changed))
            targets = self.pool.syncable()
            if not targets:
                raise NoServerLeftError("update_weights: no SGLang server left: " + "; ".join(
                    f"{s.url}: {s.state} {s.last_error}" for s in self.servers))
            t0 = time.monotonic()
            targets, stats = self._sync_servers(targets, named_tensors, version)
            versions = {s.url: self._server_version(s) for s in targets}
            wrong = {u: v for u, v in versions.items() if v != version}
            if wrong or not versions:
                raise RuntimeError(f"update_weights: servers report weight versions {wrong or versions} after the "
                                   f"sync to version {version}: another client changed them, or every server "
                                   "died during the sync; see the servers' logs (<run_dir>/sglang/)")
            if stats.get("complete"):
                self.pool.promote(targets)
            self.pool.demote([s for s in self.pool.live() if s not in targets])
            self._weight_version = version
            self._synced = True
            self._transport.commit()          # weight_sync.only_changed compares the next sync with this one
            dt = time.monotonic() - t0
            self.last_sync = dict(stats, method=self.sync_method, seconds=dt, servers=len(versions),
                                  bytes_per_s=stats.get("bytes", 0) / max(dt, 1e-9))
        logger.info("SGLangEngine: weights v%d to %d servers by %s: %.2f MB in %.2f s", version, len(versions),
                    self.sync_method, stats.get("bytes", 0) / 1e6, dt)

    def _sync_servers(self, targets: list[Server], named_tensors: NamedTensors,
                      version: int) -> tuple[list[Server], dict]:
        """One weight sync to ``targets``: pause -> begin -> transport -> end -> version -> flush -> continue.
        Returns the servers that took all of it (a server that died or came back meanwhile drops out) and the
        transport's stats; on a failure, the servers end the update with their old version."""
        # A server that dies and comes back (new process, new URL) during the sync missed part of it: only
        # the processes that were there from the start stay in it.
        ident = {s: (s.url, s.restarts) for s in targets}

        def keep(servers: list[Server]) -> list[Server]:
            return [s for s in servers if ident.get(s) == (s.url, s.restarts) and s.state in (LIVE, STALE)]

        user_paused = self._paused.is_set()
        if not user_paused:
            targets = keep(self.pool.post_all(targets, "/pause_generation", {"mode": "abort"}, check=False))
        try:
            try:
                targets = keep(self.pool.post_all(targets, "/begin_weight_update", {"selector": "all"}))
                stats = self._transport.sync(named_tensors, version, self._seen, targets)
            except BaseException:
                self.pool.post_all(keep(targets), "/end_weight_update", {}, check=False)   # the version stays
                raise
            targets = keep(targets)
            targets = keep(self.pool.post_all(targets, "/end_weight_update", {}))
            targets = keep(self.pool.post_all(targets, "/update_weight_version", {"new_version": str(version)}))
            targets = keep(self.pool.post_all(targets, "/flush_cache", {}))
        finally:
            if not user_paused:
                self.pool.post_all(self.pool.standing(), "/continue_generation", {}, check=False)
        return targets, stats
