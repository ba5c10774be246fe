"""The rollout-side sections of the run config: the rollout engine and batch shape (``rollout``), the SGLang
servers (``rollout.sglang``), the weight push after each step (``weight_sync``) and sampling (``sampling``).

Each section checks its own fields in ``__post_init__`` (ValueError naming the dotted field, the value and the
fix); checks across sections live in :meth:`RunConfig.validate` (config/schema.py).

Design notes: docs/design/config.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_entcov.config.checks import check_choices, check_positive, check_range, fail

__all__ = ["SYNC_PROBE_PROMPT_LEN", "server_tp", "SGLangConfig", "RolloutConfig", "WeightSyncConfig",
           "SamplingConfig"]

SYNC_PROBE_PROMPT_LEN = 8
"""Tokens in the post-sync probe's prompt (weights/probe.py)."""

def server_tp(server_args: list[str] | tuple[str, ...]) -> int:
    """GPUs per launched SGLang server: the ``--tp-size`` (or ``--tp``) in its launch flags; 1 when absent.

    Raises ValueError naming ``rollout.sglang.server_args`` when the value is not a positive integer."""
    args = list(server_args)
    value = None
    for i, a in enumerate(args):
        if a in ("--tp-size", "--tp") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(("--tp-size=", "--tp=")):
            value = a.split("=", 1)[1]
        else:
            continue
        break
    if value is None:
        return 1
    try:
        tp = int(value)
    except ValueError:
        tp = 0
    if tp < 1:
        fail("rollout.sglang.server_args", args, f"its --tp-size {value!r} must be a positive integer")
    return tp


@dataclass(kw_only=True)
class SGLangConfig:
    """The SGLang rollout engine (rollout.engine=sglang): where its servers are, how they are launched and
    reached, and how the weights travel to them (docs/sglang.md)."""

    server_urls: list[str] = field(default_factory=list)
    """URLs of running servers, split between data-parallel replicas (replica r gets every dp-th from r);
    empty = each replica launches num_servers locally (or uses router_url's workers)."""
    router_url: str = ""
    """An sglang-router in front of the servers; generation goes through it, weight syncs go to its workers
    (server_urls, else the router's /workers). dp=1 only."""
    num_servers: int = 1
    """Servers each replica launches when server_urls is empty."""
    request_timeout_s: float = 600.0
    """Time-out of one generate request, in seconds; a timed-out request is retried on another server."""
    startup_timeout_s: float = 600.0
    """How long a server may take to answer at start-up, in seconds: a launched or restarted server until it has
    loaded the model, a server at server_urls (or router_url's workers) until it answers. The wait logs what
    it waits for every 15 s; raise it for cold starts of large models (a 32B checkpoint from network storage
    can take longer than 600 s). A URL that answers but is not an SGLang server fails at once."""
    server_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of launched servers; 'auto' = cuda when this process sees a GPU, else cpu."""
    server_args: list[str] = field(default_factory=list)
    """More sglang.launch_server flags for launched servers, e.g. ["--tp-size", "2", "--mem-fraction-static",
    "0.4"]."""
    max_total_tokens: int = 0
    """KV-cache tokens per launched server; 0 = 4096 on CPU, SGLang's own choice on GPU."""
    max_inflight: int = 64
    """Most generate requests in flight over one replica's servers."""
    max_server_restarts: int = 2
    """Restarts of a launched server that dies (it rejoins after the next weight sync); 0 = off."""
    release_memory: bool = False
    """Colocated GPU servers: release their GPU memory while the trainer trains and resume it around the
    weight sync (launches with --enable-memory-saver and SGLANG_MEMORY_SAVER_CUDA_GRAPH=1, so CUDA graphs are
    released too; needs CUDA)."""
    sync_method: Literal["disk", "distributed", "tensor"] = "disk"
    """Weight transport: 'disk' (safetensors + update_weights_from_disk; any topology), 'distributed'
    (gloo/NCCL broadcast group; servers on other nodes), 'tensor' (serialized tensors; colocated)."""
    sync_master_addr: str = ""
    """sync_method='distributed': the address of this (the generating) process that the servers connect to
    when the weight-update group forms, an IP address or host name without port. '' = chosen then: 127.0.0.1
    when every server is on this host, else the local address of the route to the servers' host (never a
    loopback address: a loopback value with servers on another host is replaced, with a warning). Set it when
    the servers reach this host at another address (e.g. another network)."""

    def __post_init__(self) -> None:
        check_choices(self, "rollout.sglang")
        check_positive("rollout.sglang.num_servers", self.num_servers)
        check_positive("rollout.sglang.request_timeout_s", self.request_timeout_s)
        check_positive("rollout.sglang.startup_timeout_s", self.startup_timeout_s)
        check_positive("rollout.sglang.max_total_tokens", self.max_total_tokens, allow_zero=True)
        check_positive("rollout.sglang.max_inflight", self.max_inflight)
        check_positive("rollout.sglang.max_server_restarts", self.max_server_restarts, allow_zero=True)
        if self.sync_master_addr:
            addr = str(self.sync_master_addr)
            if any(c.isspace() or c in "/@[]" for c in addr) or "://" in addr or addr.count(":") == 1:
                fail("rollout.sglang.sync_master_addr", self.sync_master_addr,
                     "must be an IP address or host name of this machine, without scheme or port, e.g. 10.0.0.5 "
                     "(or '' to choose it from the route to the servers)")
            if self.sync_method != "distributed":
                fail("rollout.sglang.sync_master_addr", self.sync_master_addr,
                     f"applies to rollout.sglang.sync_method=distributed (got {self.sync_method!r}); unset it "
                     "(rollout.sglang.sync_master_addr='')")
        for i, arg in enumerate(self.server_args):
            if not isinstance(arg, str):
                fail(f"rollout.sglang.server_args[{i}]", arg, "must be a string (one command-line token)")
        server_tp(self.server_args)
        if self.router_url and not str(self.router_url).startswith(("http://", "https://")):
            fail("rollout.sglang.router_url", self.router_url,
                 "must be an http(s):// URL, e.g. http://router-node:30000")
        for i, url in enumerate(self.server_urls):
            if not str(url).startswith(("http://", "https://")):
                fail(f"rollout.sglang.server_urls[{i}]", url,
                     "must be an http(s):// URL, e.g. http://rollout-node:30000")
        if self.release_memory and self.server_device == "cpu":
            fail("rollout.sglang.release_memory", self.release_memory,
                 "needs GPU servers (SGLang's memory saver is CUDA-only); set rollout.sglang.server_device=cuda "
                 "or false")


@dataclass(kw_only=True)
class RolloutConfig:
    """Where rollouts come from and how many."""

    engine: Literal["local", "sglang"] = "local"
    """'local' = embedded engine in the trainer processes (default, CPU ok); 'sglang' = SGLang servers."""
    prompts_per_step: int = 8
    """Prompts sampled per RL step (global, over all data-parallel ranks)."""
    n_samples_per_prompt: int = 4
    """Responses per prompt (the GRPO group size)."""
    max_prompt_len: int = 64
    """Longest prompt in tokens: longer prompts in a file are skipped and counted (data/skipped_prompts); the
    arithmetic task's longest prompt must fit (checked at start)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (no signal) and refill from new prompts (DAPO)."""
    max_refill_rounds: int = 4
    """With dynamic_sampling, the most extra generation rounds per step before training on what is there."""
    overlap: bool = False
    """Generate step t+1's rollouts in a background thread while step t trains (one step off-policy: they use
    the weights from before step t's update; the sync still happens at the step boundary, after the wait).
    Logs rollout/staleness(_max) and perf/overlap_wait(s); pair it with loss.tis_cap (e.g. 2.0) to correct
    the rollout/trainer mismatch. A checkpoint stores the loader as of the experience trained, so a resumed
    run regenerates the prefetched prompts (rollout/prefetch.py). Works with both engines; not with
    rollout.sglang.release_memory (colocated servers cannot generate while the trainer holds the GPU)."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """The SGLang engine's servers and weight transport (used when engine is 'sglang')."""
    sync_dir: str = ""
    """Directory the 'disk' weight transport (rollout.sglang.sync_method=disk) writes each sync's safetensors
    to, for the servers to load: an absolute path on storage the trainer and every server node mount at the
    same path (servers on other nodes cannot read the trainer's temporary directory). '' = the system
    temporary directory (servers on the trainer's node only)."""

    def __post_init__(self) -> None:
        check_choices(self, "rollout")
        for name in ("prompts_per_step", "n_samples_per_prompt", "max_prompt_len"):
            check_positive(f"rollout.{name}", getattr(self, name))
        check_positive("rollout.max_refill_rounds", self.max_refill_rounds, allow_zero=True)
        if self.sync_dir:
            if not str(self.sync_dir).startswith("/") or any(ord(c) < 32 for c in str(self.sync_dir)):
                fail("rollout.sync_dir", self.sync_dir,
                     "must be an absolute path that the trainer and every server node mount at the same place, "
                     "e.g. /shared/scratch/entcov-sync (or '' for servers on the trainer's node)")
            if self.engine != "sglang" or self.sglang.sync_method != "disk":
                fail("rollout.sync_dir", self.sync_dir,
                     f"applies to rollout.engine=sglang with rollout.sglang.sync_method=disk (got engine="
                     f"{self.engine!r}, sync_method={self.sglang.sync_method!r}); unset it (rollout.sync_dir='')")
        if self.sglang.release_memory and self.engine != "sglang":
            fail("rollout.sglang.release_memory", self.sglang.release_memory,
                 "applies to rollout.engine=sglang only; set false")
        if self.overlap and self.sglang.release_memory:
            fail("rollout.overlap", self.overlap,
                 "contradicts rollout.sglang.release_memory=true: colocated servers give the GPU to the trainer "
                 "while it trains, so they cannot generate the next step's rollouts meanwhile; set "
                 "rollout.overlap=false, or run the servers on GPUs of their own and set "
                 "rollout.sglang.release_memory=false")


@dataclass(kw_only=True)
class WeightSyncConfig:
    """Pushing the trainer's weights to the rollout engine after each step, and checking they arrived."""

    bucket_mb: float = 256.0
    """The most megabytes of full (gathered) tensors held and sent at once."""
    verify: Literal["probe", "version"] = "probe"
    """Check of every sync: 'version' = each server reports the trainer's weight version; 'probe' = that, and
    each server's log-probs on a fixed probe prompt match the trainer's within verify_tol (weights/probe.py)."""
    verify_tol: float = 1e-3
    """Largest median |server - trainer| log-prob gap over a server's probe tokens the probe accepts (the
    median, so rounding on one token cannot trip it; sync/probe_gap logs the largest single-token gap). Basis:
    float32 servers on CPU agree to ~1e-6 per token. bf16 rounds each logit to 8 significant bits (relative
    error up to 2^-9), a few hundredths of a nat on logits of size ~10; the probe's tokens are greedy, the
    likely ones whose log-probs that rounding moves least, so 0.1 leaves bf16 servers margin, while a tensor
    not loaded or in the wrong place moves most tokens by far more (not yet measured on a GPU)."""
    probe_tokens: int = 16
    """Tokens each server decodes for the probe (greedily at sampling temperature 1); the check's median
    ignores rounding outliers only with several tokens (with 1 it is that token's gap)."""
    only_changed: bool = False
    """SGLang engine, 'tensor' and 'distributed' transports: leave out of a sync every tensor whose bytes equal
    those of the last complete sync (e.g. frozen embeddings), found by a SHA-1 of each tensor (~1.5 GB/s on one
    core, on top of the sync). The first sync, the first after a failed one, and any sync to a restarted server
    send everything; the probe (verify: probe) checks the result. 'disk' always writes the whole model."""

    def __post_init__(self) -> None:
        check_choices(self, "weight_sync")
        check_positive("weight_sync.bucket_mb", self.bucket_mb)
        check_positive("weight_sync.verify_tol", self.verify_tol)
        check_positive("weight_sync.probe_tokens", self.probe_tokens)


@dataclass(kw_only=True)
class SamplingConfig:
    """Sampling of responses at rollout time."""

    temperature: float = 1.0
    """Softmax temperature; the trainer applies the same temperature to its logits. Released setting: 1.0."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]. Released setting: 1.0."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 = off."""
    max_new_tokens: int = 32
    """Longest response in tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response (the tokenizer's end-of-sequence id is added by the trainer)."""

    def __post_init__(self) -> None:
        check_range("sampling.temperature", self.temperature, 0.0, 100.0, lo_open=True)
        check_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k != -1 and self.top_k < 1:
            fail("sampling.top_k", self.top_k, "must be -1 (off) or >= 1")
        check_positive("sampling.max_new_tokens", self.max_new_tokens)
        for i, tok in enumerate(self.stop_token_ids):
            if not isinstance(tok, int) or tok < 0:
                fail(f"sampling.stop_token_ids[{i}]", tok, "must be a non-negative token id")
