"""Weight transports from the trainer to SGLang servers, used by ``SGLangEngine.update_weights``.

A transport only moves buckets of full HF-named tensors (the engine wraps it in pause/begin/end/version/continue);
it gets a :class:`TransportContext`, reaches the servers through the engine's ``ServerPool``, never imports
sglang. 'disk': safetensors + ``/update_weights_from_disk`` (a file system the servers read). 'distributed': a
process group with every server's TP ranks (gloo for CPU servers, NCCL for GPU servers), each tensor
broadcast. 'tensor': ``/update_weights_from_tensor`` with shared-memory or CUDA IPC handles, colocated servers
only. Each checks names and shapes (``expected_shapes``), converts to the model dtype, drops a tied
``lm_head.weight``, drains the producer before raising; a server that dies drops out of a 'disk'/'tensor' sync,
a 'distributed' sync fails.

Example:
    transport = build_transport("disk", TransportContext(model_cfg=cfg.model, pool=pool, shapes=shapes))
    stats = transport.sync(buckets, version=3, seen=set(), servers=pool.standing())   # {"bytes", "complete", ...}

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import abc
import base64
import io
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from megatron_entcov.rollout.engine import NamedTensors, iter_named_tensors
from megatron_entcov.rollout.sglang.http import Fanout, ServerError, http_json
from megatron_entcov.rollout.sglang.pool import LIVE, STALE, Server, ServerPool

logger = logging.getLogger(__name__)

__all__ = ["SYNC_METHODS", "SYNC_BACKENDS", "TransportContext", "expected_shapes", "build_transport",
           "choose_master_address", "route_address", "choose_sync_backend", "trainer_nccl_version",
           "server_nccl_version", "check_nccl_versions", "server_gpu_ids", "rank_payloads", "copy_bucket_to_gpu",
           "serialize_cuda_ipc", "DiskTransport", "DistributedTransport", "TensorTransport"]

SYNC_METHODS = ("disk", "distributed", "tensor")


@dataclass(frozen=True)
class TransportContext:
    """Everything a transport needs from the engine, given once at construction."""

    model_cfg: Any
    """ModelConfig of the policy: the dtype tensors are sent in, and whether the embedding is tied."""
    pool: ServerPool
    """The engine's servers: every request goes through its fan-out, which marks servers that died."""
    shapes: dict[str, tuple[int, ...]]
    """HF parameter name -> full shape (``expected_shapes``): what a sync may send."""
    sync_dir: str | None = None
    """'disk': parent of the per-sync safetensors directories (None = the system temp dir); the servers must
    be able to read it."""
    model_dir: str | None = None
    """'disk': the launched servers' initial model directory; its config and tokenizer files are copied into
    each synced directory, so a server can launch from it. None = servers at given URLs."""
    master_address: str | None = None
    """'distributed': the address the servers reach this process at (``rollout.sglang.sync_master_addr``);
    None = chosen when the group forms (:func:`choose_master_address`)."""
    keep_weights: Callable[[Path, int], None] | None = None
    """'disk': called with (directory, version) after a sync that sent every tensor; the callee owns the
    directory from then on (restarted servers launch from it). None = the directory is deleted."""


def expected_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of the policy's Hugging Face model (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config.hf import to_hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(to_hf_config(model_cfg))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if model_cfg.tie_word_embeddings:
        shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
    return shapes


def build_transport(method: str, ctx: TransportContext) -> "Transport":
    """The transport named by ``rollout.sglang.sync_method``."""
    classes = {"disk": DiskTransport, "distributed": DistributedTransport, "tensor": TensorTransport}
    if method not in classes:
        raise ValueError(f"rollout.sglang.sync_method={method!r} is invalid: choose one of "
                         f"{', '.join(map(repr, SYNC_METHODS))}")
    return classes[method](ctx)


# ---------------------------------------------------------------------------------------------- master address


def _is_loopback(address: str) -> bool:
    """An IP address in 127.0.0.0/8 or ::1, or a name that resolves only to such addresses (localhost)."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(address, None, type=socket.SOCK_DGRAM)}
    except OSError:
        return False
    return bool(resolved) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in resolved)


def _is_this_host(host: str) -> bool:
    """``host`` names this machine: it resolves to a loopback address, or to one this machine can bind."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False                     # unresolvable here: not provably local
    for family, kind, proto, _, sockaddr in infos:
        if _is_loopback(sockaddr[0]):
            return True
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind((sockaddr[0], 0, *sockaddr[2:]))
            return True
        except OSError:
            continue
    return False


def route_address(host: str, port: int = 9) -> str | None:
    """The local address this machine sends from to reach ``host``: a UDP socket "connected" to it (connect on
    UDP sends no packet; the kernel just picks the route and source address). None when there is no route or
    ``host`` does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(sockaddr)
                return sock.getsockname()[0]
        except OSError:
            continue
    return None


def _hostname_address() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def choose_master_address(server_urls: list[str], configured: str | None = None, *,
                          is_this_host: Callable[[str], bool] = _is_this_host,
                          route: Callable[[str], str | None] = route_address,
                          hostname_address: Callable[[], str | None] = _hostname_address) -> str:
    """The address the 'distributed' transport's servers reach this process at (its rendezvous store).

    - ``configured`` (``rollout.sglang.sync_master_addr``), unless it is a loopback address while a server is
      on another host (no other host can reach it: this host's name resolving to 127.0.1.1, as Debian-style
      hosts set it up, is the usual way to get one); then the address is chosen as below, with a warning.
    - every server on this host: 127.0.0.1;
    - else the local address of the route to the first server on another host (what it sees this process
      as), falling back to this host's name resolved when there is no route;
    - never a loopback address when a server is on another host: ValueError naming the config field.

    ``is_this_host``, ``route`` and ``hostname_address`` are the network look-ups (parameters for tests).
    """
    hosts = []
    for url in server_urls:
        host = urlsplit(url).hostname
        if not host:
            raise ValueError(f"weight sync 'distributed': server URL {url!r} has no host; expected http://host:port")
        hosts.append(host)
    remote = [h for h in hosts if not is_this_host(h)]
    if configured and not (remote and _is_loopback(configured)):
        return configured
    if not remote:
        return "127.0.0.1"
    routed = route(remote[0])
    chosen, how = routed, f"the local address of the route to {remote[0]}"
    if chosen is None or _is_loopback(chosen):
        named = hostname_address()
        chosen, how = named, "this host's name resolved"
        if chosen is None or _is_loopback(chosen):
            raise ValueError(
                f"weight sync 'distributed': server {remote[0]} is on another host, and no address of this host "
                f"that it can reach was found (route to it: {'none' if routed is None else routed}; this host's "
                f"name resolves to {named}): set rollout.sglang.sync_master_addr to an address of this host that "
                "the servers reach (e.g. its address on the cluster network)")
    if configured:
        logger.warning("weight sync: sync_master_addr=%s is a loopback address, unreachable from server %s on "
                       "another host; using %s (%s) instead. Set rollout.sglang.sync_master_addr to an address "
                       "of this host the servers reach", configured, remote[0], chosen, how)
    return chosen


class Transport(abc.ABC):
    """The common part: iterate buckets, validate, convert; raise after draining. Subclasses implement
    ``sync``, and ``close`` when they hold something between syncs."""

    device = "cpu"
    """Where a transport wants its tensors (a GPU transport keeps gathered GPU tensors on the GPU)."""

    def __init__(self, ctx: TransportContext):
        self.ctx, self.shapes = ctx, ctx.shapes
        self.dtype = getattr(torch, ctx.model_cfg.params_dtype)
        self.tied = bool(ctx.model_cfg.tie_word_embeddings)

    @abc.abstractmethod
    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        """Send every tensor to ``servers`` (inside the engine's begin/end_weight_update); ``seen`` collects the
        names ever sent. Returns stats with at least ``bytes``, ``tensors`` and ``complete`` (every tensor was
        sent: a stale server that got it is live again)."""

    def close(self) -> None:
        """Release what the transport holds between syncs (a process group); idempotent."""

    def server_infos(self, servers: list[Server]) -> dict[Server, dict]:
        """Each standing server's ``/server_info`` (its launch arguments: ``tp_size``, ``base_gpu_id``, ...). A
        server that does not answer is marked by the pool and left out when it is dead."""
        out = {}
        for s in servers:
            try:
                out[s] = http_json(s.url, "/server_info", timeout=30)
            except ServerError as err:
                if not err.retryable:
                    raise
                self.ctx.pool.mark_failure(s, err)
                if s.state in (LIVE, STALE):
                    raise
        return out

    def tp_sizes(self, servers: list[Server]) -> dict[Server, int]:
        """Each standing server's tensor-parallel size (``/server_info``): its ranks in a group, its payload
        count. A server that does not answer is marked by the pool and left out when it is dead."""
        return {s: int(info.get("tp_size", 1)) for s, info in self.server_infos(servers).items()}

    def buckets(self, named_tensors: NamedTensors, errors: list):
        """Yield lists of (name, contiguous tensor in the model dtype on ``self.device``); bad tensors go to
        ``errors``."""
        if isinstance(named_tensors, dict):
            named_tensors = [list(named_tensors.items())]
        for item in named_tensors:
            pairs = list(iter_named_tensors([item]))
            if errors:                           # drain: keep a collective producer going, send nothing
                errors.extend(n for n, _ in pairs)
                continue
            bucket = []
            for name, t in pairs:
                msg = self._check(name, t)
                if msg:
                    errors.append(msg)
                    break
                if self.tied and name == "lm_head.weight":
                    continue
                bucket.append((name, t.detach().to(device=self.device, dtype=self.dtype).contiguous()))
            if bucket and not errors:
                yield bucket

    def _check(self, name, t) -> str | None:
        if not isinstance(t, torch.Tensor):
            return f"update_weights: {name!r} is a {type(t).__name__}; expected a tensor"
        shape = self.shapes.get(name)
        if shape is None:
            return (f"update_weights: unknown tensor {name!r}; expected Hugging Face names, e.g. "
                    f"{next(iter(self.shapes))!r} ({len(self.shapes)} parameters)")
        if tuple(t.shape) != shape:
            return (f"update_weights: tensor {name!r} has shape {tuple(t.shape)}; expected {shape}, the full "
                    "unsharded tensor (vocabulary UNPADDED)")
        return None

    def finish(self, errors: list, seen: set, sent: set, version: int) -> bool:
        """Raise for bad tensors or a first sync that misses some; returns whether this sync sent every tensor
        (a server that restarted since the last full sync needs one)."""
        if errors:
            more = f" (and {len(errors) - 1} more tensors after it were not sent)" if len(errors) > 1 else ""
            raise ValueError(errors[0] + more)
        seen |= sent
        missing = sorted(set(self.shapes) - seen - ({"lm_head.weight"} if self.tied else set()))
        if missing:
            raise ValueError(f"update_weights(version={version}): {len(missing)} parameters have never been set "
                             f"since the engine was built, e.g. {missing[:4]}; the first sync must send every tensor")
        return not (set(self.shapes) - sent - ({"lm_head.weight"} if self.tied else set()))


class DiskTransport(Transport):
    """Safetensors files in a temporary directory + /update_weights_from_disk on every server."""

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        from safetensors.torch import save_file

        errors, sent, nbytes, index = [], set(), 0, {}
        out_dir = Path(tempfile.mkdtemp(prefix=f"weights-v{version}-", dir=self.ctx.sync_dir))
        kept = False
        try:
            t0 = time.monotonic()
            for i, bucket in enumerate(self.buckets(named_tensors, errors)):
                fname = f"model-{i:05d}.safetensors"
                save_file(dict(bucket), str(out_dir / fname), metadata={"format": "pt"})
                for name, t in bucket:
                    index[name] = fname
                    sent.add(name)
                    nbytes += t.numel() * t.element_size()
            if errors:                           # nothing reaches the servers
                self.finish(errors, seen, sent, version)
            (out_dir / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": nbytes}, "weight_map": index}))
            if self.ctx.model_dir:
                # config, generation config, tokenizer: what a server launched from this directory also reads
                for f in Path(self.ctx.model_dir).iterdir():
                    if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
                        shutil.copy(f, out_dir / f.name)
            t_write = time.monotonic() - t0
            self.ctx.pool.post_all(servers, "/update_weights_from_disk",
                                   {"model_path": str(out_dir), "flush_cache": False})
            t_load = time.monotonic() - t0 - t_write
            complete = self.finish(errors, seen, sent, version)
            if complete and self.ctx.keep_weights is not None:    # restarted servers launch from these weights
                self.ctx.keep_weights(out_dir, version)
                kept = True
        finally:
            if not kept:
                shutil.rmtree(out_dir, ignore_errors=True)
        return {"bytes": nbytes, "tensors": len(sent), "write_s": t_write, "load_s": t_load, "complete": complete}


SYNC_BACKENDS = ("gloo", "nccl")


def choose_sync_backend(server_devices: dict[str, str | None], forced: str | None = None) -> str:
    """The backend of the 'distributed' weight-sync group, from the servers' device (``/server_info``'s
    ``device``, SGLang's ``--device``): gloo for CPU servers (NCCL has no CPU transport, whatever this process
    sees), NCCL for GPU servers, which needs a GPU in this process too. A server that does not say (an old
    SGLang) counts as this process's device. ``forced``: a backend asked for explicitly; ValueError, naming the
    servers and the fix, for one that cannot serve them (NCCL with a CPU server or without a GPU here), for
    servers of both kinds without ``forced='gloo'``, or for no servers."""
    if not server_devices:
        raise ValueError("weight sync 'distributed': no servers to choose the group's backend for")
    cuda_here = torch.cuda.is_available()
    here = "cuda" if cuda_here else "cpu"
    kind = {url: "cpu" if (dev or here) == "cpu" else "gpu" for url, dev in server_devices.items()}
    cpu = sorted(url for url, k in kind.items() if k == "cpu")
    gpu = sorted(url for url, k in kind.items() if k == "gpu")
    if forced not in (None, *SYNC_BACKENDS):
        raise ValueError(f"weight sync 'distributed': backend={forced!r} is invalid: choose one of "
                         f"{', '.join(map(repr, SYNC_BACKENDS))}, or None to follow the servers' device")
    if forced == "gloo":
        return "gloo"               # gloo moves host tensors and stages CUDA ones: it serves either kind
    if forced == "nccl" or (gpu and not cpu):
        how = "backend='nccl' was asked for" if forced else "the servers run on GPUs"
        if cpu:
            raise ValueError(f"weight sync 'distributed': {how}, but server(s) {cpu} run on the CPU (--device cpu) "
                             "and NCCL has no CPU transport; leave the backend to the servers' device (gloo for "
                             "CPU servers), or run the servers on GPUs")
        if not cuda_here:
            raise ValueError(f"weight sync 'distributed': {how} (NCCL), but this process sees no GPU "
                             "(torch.cuda.is_available() is False) and NCCL needs one on every rank; run the "
                             "trainer on a GPU, or set rollout.sglang.sync_method=disk")
        return "nccl"
    if gpu:
        raise ValueError(f"weight sync 'distributed': servers {cpu} run on the CPU and servers {gpu} on GPUs; one "
                         "group needs one backend (NCCL has no CPU transport): give one engine servers of one "
                         "kind, or set rollout.sglang.sync_method=disk")
    return "gloo"


class DistributedTransport(Transport):
    """A process group with the servers; per bucket, HTTP metadata + broadcast from this process (rank 0)."""

    def __init__(self, ctx: TransportContext, backend: str | None = None, timeout_s: float = 600.0):
        """
        Args:
            backend: the group's backend; None = chosen from the servers' device when the group forms
                (:func:`choose_sync_backend`: gloo for CPU servers, NCCL for GPU servers).
            timeout_s: time-out of the rendezvous and of each broadcast.
        """
        super().__init__(ctx)
        if backend not in (None, *SYNC_BACKENDS):
            raise ValueError(f"weight sync 'distributed': backend={backend!r} is invalid: choose one of "
                             f"{', '.join(map(repr, SYNC_BACKENDS))}, or None to follow the servers' device")
        self.forced_backend = backend
        self.backend = backend           # set when the group forms when None
        self.timeout = timedelta(seconds=timeout_s)
        self.group_name = f"entcov_weights_{uuid.uuid4().hex[:8]}"
        self.pg = None
        self.servers: list[str] = []     # URLs of the group's members, in rank order

    def _init_group(self, servers: list[Server]) -> list[Server]:
        """Form the group with the servers that answer; returns them (rank order)."""
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        from megatron_entcov.distributed.net import free_port

        infos = self.server_infos(servers)
        servers = list(infos)
        if not servers:
            raise RuntimeError("weight sync 'distributed': no server answers /server_info to form a group with")
        tp = [int(infos[s].get("tp_size", 1)) for s in servers]
        self.backend = choose_sync_backend({s.url: infos[s].get("device") for s in servers}, self.forced_backend)
        world = 1 + sum(tp)
        addr, port = choose_master_address([s.url for s in servers], self.ctx.master_address), free_port()
        offsets = {s.url: 1 + sum(tp[:i]) for i, s in enumerate(servers)}
        # Both sides block on the rendezvous: the servers' joins run while this process joins below.
        fan = Fanout([s.url for s in servers], "/init_weights_update_group", lambda url: {
            "master_address": addr, "master_port": port, "rank_offset": offsets[url], "world_size": world,
            "group_name": self.group_name, "backend": self.backend}, timeout=self.timeout.total_seconds())
        # The store server the servers' tcp:// rendezvous joins, built as torch's rendezvous builds it for rank 0
        # but directly: under torchrun (TORCHELASTIC_USE_AGENT_STORE) rendezvous would make this process a client
        # of a store that nobody hosts on this port, and the sync would hang.
        store = torch.distributed.TCPStore(addr, port, world, True, self.timeout, wait_for_workers=False,
                                           multi_tenant=True)
        store.set_timeout(self.timeout)
        store = PrefixStore(self.group_name, store)
        pg, _ = _new_process_group_helper(world, 0, [], Backend(self.backend), store, group_name=self.group_name,
                                          timeout=self.timeout)
        _world.pg_group_ranks[pg] = {i: i for i in range(world)}
        try:
            fan.check()
        except RuntimeError:
            torch.distributed.destroy_process_group(pg)
            raise
        self.pg, self.servers = pg, [s.url for s in servers]
        logger.info("weight sync: %s group %s with %d servers (world %d) at %s:%d", self.backend, self.group_name,
                    len(servers), world, addr, port)
        return servers

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        if self.pg is None or [s.url for s in servers] != self.servers:
            self.close()                 # the servers changed (one died or came back): form a new group
            servers = self._init_group(servers)
        errors, sent, nbytes, n_buckets = [], set(), 0, 0
        try:
            for bucket in self.buckets(named_tensors, errors):
                n_buckets += 1
                payload = {"names": [n for n, _ in bucket],
                           "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                           "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                           "flush_cache": False}
                fan = Fanout(self.servers, "/update_weights_from_distributed", payload,
                             timeout=self.timeout.total_seconds())
                for _, t in bucket:
                    # Servers post one receive per tensor in the same order (weight_updater.py); src is rank 0.
                    self._broadcast(t)
                    nbytes += t.numel() * t.element_size()
                self.ctx.pool.settle(fan, servers, check=False)    # marks a server that died
                fan.check()                                         # and fails the sync for any failure
                sent.update(n for n, _ in bucket)
        except BaseException as err:
            # A broadcast group cannot lose a member mid-sync: this sync fails (a dead server is marked, and
            # restarted when launched here); the next one forms a new group with the servers then standing.
            self.close()
            if isinstance(err, Exception) and not isinstance(err, ValueError):
                raise RuntimeError(f"weight sync 'distributed' to version {version} failed: {err}. The group is "
                                   "dissolved; the next sync forms a new one without dead servers") from err
            raise
        complete = self.finish(errors, seen, sent, version)
        return {"bytes": nbytes, "tensors": len(sent), "buckets": n_buckets, "complete": complete}

    @property
    def device(self) -> str:
        """Where the buckets are gathered: NCCL broadcasts GPU tensors, gloo host tensors (before the group has
        formed, with no backend forced: this process's device)."""
        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        return "cuda" if backend == "nccl" else "cpu"

    def _broadcast(self, t: torch.Tensor) -> None:
        """Broadcast ``t`` from this process (rank 0) over the servers' group. The group lives outside torch's
        default world (this process may have none, e.g. an engine used on its own), which megatron_entcov.
        collectives' functions require, so the group object is called directly, after the same device check."""
        from megatron_entcov.distributed.collectives import DevicePlacementError

        if t.is_cuda != (self.backend == "nccl"):
            raise DevicePlacementError(f"weight sync 'distributed': a {t.device} tensor {tuple(t.shape)} for the "
                                       f"{self.backend} group with the servers (NCCL takes CUDA tensors, gloo host "
                                       "tensors)")
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()

    def close(self) -> None:
        if self.pg is None:
            return
        # Servers that died answer nothing; a live one leaves the old group so a new one can form.
        for url, reply in Fanout(self.servers, "/destroy_weights_update_group", {"group_name": self.group_name},
                                 timeout=30).failures().items():
            logger.debug("destroy_weights_update_group on %s: %s", url, reply)
        try:
            torch.distributed.destroy_process_group(self.pg)
        except Exception as err:
            logger.debug("destroy_process_group: %s", err)
        self.pg = None


# ---------------------------------------------------------------------------------------------- NCCL versions

_NCCL_PROBE = """
import importlib.metadata as md
dists = sorted(d.metadata["Name"] for d in md.distributions()
               if (d.metadata["Name"] or "").lower().replace("_", "-").startswith("nvidia-nccl-cu"))
try:
    import torch
    v = torch.cuda.nccl.version()
except Exception:
    v = md.version(dists[0]) if dists else ""
print(repr(v), dists[0] if dists else "")
"""
"""Run by the servers' python: its torch's NCCL version (else its nvidia-nccl-cu* wheel's) and that wheel."""


def _nccl_text(version) -> str | None:
    """'2.29.7' from torch.cuda.nccl.version()'s tuple (or NCCL's integer code, or a version string)."""
    if isinstance(version, tuple | list) and len(version) >= 3:
        return ".".join(str(int(x)) for x in version[:3])
    if isinstance(version, int) and version > 0:
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}" if version >= 10000 else \
            f"{version // 1000}.{version // 100 % 10}.{version % 100}"
    return str(version) if isinstance(version, str) and version else None


def trainer_nccl_version() -> str | None:
    """The NCCL this process's torch loaded, e.g. '2.29.7'; None without one."""
    try:
        return _nccl_text(torch.cuda.nccl.version())
    except Exception:                # a CPU build of torch, or no libnccl
        return None


def server_nccl_version(python: str, timeout_s: float = 180.0) -> tuple[str | None, str]:
    """(NCCL version, nvidia-nccl-cu* wheel name or '') of the servers' venv, asked of its ``python`` (its torch,
    else the wheel's package metadata: no GPU needed). (None, '') when it cannot tell."""
    import ast

    try:
        out = subprocess.run([python, "-c", _NCCL_PROBE], capture_output=True, text=True, timeout=timeout_s,
                             env={k: v for k, v in os.environ.items()
                                  if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")})
        value, _, dist = out.stdout.strip().splitlines()[-1].partition(" ")
        return _nccl_text(ast.literal_eval(value)), dist.strip()
    except (OSError, subprocess.SubprocessError, IndexError, ValueError, SyntaxError):
        return None, ""


def check_nccl_versions(server_python: str | None, servers: str) -> None:
    """Refuse an NCCL weight-sync group between a trainer and servers whose NCCL versions differ (NCCL refuses
    them at the first broadcast). ``server_python``: the launched servers' python; None (servers at URLs) = not
    known here: logged. RuntimeError, one line naming both versions and the fix."""
    mine = trainer_nccl_version()
    theirs, dist = server_nccl_version(server_python) if server_python else (None, "")
    if mine is None or theirs is None:
        logger.info("weight sync 'distributed' over NCCL: the NCCL version of %s is unknown here (this process "
                    "has %s); the first broadcast fails if they differ, so use one NCCL for both (docs/sglang.md)",
                    servers if theirs is None else "this process", mine or "none")
        return
    if mine != theirs:
        dist = dist or "nvidia-nccl-cu12"
        raise RuntimeError(
            f"rollout.sglang.sync_method=distributed: this trainer's NCCL is {mine} but {servers} have NCCL "
            f"{theirs}, and NCCL refuses mismatched versions at the first broadcast; use sync_method=tensor "
            f"(colocated servers) or disk, or pin one NCCL for both venvs, e.g. install the servers' "
            f"`{dist}=={theirs}` into the trainer's venv (torch loads that wheel's libnccl; docs/sglang.md)")
    logger.info("weight sync 'distributed': NCCL %s in this process and %s", mine, servers)


# ---------------------------------------------------------------------------------------------- tensor payloads


Bucket = list  # [(hf_name, tensor), ...]


def server_gpu_ids(info: dict, url: str) -> list[int]:
    """The GPU of each tensor-parallel rank of an SGLang server, from its ``/server_info``: SGLang puts tp rank r
    of a one-node, one-stage server on ``base_gpu_id + r * gpu_id_step`` (its engine's scheduler launch). These
    are indices in the server's launch numbering, which is this process's for the colocated servers the engine
    launches (they inherit its CUDA_VISIBLE_DEVICES). ValueError for layouts one payload per tp rank cannot
    serve (pipeline stages, several nodes)."""
    tp = int(info.get("tp_size", 1))
    pp, nnodes = int(info.get("pp_size", 1)), int(info.get("nnodes", 1))
    if pp != 1 or nnodes != 1:
        raise ValueError(f"weight sync 'tensor' to {url}: the server runs pp_size={pp} over nnodes={nnodes}; CUDA "
                         "IPC payloads go one per tensor-parallel rank of a one-node server: launch it with "
                         "--pp-size 1 on one node, or set rollout.sglang.sync_method to 'distributed' or 'disk'")
    base, step = int(info.get("base_gpu_id", 0)), int(info.get("gpu_id_step", 1))
    return [base + r * step for r in range(tp)]


def rank_payloads(bucket: Bucket, gpus: list[int | None], *, place: Callable[[Bucket, int], Bucket],
                  serialize: Callable[[Bucket], str], copies: dict) -> list[str]:
    """``serialized_named_tensors`` for one server: entry r is the bucket on ``gpus[r]``, serialized for tp rank
    r alone (sglang's scheduler deserializes only its own entry; one IPC handle opened by two ranks would break
    the sender's CUDA-IPC reference counts).

    Args:
        bucket: [(name, tensor), ...] as the trainer produced it (on its own device).
        gpus: the GPU of each tp rank (:func:`server_gpu_ids`), or None where the bucket is sent as it is (CPU
            shared memory).
        place: (bucket, gpu) -> the bucket on that GPU (:func:`copy_bucket_to_gpu`).
        serialize: a bucket -> its base64 payload (:func:`serialize_cuda_ipc`, ``TensorTransport.serialize``).
        copies: gpu -> that GPU's copy, shared by every server rank on the GPU (and across servers); the caller
            keeps it alive until every server has answered: the IPC handles point into it.
    """
    payloads = []
    for gpu in gpus:
        if gpu is None:
            placed = bucket
        else:
            if gpu not in copies:
                copies[gpu] = place(bucket, gpu)
            placed = copies[gpu]
        payloads.append(serialize(placed))
    return payloads


def copy_bucket_to_gpu(bucket: Bucket, gpu: int) -> Bucket:
    """The bucket on GPU ``gpu`` (tensors already there are not copied), the copies complete when it returns."""
    device = torch.device("cuda", gpu)
    out = [(name, t.to(device)) for name, t in bucket]
    torch.cuda.synchronize(device)
    return out


_REDUCE_TENSOR_DEVICE_ARG = 6
"""Index of the device in the arguments torch's ``reduce_tensor`` gives ``rebuild_cuda_tensor`` (what sglang's
patch_torch.py rewrites too)."""


def _with_device_uuid(rebuild, args: tuple, uuid_of: Callable[[int], str]) -> tuple:
    """``reduce_tensor``'s arguments with a CUDA tensor's device index replaced by its GPU's UUID."""
    from torch.multiprocessing import reductions

    if rebuild is not reductions.rebuild_cuda_tensor:
        return args                       # a host tensor: shared memory, no device
    index = args[_REDUCE_TENSOR_DEVICE_ARG]
    if not isinstance(index, int):
        raise RuntimeError(f"torch's reduce_tensor gave {type(index).__name__} {index!r} where the CUDA device index "
                           f"was expected (argument {_REDUCE_TENSOR_DEVICE_ARG}); this torch changed its layout")
    return (*args[:_REDUCE_TENSOR_DEVICE_ARG], uuid_of(index), *args[_REDUCE_TENSOR_DEVICE_ARG + 1:])


def _cuda_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_tensor_with_device_uuid(tensor: torch.Tensor):
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    return rebuild, _with_device_uuid(rebuild, args, _cuda_uuid)


def serialize_cuda_ipc(obj) -> str:
    """What sglang's ``MultiprocessingSerializer.serialize(obj, output_str=True)`` produces after its
    ``monkey_patch_torch_reductions`` (as sglang's own senders run it): CUDA tensors as IPC handles whose device
    is the GPU's UUID, not this process's device index. The receiving scheduler applies the same patch before it
    deserializes, and maps the UUID to its own index: right even when its device numbering differs from ours.
    This process's torch is left unpatched (the reduction is set on this pickler only)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table[torch.Tensor] = _reduce_tensor_with_device_uuid
    pickler.dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TensorTransport(Transport):
    """/update_weights_from_tensor with ForkingPickler payloads, one per server tp rank (shared memory on CPU,
    CUDA IPC handles to a copy on each rank's own GPU)."""

    def __init__(self, ctx: TransportContext, *, place: Callable[[Bucket, int], Bucket] | None = None,
                 serialize: Callable[[Bucket], str] | None = None):
        """
        Args:
            place: (bucket, gpu index) -> the bucket on that GPU; default :func:`copy_bucket_to_gpu` when this
                process has CUDA. Given (a test on CPU), payloads are built per server GPU as on a GPU machine.
            serialize: bucket -> payload; default :func:`serialize_cuda_ipc` with CUDA, else
                :meth:`serialize` (plain ForkingPickler: shared memory).
        """
        super().__init__(ctx)
        import torch.multiprocessing as tmp

        # Registers torch's tensor reductions with ForkingPickler; file_system: see docs/design/rollout.md.
        tmp.set_sharing_strategy("file_system")
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        self.per_gpu = cuda or place is not None
        self.place = place or copy_bucket_to_gpu
        self.serialize_bucket = serialize or (serialize_cuda_ipc if cuda else self.serialize)

    @staticmethod
    def serialize(obj) -> str:
        """What sglang's MultiprocessingSerializer.serialize(obj, output_str=True) produces."""
        from multiprocessing.reduction import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        infos = self.server_infos(servers)
        servers = list(infos)
        gpus = {s: server_gpu_ids(info, s.url) if self.per_gpu else [None] * int(info.get("tp_size", 1))
                for s, info in infos.items()}
        errors, sent, nbytes, n_buckets = [], set(), 0, 0
        for bucket in self.buckets(named_tensors, errors):
            n_buckets += 1
            # `bucket` and `copies` stay alive until every server has answered: CUDA IPC handles and
            # shared-memory files point into them.
            copies: dict = {}
            bodies = {s: {"serialized_named_tensors": rank_payloads(bucket, gpus[s], place=self.place,
                                                                    serialize=self.serialize_bucket, copies=copies),
                          "load_format": None, "flush_cache": False} for s in servers}
            servers = self.ctx.pool.post_all(servers, "/update_weights_from_tensor", lambda s: bodies[s])
            sent.update(n for n, _ in bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            copies.clear()                # free this bucket's GPU copies before the next bucket is gathered
            bodies.clear()
            del bucket
        if self.per_gpu and torch.cuda.is_available():
            # The copies' blocks stay in this process's allocator cache on the servers' GPUs otherwise.
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
        complete = self.finish(errors, seen, sent, version)
        return {"bytes": nbytes, "tensors": len(sent), "buckets": n_buckets, "complete": complete}
