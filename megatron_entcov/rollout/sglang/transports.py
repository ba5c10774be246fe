"""Weight transports from the trainer to SGLang servers, used by ``SGLangEngine.update_weights``.

A transport only moves buckets of full HF-named tensors (the engine wraps it in pause/begin/end/version/continue);
it gets a :class:`TransportContext`, reaches the servers through the engine's ``ServerPool``, never imports
sglang. Every transport packs each bucket once into a flat staging buffer in the model dtype and sends from it on
a pipeline thread while the next bucket is gathered (``transport_base.py``, ``staging.py``).
'disk': each bucket written as one safetensors file straight from its staging buffer, one
``/update_weights_from_disk`` at the end (a file system the servers read). 'distributed': a process group with
every server's TP ranks (gloo for CPU servers, NCCL for GPU servers), one broadcast per bucket
(``load_format="flattened_bucket"``). 'tensor' (``tensor_transport.py``): ``/update_weights_from_tensor`` with
shared-memory or CUDA IPC handles to the flat bucket, colocated servers only. A server that dies drops out of a
'disk'/'tensor' sync, a 'distributed' sync fails.

Example:
    transport = build_transport("disk", TransportContext(model_cfg=cfg.model, pool=pool, shapes=shapes))
    stats = transport.sync(buckets, version=3, seen=set(), servers=pool.standing())   # {"bytes", "complete", ...}

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

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
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import torch

from megatron_entcov.rollout.engine import NamedTensors
from megatron_entcov.rollout.sglang.http import Fanout
from megatron_entcov.rollout.sglang.pool import Server
from megatron_entcov.rollout.sglang.staging import FlatBucket, SendPipeline
from megatron_entcov.rollout.sglang.tensor_transport import (
    TensorTransport,
    copy_bucket_to_gpu,
    flat_payload,
    rank_payloads,
    serialize_cuda_ipc,
    server_gpu_ids,
)
from megatron_entcov.rollout.sglang.transport_base import (
    PIPELINE_DEPTH,
    SyncStats,
    Transport,
    TransportContext,
    expected_shapes,
)

logger = logging.getLogger(__name__)

__all__ = ["SYNC_METHODS", "SYNC_BACKENDS", "TransportContext", "expected_shapes", "build_transport",
           "choose_master_address", "route_address", "choose_sync_backend", "trainer_nccl_version",
           "server_nccl_version", "check_nccl_versions", "server_gpu_ids", "rank_payloads", "copy_bucket_to_gpu",
           "serialize_cuda_ipc", "flat_payload", "DiskTransport", "DistributedTransport", "TensorTransport"]

SYNC_METHODS = ("disk", "distributed", "tensor")


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


class DiskTransport(Transport):
    """Safetensors files in a temporary directory + /update_weights_from_disk on every server."""

    skips_unchanged = False           # the directory must hold the whole model: restarted servers launch from it

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        errors, st, index = [], SyncStats(), {}
        out_dir = Path(tempfile.mkdtemp(prefix=f"weights-v{version}-", dir=self.ctx.sync_dir))
        kept = False
        try:
            t0 = time.monotonic()
            with SendPipeline(lambda fb: self._write(fb, out_dir, index, st), depth=PIPELINE_DEPTH) as pipe:
                for fb in self.packed(named_tensors, errors, servers):
                    pipe.submit(fb)
                pipe.finish()
            if errors:                           # nothing reaches the servers
                self.finish(errors, seen, st.sent, version)
            self._write_index(out_dir, index, st.nbytes)
            t_write = time.monotonic() - t0
            self.ctx.pool.post_all(servers, "/update_weights_from_disk",
                                   {"model_path": str(out_dir), "flush_cache": False})
            t_load = time.monotonic() - t0 - t_write
            complete = self.finish(errors, seen, st.sent, version)
            if complete and self.ctx.keep_weights is not None:    # restarted servers launch from these weights
                self.ctx.keep_weights(out_dir, version)
                kept = True
        finally:
            if not kept:
                shutil.rmtree(out_dir, ignore_errors=True)
        return self.stats(st, complete, write_s=t_write, load_s=t_load)

    @staticmethod
    def _write(fb: FlatBucket, out_dir: Path, index: dict, st: SyncStats) -> None:
        """One safetensors file: the header, then the staging buffer as it is (its layout is the data section's),
        written on the pipeline thread while the next bucket is packed."""
        fname = f"model-{st.buckets:05d}.safetensors"
        flat = fb.flat if fb.flat.device.type == "cpu" else fb.flat.cpu()
        with open(out_dir / fname, "wb") as f:
            f.write(fb.safetensors_header())
            f.write(memoryview(flat.numpy()))
        index.update(dict.fromkeys(fb.names, fname))
        st.add(fb)

    def _write_index(self, out_dir: Path, index: dict, nbytes: int) -> None:
        """The shard index, and the initial model directory's other files (config, generation config,
        tokenizer: what a server launched from this directory also reads)."""
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": nbytes}, "weight_map": index}))
        if self.ctx.model_dir:
            for f in Path(self.ctx.model_dir).iterdir():
                if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
                    shutil.copy(f, out_dir / f.name)


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
        errors, st = [], SyncStats()
        try:
            with SendPipeline(lambda fb: self._send(fb, servers, version, st), depth=PIPELINE_DEPTH) as pipe:
                for fb in self.packed(named_tensors, errors, servers):
                    pipe.submit(fb)
                pipe.finish()
        except BaseException as err:
            # A broadcast group cannot lose a member mid-sync: this sync fails (a dead server is marked, and
            # restarted when launched here); the next one forms a new group with the servers then standing.
            self.close()
            if isinstance(err, Exception) and not isinstance(err, ValueError):
                raise RuntimeError(f"weight sync 'distributed' to version {version} failed: {err}. The group is "
                                   "dissolved; the next sync forms a new one without dead servers") from err
            raise
        finally:
            if self.backend == "nccl":
                self.ring.clear()        # GPU staging goes back to the allocator (colocated servers need it)
        return self.stats(st, self.finish(errors, seen, st.sent, version))

    def _send(self, fb: FlatBucket, servers: list[Server], version: int, st: SyncStats) -> None:
        """One bucket on the pipeline thread: every server is told its names, dtypes and shapes (SGLang's
        ``load_format="flattened_bucket"``: it receives one uint8 tensor and views its slices), this process
        broadcasts the packed bytes, and every server must answer before the next bucket."""
        payload = {"names": fb.names, "dtypes": [str(self.dtype).removeprefix("torch.")] * len(fb.entries),
                   "shapes": [list(shape) for _, shape, _, _ in fb.entries], "group_name": self.group_name,
                   "flush_cache": False, "load_format": "flattened_bucket"}
        fan = Fanout(self.servers, "/update_weights_from_distributed", payload, timeout=self.timeout.total_seconds())
        self._broadcast(fb.flat)
        self.ctx.pool.settle(fan, servers, check=False)    # marks a server that died
        fan.check()                                         # and fails the sync for any failure
        st.add(fb)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """Staging where the group's backend broadcasts from (NCCL: this process's GPU; gloo: host memory)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

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


