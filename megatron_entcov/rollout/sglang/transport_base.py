"""What every SGLang weight transport shares: its context, the checks on what it is given, and the packing of each
bucket into a staging buffer (rollout/sglang/staging.py) that the transport then sends on its pipeline thread.

A transport receives buckets of full HF-named tensors (``weights/sync.py``), checks each name and shape against
the HF model (``expected_shapes``), drops ``lm_head.weight`` of a tied model, and casts and lays out every tensor
once into a flat staging buffer in the model dtype: that buffer is what goes to the servers (shared memory, a
broadcast, a file). On a bad tensor nothing more is sent and the producer is drained before the error is raised
(it may run gather collectives). ``weight_sync.only_changed`` leaves out the tensors whose bytes equal those of
the last complete sync (:class:`ChangeFilter`).

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_entcov.rollout.engine import NamedTensors, iter_named_tensors
from megatron_entcov.rollout.sglang.http import ServerError, http_json
from megatron_entcov.rollout.sglang.pool import LIVE, STALE, Server, ServerPool
from megatron_entcov.rollout.sglang.staging import FlatBucket, StagingRing, bucket_nbytes, fingerprint

logger = logging.getLogger(__name__)

__all__ = ["TransportContext", "Transport", "ChangeFilter", "expected_shapes", "SyncStats"]

PIPELINE_DEPTH = 1
"""Buckets sent (queued or in flight) while the next one is packed: 1 = bucket k travels and loads while bucket
k+1 is gathered and packed. The staging ring holds PIPELINE_DEPTH + 1 buckets."""


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
    None = chosen when the group forms (``transports.choose_master_address``)."""
    keep_weights: Callable[[Path, int], None] | None = None
    """'disk': called with (directory, version) after a sync that sent every tensor; the callee owns the
    directory from then on (restarted servers launch from it). None = the directory is deleted."""
    only_changed: bool = False
    """``weight_sync.only_changed``: leave out tensors whose bytes equal the last complete sync's ('tensor' and
    'distributed'; 'disk' always writes the whole model, which restarted servers launch from)."""


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


class ChangeFilter:
    """``weight_sync.only_changed``: the SHA-1 of each tensor's bytes (model dtype) at the last complete sync.

    A tensor is left out when its digest equals that sync's, unless the sync is full: the first one, the first
    after a sync that did not complete (``commit`` was not called: what the servers hold is not known), or one
    to a stale server (restarted: it holds the initial weights). The digests of a sync are kept only when the
    engine calls :meth:`commit` after its version check."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.committed: dict[str, bytes] = {}
        self.pending: dict[str, bytes] = {}
        self.full = True
        self.skipped: list[str] = []
        self.skipped_bytes = 0

    def start(self, servers: list[Server]) -> None:
        stale = any(s.state == STALE for s in servers)
        self.full = not self.enabled or not self.committed or stale or bool(self.pending)
        if self.pending:                 # the last sync was not committed: forget what it was compared with
            self.committed.clear()
        self.pending, self.skipped, self.skipped_bytes = {}, [], 0

    def unchanged(self, name: str, staged: torch.Tensor) -> bool:
        """Record the staged tensor's digest; whether it may be left out of this sync."""
        if not self.enabled:
            return False
        digest = self.pending[name] = fingerprint(staged)
        if self.full or self.committed.get(name) != digest:
            return False
        self.skipped.append(name)
        self.skipped_bytes += staged.numel() * staged.element_size()
        return True

    def commit(self) -> None:
        self.committed.update(self.pending)
        self.pending = {}


class SyncStats:
    """What a sync sent, updated by the sending thread (read after it finished)."""

    def __init__(self):
        self.sent: set[str] = set()
        self.nbytes = 0
        self.buckets = 0

    def add(self, fb: FlatBucket) -> None:
        self.sent.update(fb.names)
        self.nbytes += fb.nbytes
        self.buckets += 1


class Transport(abc.ABC):
    """The common part: iterate buckets, validate, pack; raise after draining. Subclasses implement ``sync``
    (with :meth:`packed` and a :class:`~megatron_entcov.rollout.sglang.staging.SendPipeline`), ``alloc`` (a
    staging buffer) and ``close`` when they hold something between syncs."""

    device = "cpu"
    """Where a transport wants its tensors (a GPU transport keeps gathered GPU tensors on the GPU)."""
    skips_unchanged = True
    """Whether ``only_changed`` applies (not to 'disk', whose directory must hold the whole model)."""

    def __init__(self, ctx: TransportContext):
        self.ctx, self.shapes = ctx, ctx.shapes
        self.dtype = getattr(torch, ctx.model_cfg.params_dtype)
        self.tied = bool(ctx.model_cfg.tie_word_embeddings)
        self.ring = StagingRing(PIPELINE_DEPTH + 1, lambda n: self.alloc(n))
        self.changes = ChangeFilter(bool(ctx.only_changed) and self.skips_unchanged)

    @abc.abstractmethod
    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        """Send every tensor to ``servers`` (inside the engine's begin/end_weight_update); ``seen`` collects the
        names ever sent. Returns stats with at least ``bytes``, ``tensors`` and ``complete`` (every tensor was
        sent, or left out as unchanged: a stale server that got it is live again)."""

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A staging buffer of ``nbytes`` (uint8) where this transport sends from: host memory by default."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def close(self) -> None:
        """Release what the transport holds between syncs (a process group); idempotent."""

    def commit(self) -> None:
        """The engine's version check passed: the servers hold this sync's tensors (``only_changed``)."""
        self.changes.commit()

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

    def packed(self, named_tensors: NamedTensors, errors: list, servers: list[Server]) -> Iterator[FlatBucket]:
        """Each producer bucket checked and packed into the next staging buffer, in the model dtype (tied
        ``lm_head.weight`` dropped; unchanged tensors left out under ``only_changed``). A bad tensor goes to
        ``errors``, and every later one is drained unsent."""
        self.changes.start(servers)
        if isinstance(named_tensors, dict):
            named_tensors = [list(named_tensors.items())]
        for item in named_tensors:
            pairs = list(iter_named_tensors([item]))
            if errors:                           # drain: keep a collective producer going, send nothing
                errors.extend(n for n, _ in pairs)
                continue
            keep = self._checked(pairs, errors)
            if errors or not keep:
                continue
            fb = FlatBucket(self.ring.current(bucket_nbytes(keep, self.dtype)), self.dtype)
            for name, t in keep:
                staged = fb.add(name, t.detach())
                if self.changes.unchanged(name, staged):
                    fb.drop_last()
            if fb.entries:
                self.ring.advance()
                yield fb

    def _checked(self, pairs, errors: list) -> list:
        keep = []
        for name, t in pairs:
            msg = self._check(name, t)
            if msg:
                errors.append(msg)
                return []
            if not (self.tied and name == "lm_head.weight"):
                keep.append((name, t))
        return keep

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
        or left it out as unchanged (a server that restarted since the last full sync needs one)."""
        if errors:
            more = f" (and {len(errors) - 1} more tensors after it were not sent)" if len(errors) > 1 else ""
            raise ValueError(errors[0] + more)
        seen |= sent
        missing = sorted(set(self.shapes) - seen - ({"lm_head.weight"} if self.tied else set()))
        if missing:
            raise ValueError(f"update_weights(version={version}): {len(missing)} parameters have never been set "
                             f"since the engine was built, e.g. {missing[:4]}; the first sync must send every tensor")
        covered = sent | set(self.changes.skipped)
        return not (set(self.shapes) - covered - ({"lm_head.weight"} if self.tied else set()))

    def stats(self, st: SyncStats, complete: bool, **more) -> dict:
        """The stats every transport returns."""
        return {"bytes": st.nbytes, "tensors": len(st.sent), "buckets": st.buckets, "complete": complete,
                "skipped_tensors": len(self.changes.skipped), "skipped_bytes": self.changes.skipped_bytes,
                "staging_bytes": self.ring.held_bytes, **more}
