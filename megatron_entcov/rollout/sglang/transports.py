"""Weight transports from the trainer to SGLang servers, used by ``SGLangEngine.update_weights``.

``WeightSync.push`` (weight_sync.py) hands the engine buckets of full HF-named tensors; the engine wraps the
transfer in pause/begin/end/version/continue calls and verifies the version (rollout/sglang.py); a transport
only moves the tensors. None of them imports sglang (the trainer cannot: different torch).

- 'disk': each bucket is written as one safetensors file into a fresh directory (plus config.json), then every
  server is told ``/update_weights_from_disk {model_path}``. Needs a file system the servers can read (local or
  shared); costs one write and one read of the whole model per sync. The robust fallback.
- 'distributed': at the first sync, a process group is formed between this process (rank 0) and every server's
  TP ranks (``/init_weights_update_group``, gloo on CPU, NCCL on GPU); per bucket, every server is sent
  ``/update_weights_from_distributed {names, dtypes, shapes}`` while this process broadcasts each tensor in the
  same order. No file system, one copy per tensor; servers on other nodes need ``sync_master_address``
  reachable from them.
- 'tensor': per bucket, ``/update_weights_from_tensor`` with the bucket pickled the way sglang's
  MultiprocessingSerializer does it (multiprocessing's ForkingPickler + base64; plain stdlib + torch, no sglang
  import): CPU tensors travel through shared memory (torch's 'file_system' sharing strategy, which this
  transport sets process-wide: the default 'file_descriptor' strategy makes the server's scheduler die), CUDA
  tensors as CUDA IPC handles. Colocated servers only (same host). The sender keeps each bucket alive until
  every server has answered.

Every transport validates names and shapes against the HF model (``expected_shapes``) before sending, converts
to the model dtype, drops ``lm_head.weight`` of a tied model (the server shares the embedding), and drains the
producer on a bad tensor before raising (the producer may run gather collectives).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch

from megatron_entcov.rollout.engine import NamedTensors, iter_named_tensors

logger = logging.getLogger(__name__)

__all__ = ["SYNC_METHODS", "expected_shapes", "build_transport", "DiskTransport", "DistributedTransport",
           "TensorTransport"]

SYNC_METHODS = ("disk", "distributed", "tensor")


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


def build_transport(method: str, engine, shapes: dict[str, tuple[int, ...]]):
    if method == "disk":
        return DiskTransport(engine, shapes)
    if method == "distributed":
        return DistributedTransport(engine, shapes)
    if method == "tensor":
        return TensorTransport(engine, shapes)
    raise ValueError(f"sync_method={method!r} is invalid: choose one of {', '.join(map(repr, SYNC_METHODS))}")


class _Validated:
    """Shared checks: iterate buckets, validate, convert; raise after draining."""

    device = "cpu"
    """Where a transport wants its tensors (a GPU transport keeps gathered GPU tensors on the GPU)."""

    def __init__(self, engine, shapes):
        self.engine, self.shapes = engine, shapes
        self.dtype = getattr(torch, engine.model_cfg.params_dtype)
        self.tied = bool(engine.model_cfg.tie_word_embeddings)

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


class DiskTransport(_Validated):
    """Safetensors files in a temporary directory + /update_weights_from_disk on every server."""

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list) -> dict:
        from safetensors.torch import save_file

        errors, sent, nbytes, index = [], set(), 0, {}
        out_dir = Path(tempfile.mkdtemp(prefix=f"weights-v{version}-", dir=self.engine.sync_dir))
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
            if self.engine.model_dir:
                # config, generation config, tokenizer: what a server launched from this directory also reads
                for f in Path(self.engine.model_dir).iterdir():
                    if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
                        shutil.copy(f, out_dir / f.name)
            t_write = time.monotonic() - t0
            self.engine._post_all(servers, "/update_weights_from_disk",
                                  {"model_path": str(out_dir), "flush_cache": False})
            t_load = time.monotonic() - t0 - t_write
            complete = self.finish(errors, seen, sent, version)
            if complete:                         # restarted servers launch from these weights
                self.engine.keep_weights(out_dir, version)
                kept = True
        finally:
            if not kept:
                shutil.rmtree(out_dir, ignore_errors=True)
        return {"bytes": nbytes, "tensors": len(sent), "write_s": t_write, "load_s": t_load, "complete": complete}

    def close(self) -> None:
        pass


class DistributedTransport(_Validated):
    """A process group with the servers; per bucket, HTTP metadata + broadcast from this process (rank 0)."""

    def __init__(self, engine, shapes, backend: str | None = None, timeout_s: float = 600.0):
        super().__init__(engine, shapes)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = "cuda" if self.backend == "nccl" else "cpu"      # NCCL broadcasts GPU tensors
        self.timeout = timedelta(seconds=timeout_s)
        self.group_name = f"entcov_weights_{uuid.uuid4().hex[:8]}"
        self.pg = None
        self.servers: list[str] = []     # URLs of the group's members, in rank order

    def _init_group(self, servers: list) -> None:
        from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                        rendezvous)

        from megatron_entcov.rollout.sglang.http import Fanout, http_json
        from megatron_entcov.net import free_port

        tp = [int(http_json(s.url, "/server_info", timeout=30).get("tp_size", 1)) for s in servers]
        world = 1 + sum(tp)
        addr, port = self.engine.sync_master_address, free_port()
        offsets = {s.url: 1 + sum(tp[:i]) for i, s in enumerate(servers)}
        # Both sides block on the rendezvous: the servers' joins run while this process joins below.
        fan = Fanout([s.url for s in servers], "/init_weights_update_group", lambda url: {
            "master_address": addr, "master_port": port, "rank_offset": offsets[url], "world_size": world,
            "group_name": self.group_name, "backend": self.backend}, timeout=self.timeout.total_seconds())
        # Same construction as sglang's init_custom_process_group, so both sides meet in one store namespace.
        store, _, _ = next(rendezvous(f"tcp://{addr}:{port}", 0, world, timeout=self.timeout))
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

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list) -> dict:
        from megatron_entcov.rollout.sglang.http import Fanout

        if self.pg is None or [s.url for s in servers] != self.servers:
            self.close()                 # the servers changed (one died or came back): form a new group
            self._init_group(servers)
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
                self.engine._settle(fan, servers, check=False)    # marks a server that died
                fan.check()                                        # and fails the sync for any failure
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
        from megatron_entcov.rollout.sglang.http import Fanout

        # Servers that died answer nothing; a live one leaves the old group so a new one can form.
        for url, reply in Fanout(self.servers, "/destroy_weights_update_group", {"group_name": self.group_name},
                                 timeout=30).failures().items():
            logger.debug("destroy_weights_update_group on %s: %s", url, reply)
        try:
            torch.distributed.destroy_process_group(self.pg)
        except Exception as err:
            logger.debug("destroy_process_group: %s", err)
        self.pg = None


class TensorTransport(_Validated):
    """/update_weights_from_tensor with ForkingPickler payloads (shared memory on CPU, CUDA IPC on GPU)."""

    def __init__(self, engine, shapes):
        super().__init__(engine, shapes)
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

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list) -> dict:
        from megatron_entcov.rollout.sglang.http import http_json

        tp = {s: int(http_json(s.url, "/server_info", timeout=30).get("tp_size", 1)) for s in servers}
        errors, sent, nbytes, n_buckets = [], set(), 0, 0
        for bucket in self.buckets(named_tensors, errors):
            n_buckets += 1
            # `bucket` (on self.device) stays alive until every server has answered: CUDA IPC handles and
            # shared-memory files point into it.
            payload = self.serialize(bucket)
            servers = self.engine._post_all(servers, "/update_weights_from_tensor", lambda s: {
                "serialized_named_tensors": [payload] * tp[s], "load_format": None, "flush_cache": False})
            sent.update(n for n, _ in bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        complete = self.finish(errors, seen, sent, version)
        return {"bytes": nbytes, "tensors": len(sent), "buckets": n_buckets, "complete": complete}

    def close(self) -> None:
        pass
