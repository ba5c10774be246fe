"""The SGLang rollout engine: the rollout protocol (``rollout/engine.py``) over HTTP to SGLang servers.

Servers are either launched and supervised here (``num_servers`` local children from the server venv built by
``make sglang-env``; see ``rollout/sglang_server.py``) or reached at given URLs (servers started elsewhere, e.g.
a SLURM job component). The trainer process never imports sglang: requests are JSON over stdlib ``urllib``.

Generation: one HTTP ``/generate`` request per prompt entry (n=1; the caller repeats a prompt n times), with
token ids in (``input_ids``) and token ids and log-probs out (``output_ids``,
``meta_info.output_token_logprobs``): no re-tokenisation. The servers run with ``--skip-tokenizer-init``, so
only ``stop_token_ids`` (and the model's own ``eos_token_id`` from config.json / generation_config.json, which
SGLang always honours) end a response. Requests run on a thread pool of ``max_inflight`` workers (the bound on
in-flight work over all servers); each goes to the live server with the fewest requests in flight. A failed
request (connection error, time-out, HTTP 5xx, or an 'abort' the engine did not ask for) is retried with
exponential backoff on another server; a server whose process died or whose /health stops answering is marked
dead and its requests go to the others; when no server is left, ``generate`` raises RuntimeError naming every
server and its last error. Sampling seeds are per request: ``mix(seed, index)`` so repeated prompts differ.

Log-probs: SGLang returns log(softmax(logits / temperature)) of the sampled token over the full vocabulary,
before top-p/top-k (sampler.py, standard path), the definition in ``rollout/types.py``. Exception: greedy
requests (top_k=1) get log_softmax(logits) WITHOUT the temperature; the engine rejects top_k=1 with a
temperature other than 1 rather than return log-probs with another definition.

Weights (``update_weights``): see ``megatron_entcov/weight_sync_sglang.py`` for the transports ('disk':
safetensors in a temporary directory + ``/update_weights_from_disk``; 'distributed': a gloo/NCCL group with the
servers + ``/update_weights_from_distributed`` while this process broadcasts). Every sync is wrapped per server
in pause_generation -> begin_weight_update -> transport -> end_weight_update -> update_weight_version ->
continue_generation, and verified: every live server's ``/model_info`` weight_version equals ``version``.

Example:
    engine = SGLangEngine(cfg.model, num_servers=2, model_dir=None)    # writes a random-init HF dir, launches
    samples = engine.generate(prompts, SamplingParams.from_config(cfg.sampling, seed=step))
    engine.update_weights(iter_hf_weights(...), version=step + 1)       # pause, load, set version, resume
    assert engine.health()["weight_version"] == step + 1
    engine.close()                                                      # stops the servers it launched
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_entcov.rollout.engine import NamedTensors, validate_prompts
from megatron_entcov.rollout.sglang_server import SGLangServer, default_server_python, free_port, write_hf_model_dir
from megatron_entcov.rollout.types import Sample, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["SGLangEngine", "ServerError", "NoServerLeftError"]

_MASK64 = (1 << 63) - 1


def _mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h ^= h >> 31
    return h & ((1 << 31) - 1)          # SGLang stores seeds in int32 tensors on some paths


class ServerError(RuntimeError):
    """An HTTP call to a server failed. ``retryable`` is False for a request the server rejected (HTTP 4xx)."""

    def __init__(self, url: str, path: str, message: str, *, status: int | None = None, retryable: bool = True):
        super().__init__(f"{url}{path}: {message}")
        self.url, self.path, self.status, self.retryable = url, path, status, retryable


class NoServerLeftError(RuntimeError):
    """Every server is dead."""


def http_json(url: str, path: str, payload: dict | None = None, *, timeout: float, method: str | None = None) -> dict:
    """POST (payload given) or GET ``url + path``; returns the decoded JSON body ({} when empty).

    Raises ServerError: retryable for connection errors, time-outs and HTTP 5xx, not retryable for HTTP 4xx.
    """
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")[:2000]
        raise ServerError(url, path, f"HTTP {err.code}: {text}", status=err.code,
                          retryable=err.code >= 500) from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:     # refused, reset, timed out
        raise ServerError(url, path, f"{type(err).__name__}: {err}") from None
    if not body:
        return {}
    try:
        return json.loads(body)
    except json.JSONDecodeError:          # some routes (/flush_cache) answer plain text
        return {"text": body.decode(errors="replace")}


@dataclass
class _Server:
    url: str
    proc: SGLangServer | None = None        # None: not launched by us
    alive: bool = True
    inflight: int = 0
    failures: int = 0
    last_error: str = ""
    generated_tokens: int = 0
    requests: int = 0


class SGLangEngine:
    """Rollouts from SGLang servers over HTTP (module docstring); implements ``RolloutEngine``."""

    def __init__(self, model_cfg, *, model_dir: str | Path | None = None, server_urls: Sequence[str] | None = None,
                 num_servers: int = 1, server_python: str | None = None, device: str = "cpu",
                 max_total_tokens: int | None = 4096, server_args: Sequence[str] = (),
                 request_timeout_s: float = 600.0, max_inflight: int = 32, max_retries: int = 3,
                 backoff_s: float = 0.5, startup_timeout_s: float = 600.0, sync_method: str = "disk",
                 sync_dir: str | Path | None = None, sync_master_address: str | None = None,
                 log_dir: str | Path | None = None, seed: int = 0):
        """
        Args:
            model_cfg: ModelConfig of the policy (vocabulary, lengths, dtype for weight syncs).
            model_dir: HF model directory the launched servers load; None = write one with random weights and
                the character tokenizer into a temporary directory (the trainer syncs its weights before the
                first rollout). Ignored with server_urls.
            server_urls: URLs of running servers; empty/None = launch ``num_servers`` local servers.
            num_servers: servers to launch (each a separate process with its own KV cache).
            server_python: the server venv's python (default: $SGLANG_PY, else the ``make sglang-env`` path).
            device: server device, 'cpu' or 'cuda'.
            max_total_tokens: KV-cache tokens per launched server (None = SGLang's default; keep it set on CPU).
            server_args: more ``sglang.launch_server`` flags for launched servers.
            request_timeout_s: time-out of one /generate request (seconds); a timed-out request is retried.
            max_inflight: most /generate requests in flight over all servers.
            max_retries: retries of one request after failures on live servers (failover away from a dead
                server does not count).
            backoff_s: first retry delay; doubles per retry, with jitter.
            startup_timeout_s: how long a launched server may take to answer.
            sync_method: 'disk' or 'distributed' (weight_sync_sglang.py).
            sync_dir: where the 'disk' method writes its temporary safetensors (default: the system temp dir;
                the servers must be able to read it: local servers or a shared file system).
            sync_master_address: address the servers reach this process at for 'distributed' (default
                127.0.0.1 when every server is local, else this host's name).
            log_dir: server logs (default: a temporary directory).
            seed: engine seed, mixed with a call counter when SamplingParams.seed is None.
        """
        from megatron_entcov.weight_sync_sglang import SYNC_METHODS

        if sync_method not in SYNC_METHODS:
            raise ValueError(f"SGLangEngine sync_method={sync_method!r} is invalid: choose one of "
                             f"{', '.join(map(repr, SYNC_METHODS))}")
        if max_inflight < 1 or max_retries < 0 or request_timeout_s <= 0:
            raise ValueError(f"SGLangEngine: max_inflight={max_inflight} (>= 1), max_retries={max_retries} (>= 0), "
                             f"request_timeout_s={request_timeout_s} (> 0)")
        self.model_cfg = model_cfg
        self.request_timeout_s = float(request_timeout_s)
        self.max_inflight = int(max_inflight)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.seed = int(seed)
        self.sync_method = sync_method
        self.sync_dir = str(sync_dir) if sync_dir else None
        self._tmp = Path(tempfile.mkdtemp(prefix="sglang-engine-"))
        self._lock = threading.Lock()          # server bookkeeping
        self._sync_lock = threading.Lock()     # one sync at a time
        self._paused = threading.Event()
        self._closed = False
        self._calls = 0
        self._weight_version = 0
        self._transport = None
        self._seen: set[str] = set()
        self.last_sync: dict = {}
        self.last_generate: dict = {}
        self.servers: list[_Server] = []
        self.startup_s: list[float] = []
        try:
            if server_urls:
                self.model_dir = None
                self.servers = [_Server(url=u.rstrip("/")) for u in server_urls]
                for s in self.servers:
                    self._wait_url(s.url, startup_timeout_s)
                local = all("127.0.0.1" in s.url or "localhost" in s.url for s in self.servers)
            else:
                if model_dir is None:
                    model_dir = write_hf_model_dir(model_cfg, self._tmp / "init_model", seed=seed)
                self.model_dir = str(model_dir)
                log_dir = Path(log_dir) if log_dir else self._tmp / "logs"
                procs = []
                for i in range(num_servers):
                    port = free_port()
                    procs.append(SGLangServer(
                        self.model_dir, port=port, python=server_python or default_server_python(), device=device,
                        dtype=model_cfg.params_dtype, max_total_tokens=max_total_tokens, log_path=log_dir / f"server{i}-{port}.log",
                        extra_args=["--skip-tokenizer-init", *server_args]))
                    procs[-1].start()
                    self.servers.append(_Server(url=procs[-1].url, proc=procs[-1]))
                # Start all, then wait: start-ups overlap.
                self.startup_s = [p.wait_ready(startup_timeout_s) for p in procs]
                local = True
            self.sync_master_address = sync_master_address or ("127.0.0.1" if local else _hostname())
            versions = {s.url: self._server_version(s) for s in self.servers}
            if len(set(versions.values())) != 1:
                raise RuntimeError(f"SGLangEngine: servers report different weight versions {versions}")
            self._weight_version = next(iter(versions.values()))
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="sglang-req")
        logger.info("SGLangEngine: %d servers %s (%s), max_inflight=%d, timeout=%.0fs, sync=%s, start-up %s s",
                    len(self.servers), [s.url for s in self.servers],
                    "launched" if not server_urls else "given", self.max_inflight, self.request_timeout_s,
                    sync_method, [round(t, 1) for t in self.startup_s])

    @classmethod
    def from_config(cls, cfg, **overrides) -> SGLangEngine:
        """The engine a run config asks for (``cfg.rollout``: server_urls / num_servers, request_timeout_s);
        launched servers load ``cfg.model.hf_dir`` (or random weights: the trainer syncs before the first
        rollout) and log into ``<run_dir>/sglang/``. ``overrides`` go to the constructor."""
        r = cfg.rollout
        kwargs = dict(model_dir=cfg.model.hf_dir, server_urls=list(r.server_urls) or None,
                      num_servers=r.num_servers, request_timeout_s=r.request_timeout_s, seed=cfg.seed,
                      sync_method=r.sync_method,
                      log_dir=Path(cfg.run_dir) / "sglang")
        kwargs.update(overrides)
        return cls(cfg.model, **kwargs)

    # ------------------------------------------------------------------------------------------------ state

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def live_servers(self) -> list[_Server]:
        with self._lock:
            return [s for s in self.servers if s.alive]

    def pause(self) -> None:
        """In-flight responses end with 'abort' (servers abort them); generate raises until resume()."""
        self._paused.set()
        self._broadcast("/pause_generation", {"mode": "abort"})

    def resume(self) -> None:
        self._paused.clear()
        self._broadcast("/continue_generation", {})

    def health(self) -> dict:
        servers = []
        for s in self.servers:
            info = {"url": s.url, "alive": s.alive, "requests": s.requests, "failures": s.failures,
                    "generated_tokens": s.generated_tokens, "last_error": s.last_error}
            if s.alive and not self._closed:
                try:
                    info["weight_version"] = self._server_version(s, timeout=10)
                except ServerError as err:
                    info["error"] = str(err)
            servers.append(info)
        return {"ok": not self._closed and any(s.alive for s in self.servers), "weight_version": self._weight_version,
                "engine": "sglang", "paused": self._paused.is_set(), "servers": servers, "last_sync": self.last_sync,
                "last_generate": self.last_generate}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception as err:  # closing must not mask the caller's error
                logger.warning("SGLangEngine: closing the weight transport failed: %s", err)
        for s in self.servers:
            if s.proc is not None:
                s.proc.stop()
            s.alive = False
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SGLangEngine is closed")

    # ------------------------------------------------------------------------------------------------ servers

    @staticmethod
    def _wait_url(url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                http_json(url, "/model_info", timeout=10)
                return
            except ServerError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SGLang server {url} did not answer within {timeout_s:.0f} s: {err}") from None
                time.sleep(2.0)

    def _server_version(self, s: _Server, timeout: float = 30.0) -> int:
        return _parse_version(http_json(s.url, "/model_info", timeout=timeout).get("weight_version"))

    def _mark_failure(self, s: _Server, err: Exception) -> None:
        """Count a failure; a server whose process exited or whose /health does not answer is marked dead."""
        with self._lock:
            s.failures += 1
            s.last_error = str(err)
            if not s.alive:
                return
        dead = s.proc is not None and not s.proc.alive()
        if not dead:
            # /model_info is answered by the HTTP process itself; /health goes through the scheduler, which a
            # paused server (a weight update) does not answer.
            try:
                http_json(s.url, "/model_info", timeout=10)
            except ServerError as probe_err:
                dead = probe_err.retryable
        if dead:
            with self._lock:
                if s.alive:
                    s.alive = False
                    logger.warning("SGLangEngine: server %s is dead (%s); its requests go to the other %d", s.url,
                                   err, sum(x.alive for x in self.servers))

    def _pick(self, avoid: _Server | None) -> _Server:
        with self._lock:
            live = [s for s in self.servers if s.alive]
            if not live:
                raise NoServerLeftError("SGLangEngine: no SGLang server left: " + "; ".join(
                    f"{s.url}: {s.last_error or 'dead'}" for s in self.servers))
            choices = [s for s in live if s is not avoid] or live
            best = min(choices, key=lambda s: s.inflight)
            best.inflight += 1
            return best

    def _broadcast(self, path: str, payload: dict, timeout: float = 120.0) -> dict[str, dict]:
        """POST to every live server concurrently; a failing server is marked (and dead ones skipped)."""
        out = {}

        def one(s):
            try:
                out[s.url] = http_json(s.url, path, payload, timeout=timeout)
            except ServerError as err:
                if err.retryable:
                    self._mark_failure(s, err)
                out[s.url] = {"error": str(err)}

        threads = [threading.Thread(target=one, args=(s,)) for s in self.live_servers()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Sample]:
        """One Sample per prompt entry, in order (``Sample.index`` = position in ``prompts``).

        Raises:
            ValueError for a bad prompt (naming its index) or top_k=1 with temperature != 1; RuntimeError when
            paused or closed, NoServerLeftError when every server died, ServerError when a request failed more
            than ``max_retries`` times on live servers.
        """
        self._check_open()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params is a {type(params).__name__}; expected SamplingParams")
        if params.top_k == 1 and params.temperature != 1.0:
            raise ValueError(f"generate: top_k=1 (greedy) with temperature={params.temperature}: SGLang reports "
                             "greedy log-probs without the temperature; use temperature=1.0 for greedy decoding")
        prompts = validate_prompts(prompts, params, self.model_cfg)
        if self._paused.is_set():
            raise RuntimeError("generate: the engine is paused; call resume() first")
        if not prompts:
            return []
        call = self._calls
        self._calls += 1
        base = _mix_seed(self.seed, call) if params.seed is None else int(params.seed)
        sp = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
              "top_k": params.top_k, "stop_token_ids": list(params.stop_token_ids)}
        t0 = time.monotonic()
        before = {s.url: s.generated_tokens for s in self.servers}
        futures = [self._pool.submit(self._generate_one, i, p, dict(sp, sampling_seed=_mix_seed(base, i)))
                   for i, p in enumerate(prompts)]
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
        # Per-server generation throughput of this call (rollout/ metrics): tokens over the call's wall time.
        self.last_generate = {"seconds": dt, "tokens": n_tok, "tokens_per_s": n_tok / max(dt, 1e-9),
                              "server_tokens_per_s": {s.url: (s.generated_tokens - before[s.url]) / max(dt, 1e-9)
                                                      for s in self.servers}}
        return samples

    def _generate_one(self, index: int, prompt: list[int], sampling_params: dict) -> Sample:
        payload = {"input_ids": prompt, "sampling_params": sampling_params, "return_logprob": True,
                   "logprob_start_len": -1}
        retries, avoid = 0, None
        while True:
            if self._closed:
                raise RuntimeError("SGLangEngine is closed")
            if self._paused.is_set():       # not sent yet: a paused server would hold it until resume()
                return Sample(prompt_ids=list(prompt), response_ids=[], rollout_logprobs=[], finish_reason="abort",
                              weight_version=self._weight_version, index=index)
            s = self._pick(avoid)
            try:
                out = http_json(s.url, "/generate", payload, timeout=self.request_timeout_s)
                sample = _parse_generate(out, prompt, index)
                if sample.finish_reason == "abort" and not self._paused.is_set():
                    # Not our pause: the server aborted it (overload, a weight update with abort, shutdown).
                    raise ServerError(s.url, "/generate", f"aborted by the server: {out.get('meta_info', {})}")
                with self._lock:
                    s.requests += 1
                    s.generated_tokens += sample.num_response_tokens
                return sample
            except ServerError as err:
                if not err.retryable:
                    raise
                self._mark_failure(s, err)
                avoid = s
                if s.alive:                   # failover from a dead server does not use up the retries
                    retries += 1
                    if retries > self.max_retries:
                        raise ServerError(s.url, "/generate", f"prompt {index} failed {retries} times; last: {err}")
                    time.sleep(self.backoff_s * 2 ** (retries - 1) * (0.5 + random.random()))
                logger.info("SGLangEngine: prompt %d retried after %s", index, err)
            finally:
                with self._lock:
                    s.inflight -= 1

    # ------------------------------------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Load HF-named full tensors into every live server; afterwards every server's weight_version == version.

        Buckets are streamed (a generator that gathers lazily is consumed as it goes). Unknown names or wrong
        shapes raise ValueError naming the tensor after the iterable is exhausted (a collective producer must not
        be left hanging); the version is then unchanged. The first sync must send every tensor.
        """
        from megatron_entcov.weight_sync_sglang import build_transport, expected_shapes

        self._check_open()
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ValueError(f"update_weights: version={version!r} is invalid: must be an integer >= 0")
        with self._sync_lock:
            if self._transport is None:
                self._transport = build_transport(self.sync_method, self, expected_shapes(self.model_cfg))
            servers = self.live_servers()
            if not servers:
                raise NoServerLeftError("update_weights: no SGLang server left")
            t0 = time.monotonic()
            user_paused = self._paused.is_set()
            if not user_paused:
                self._broadcast("/pause_generation", {"mode": "abort"})
            try:
                self._broadcast_checked("/begin_weight_update", {"selector": "all"})
                try:
                    stats = self._transport.sync(named_tensors, version, self._seen)
                except BaseException:
                    self._broadcast("/end_weight_update", {})     # close the session; the version stays
                    raise
                self._broadcast_checked("/end_weight_update", {})
                self._broadcast_checked("/update_weight_version", {"new_version": str(version)})
                self._broadcast_checked("/flush_cache", {})
            finally:
                if not user_paused:
                    self._broadcast("/continue_generation", {})
            versions = {s.url: self._server_version(s) for s in self.live_servers()}
            wrong = {u: v for u, v in versions.items() if v != version}
            if wrong or not versions:
                raise RuntimeError(f"update_weights: servers report weight versions {wrong or versions}, expected "
                                   f"{version}")
            self._weight_version = version
            dt = time.monotonic() - t0
            self.last_sync = dict(stats, method=self.sync_method, seconds=dt, servers=len(versions),
                                  bytes_per_s=stats.get("bytes", 0) / max(dt, 1e-9))
        logger.info("SGLangEngine: weights v%d to %d servers by %s: %.2f MB in %.2f s", version, len(versions),
                    self.sync_method, stats.get("bytes", 0) / 1e6, dt)

    def _broadcast_checked(self, path: str, payload: dict, timeout: float = 600.0) -> None:
        out = self._broadcast(path, payload, timeout=timeout)
        bad = {u: r for u, r in out.items() if "error" in r or r.get("success") is False}
        if bad:
            raise RuntimeError(f"SGLangEngine: {path} failed on {bad}")


def _hostname() -> str:
    import socket

    return socket.gethostbyname(socket.gethostname())


def _parse_version(v) -> int:
    """SGLang keeps weight_version as a string ('default' until set); ours are integers."""
    if v is None or v == "default":
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"SGLang weight_version {v!r} is not an integer; was it set by another client?") from None


_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def _parse_generate(out, prompt: list[int], index: int) -> Sample:
    """A Sample from one /generate response; ServerError (not retryable) for a malformed one."""
    if isinstance(out, list):
        out = out[0] if len(out) == 1 else out
    try:
        meta = out["meta_info"]
        ids = [int(t) for t in out["output_ids"]]
        lps = meta["output_token_logprobs"]
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    except (KeyError, TypeError) as err:
        raise ServerError("?", "/generate", f"malformed response (missing {err}): {str(out)[:300]}",
                          retryable=False) from None
    if kind not in _FINISH:
        raise ServerError("?", "/generate", f"unknown finish_reason {fr!r}", retryable=False)
    logprobs = [float(e[0]) for e in lps][:len(ids)]
    if len(logprobs) != len(ids) or any(int(e[1]) != t for e, t in zip(lps, ids)):
        raise ServerError("?", "/generate", f"prompt {index}: {len(ids)} output_ids but {len(lps)} log-probs, or "
                          "their token ids differ", retryable=False)
    return Sample(prompt_ids=list(prompt), response_ids=ids, rollout_logprobs=logprobs, finish_reason=_FINISH[kind],
                  weight_version=_parse_version(meta.get("weight_version")), index=index)
