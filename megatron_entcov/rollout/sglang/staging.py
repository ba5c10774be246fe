"""The sending side of a weight sync: flattened buckets in reusable staging buffers, and the pipeline that sends
bucket k while bucket k+1 is packed.

- :class:`FlatBucket`: each tensor cast to the model dtype and laid out ONCE, by one ``copy_``, into its slice of
  a flat uint8 staging buffer, the buffer the transport sends from (SGLang's ``load_format="flattened_bucket"``:
  one tensor plus per-tensor metadata; the receiver views its slices, no unpacking copy). Offsets are packed
  back to back, as SGLang's ``FlattenedTensorBucket`` computes them on its side.
- :class:`StagingRing`: ``count`` staging buffers, allocated at first use (or grown for a larger bucket) and
  kept between syncs, used in turn (:meth:`StagingRing.current`, then ``advance`` once the bucket is sent): with at most ``count - 1`` buckets in flight, the buffer handed out next
  is never one a server still reads. Memory: ``count`` x the largest bucket (in the model dtype).
- :class:`SendPipeline`: one background thread sends the packed buckets in order, at most ``depth`` queued
  or in flight; the caller packs the next bucket (and runs the producer's gather collectives, which stay on its
  own thread) meanwhile. The first failure is raised by the next ``submit`` or by ``finish``, and nothing is
  sent after it.
- :func:`fingerprint`: a digest of a staged tensor's bytes (``weight_sync.only_changed``: skip a tensor whose
  bytes equal those of the last complete sync).

Example:
    ring = StagingRing(2, alloc=lambda n: torch.empty(n, dtype=torch.uint8))
    with SendPipeline(send, depth=1) as pipe:
        for bucket in buckets:
            fb = FlatBucket(ring.current(bucket_nbytes(bucket, dtype)), dtype)
            for name, t in bucket:
                fb.add(name, t)
            ring.advance()
            pipe.submit(fb)
        pipe.finish()
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import torch

__all__ = ["FlatBucket", "StagingRing", "SendPipeline", "bucket_nbytes", "fingerprint", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
"""The safetensors header's name of each dtype a model can be synced in."""


def bucket_nbytes(bucket, dtype: torch.dtype) -> int:
    """Bytes of ``bucket``'s tensors in ``dtype``: the staging buffer it needs."""
    return sum(t.numel() for _, t in bucket) * dtype.itemsize


class FlatBucket:
    """Tensors laid out back to back in a flat uint8 buffer, each in ``dtype``."""

    def __init__(self, buffer: torch.Tensor, dtype: torch.dtype):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError(f"FlatBucket: the staging buffer must be a 1-D uint8 tensor, got {buffer.dtype} "
                             f"{tuple(buffer.shape)}")
        self.buffer, self.dtype = buffer, dtype
        self.entries: list[tuple[str, torch.Size, int, int]] = []      # (name, shape, start byte, end byte)
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Cast and copy ``tensor`` into the next slice (one pass); returns the staged view."""
        n = tensor.numel() * self.dtype.itemsize
        if self.nbytes + n > self.buffer.numel():
            raise ValueError(f"FlatBucket: {name!r} ({n} bytes) does not fit the staging buffer "
                             f"({self.buffer.numel() - self.nbytes} of {self.buffer.numel()} bytes left)")
        view = self.buffer[self.nbytes:self.nbytes + n].view(self.dtype).view(tensor.shape)
        view.copy_(tensor)
        self.entries.append((name, tensor.shape, self.nbytes, self.nbytes + n))
        self.nbytes += n
        return view

    def drop_last(self) -> None:
        """Forget the last tensor added (its slice is reused by the next)."""
        _, _, start, _ = self.entries.pop()
        self.nbytes = start

    @property
    def flat(self) -> torch.Tensor:
        """The packed bytes: what is sent."""
        return self.buffer[:self.nbytes]

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, view into the buffer) per tensor, as the receiver rebuilds them."""
        return [(name, self.buffer[a:b].view(self.dtype).view(shape)) for name, shape, a, b in self.entries]

    def metadata(self) -> list[SimpleNamespace]:
        """SGLang's ``FlattenedTensorMetadata`` fields per tensor (name, shape, dtype, start_idx, end_idx, numel
        in bytes of the uint8 buffer). SimpleNamespace: SGLang's SafeUnpickler admits it, and its receiver reads
        only these attributes; the trainer cannot import SGLang's class."""
        return [SimpleNamespace(name=name, shape=torch.Size(shape), dtype=self.dtype, start_idx=a, end_idx=b,
                                numel=b - a) for name, shape, a, b in self.entries]

    def safetensors_header(self) -> bytes:
        """The safetensors header (length prefix included) of a file whose data section is :attr:`flat`."""
        import json
        import struct

        kind = SAFETENSORS_DTYPES[self.dtype]
        head = {name: {"dtype": kind, "shape": list(shape), "data_offsets": [a, b]}
                for name, shape, a, b in self.entries}
        head["__metadata__"] = {"format": "pt"}
        text = json.dumps(head, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)              # the data section starts 8-byte aligned
        return struct.pack("<Q", len(text)) + text


class StagingRing:
    """``count`` reusable staging buffers handed out in turn by :meth:`next`."""

    def __init__(self, count: int, alloc: Callable[[int], torch.Tensor]):
        if count < 1:
            raise ValueError(f"StagingRing: count={count} must be >= 1")
        self.alloc, self.buffers, self.turn = alloc, [None] * count, 0

    def current(self, nbytes: int) -> torch.Tensor:
        """The ring's current buffer, at least ``nbytes`` long (allocated or grown when needed); it stays current
        until :meth:`advance` (a bucket that ends up empty is not sent and leaves it to the next one)."""
        i = self.turn % len(self.buffers)
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            self.buffers[i] = None                # the old one goes before the new one is allocated
            buf = self.buffers[i] = self.alloc(max(nbytes, 1))
        return buf

    def advance(self) -> None:
        """The current buffer was handed to the sender: the next bucket takes the next one."""
        self.turn += 1

    @property
    def held_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers if b is not None)

    def clear(self) -> None:
        self.buffers = [None] * len(self.buffers)


class SendPipeline:
    """``send(item)`` on one background thread, in submission order, at most ``depth`` items queued or running.

    Use as a context manager; call :meth:`finish` for the result. An exception in ``send`` is re-raised (the
    original) by the next :meth:`submit` or by :meth:`finish`; queued items after a failure are not sent. Leaving
    the ``with`` block without ``finish`` (an error on the caller's side) waits for the running send and drops
    the queued ones."""

    def __init__(self, send: Callable[[object], None], depth: int = 1, name: str = "weight-sync-send"):
        if depth < 1:
            raise ValueError(f"SendPipeline: depth={depth} must be >= 1")
        self.send, self.depth = send, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.pending: deque[Future] = deque()
        self.failed = threading.Event()

    def _run(self, item) -> None:
        if self.failed.is_set():
            return                               # an earlier send failed: send nothing more
        try:
            self.send(item)
        except BaseException:
            self.failed.set()
            raise

    def submit(self, item) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()      # raises the send's exception
        self.pending.append(self.pool.submit(self._run, item))

    def finish(self) -> None:
        """Wait for every send; raise the first failure."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        self.failed.set()                        # queued items are dropped
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()

    def __enter__(self) -> "SendPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fingerprint(view: torch.Tensor) -> bytes:
    """SHA-1 of a host tensor's bytes (hashlib releases the GIL: the sender thread runs meanwhile). ~1.5 GB/s on
    one core with SHA instructions; only computed for ``weight_sync.only_changed``."""
    data = view.detach().reshape(-1).view(torch.uint8)
    if data.device.type != "cpu":
        data = data.cpu()
    return hashlib.sha1(memoryview(data.numpy())).digest()
