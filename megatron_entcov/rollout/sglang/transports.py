"""Weight transports from the trainer to SGLang servers, used by ``SGLangEngine.update_weights``.

``WeightSync.push`` (weights/sync.py) hands the engine buckets of full HF-named tensors; the engine wraps the
transfer in pause/begin/end/version/continue calls and verifies the version (rollout/sglang/engine.py); a
transport only moves the tensors. None of them imports sglang (the trainer cannot: different torch).
A transport gets what it needs from the engine explicitly (:class:`TransportContext`) and reaches the servers
through the engine's ``ServerPool`` (rollout/sglang/pool.py), which marks a server that died.

- 'disk': each bucket is written as one safetensors file into a fresh directory (plus config.json), then every
  server is told ``/update_weights_from_disk {model_path}``. Needs a file system the servers can read (local or
  shared); costs one write and one read of the whole model per sync. The robust fallback.
- 'distributed': at the first sync, a process group is formed between this process (rank 0) and every server's
  TP ranks (``/init_weights_update_group``, gloo on CPU, NCCL on GPU); per bucket, every server is sent
  ``/update_weights_from_distributed {names, dtypes, shapes}`` while this process broadcasts each tensor in the
  same order. No file system, one copy per tensor; servers on other nodes need ``master_address`` (the
  engine's ``sync_master_address``) reachable from them.
- 'tensor': per bucket, ``/update_weights_from_tensor`` with the bucket pickled the way sglang's
  MultiprocessingSerializer does it (multiprocessing's ForkingPickler + base64; plain stdlib + torch, no sglang
  import): CPU tensors travel through shared memory (torch's 'file_system' sharing strategy, which this
  transport sets process-wide: the default 'file_descriptor' strategy makes the server's scheduler die), CUDA
  tensors as CUDA IPC handles. Colocated servers only (same host). The sender keeps each bucket alive until
  every server has answered.

Every transport validates names and shapes against the HF model (``expected_shapes``) before sending, converts
to the model dtype, drops ``lm_head.weight`` of a tied model (the server shares the embedding), and drains the
producer on a bad tensor before raising (the producer may run gather collectives). A server that dies during a
'disk' or 'tensor' sync drops out of it (the others still get the weights); a 'distributed' sync fails instead.

Example:
    ctx = TransportContext(model_cfg=cfg.model, pool=pool, shapes=expected_shapes(cfg.model))
    transport = build_transport("disk", ctx)
    stats = transport.sync(buckets, version=3, seen=set(), servers=pool.standing())   # {"bytes", "complete", ...}
    transport.close()
"""

from __future__ import annotations

import abc
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from megatron_entcov.rollout.engine import NamedTensors, iter_named_tensors
from megatron_entcov.rollout.sglang.http import Fanout, ServerError, http_json
from megatron_entcov.rollout.sglang.pool import LIVE, STALE, Server, ServerPool

logger = logging.getLogger(__name__)

__all__ = ["SYNC_METHODS", "TransportContext", "expected_shapes", "build_transport", "DiskTransport",
           "DistributedTransport", "TensorTransport"]

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
    master_address: str = "127.0.0.1"
    """'distributed': the address the servers reach this process at."""
    keep_weights: Callable[[Path, int], None] | None = None
    """'disk': called with (directory, version) after a sync that sent every tensor; the callee owns the
    directory from then on (restarted servers launch from it). None = the directory is deleted."""


def expected_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of the policy's Hugging Face model (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.weights.hf_config import to_hf_config

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

    def tp_sizes(self, servers: list[Server]) -> dict[Server, int]:
        """Each standing server's tensor-parallel size (``/server_info``): its ranks in a group, its payload
        count. A server that does not answer is marked by the pool and left out when it is dead."""
        out = {}
        for s in servers:
            try:
                out[s] = int(http_json(s.url, "/server_info", timeout=30).get("tp_size", 1))
            except ServerError as err:
                if not err.retryable:
                    raise
                self.ctx.pool.mark_failure(s, err)
                if s.state in (LIVE, STALE):
                    raise
        return out

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


class DistributedTransport(Transport):
    """A process group with the servers; per bucket, HTTP metadata + broadcast from this process (rank 0)."""

    def __init__(self, ctx: TransportContext, backend: str | None = None, timeout_s: float = 600.0):
        super().__init__(ctx)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = "cuda" if self.backend == "nccl" else "cpu"      # NCCL broadcasts GPU tensors
        self.timeout = timedelta(seconds=timeout_s)
        self.group_name = f"entcov_weights_{uuid.uuid4().hex[:8]}"
        self.pg = None
        self.servers: list[str] = []     # URLs of the group's members, in rank order

    def _init_group(self, servers: list[Server]) -> list[Server]:
        """Form the group with the servers that answer; returns them (rank order)."""
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        from megatron_entcov.net import free_port

        tp_of = self.tp_sizes(servers)
        servers = list(tp_of)
        if not servers:
            raise RuntimeError("weight sync 'distributed': no server answers /server_info to form a group with")
        tp = [tp_of[s] for s in servers]
        world = 1 + sum(tp)
        addr, port = self.ctx.master_address, free_port()
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
                    torch.distributed.broadcast(t, src=0, group=self.pg)
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


class TensorTransport(Transport):
    """/update_weights_from_tensor with ForkingPickler payloads (shared memory on CPU, CUDA IPC on GPU)."""

    def __init__(self, ctx: TransportContext):
        super().__init__(ctx)
        import torch.multiprocessing as tmp

        # Registers torch's tensor reductions with ForkingPickler; file_system: see the module docstring.
        tmp.set_sharing_strategy("file_system")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @staticmethod
    def serialize(obj) -> str:
        """What sglang's MultiprocessingSerializer.serialize(obj, output_str=True) produces."""
        import base64
        import io
        from multiprocessing.reduction import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        tp = self.tp_sizes(servers)
        servers = list(tp)
        errors, sent, nbytes, n_buckets = [], set(), 0, 0
        for bucket in self.buckets(named_tensors, errors):
            n_buckets += 1
            # `bucket` (on self.device) stays alive until every server has answered: CUDA IPC handles and
            # shared-memory files point into it.
            payload = self.serialize(bucket)
            servers = self.ctx.pool.post_all(servers, "/update_weights_from_tensor", lambda s: {
                "serialized_named_tensors": [payload] * tp[s], "load_format": None, "flush_cache": False})
            sent.update(n for n, _ in bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        complete = self.finish(errors, seen, sent, version)
        return {"bytes": nbytes, "tensors": len(sent), "buckets": n_buckets, "complete": complete}
