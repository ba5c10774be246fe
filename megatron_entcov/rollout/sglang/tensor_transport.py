"""The 'tensor' weight transport: ``/update_weights_from_tensor`` with shared-memory (CPU) or CUDA IPC (GPU) handles
to a flattened bucket, colocated servers only (same host).

Each bucket is packed once into a staging buffer (``transport_base.Transport.packed``): on CPU a buffer in shared
memory (torch's 'file_system' strategy, which this transport sets process-wide: the default 'file_descriptor'
strategy makes the server's scheduler die), kept between syncs, so a sync creates no shared-memory file and
touches no fresh page; the payload is SGLang's ``load_format="flattened_bucket"`` (one tensor handle plus
per-tensor metadata) pickled as ``MultiprocessingSerializer`` does (ForkingPickler + base64; no sglang import).
On GPUs each server rank gets handles to a copy of the flat bucket on its own GPU, the device named by its UUID.
The pipeline thread posts bucket k to every server while the caller gathers and packs bucket k+1.

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import torch

from megatron_entcov.rollout.engine import NamedTensors
from megatron_entcov.rollout.sglang.pool import Server
from megatron_entcov.rollout.sglang.staging import FlatBucket, SendPipeline
from megatron_entcov.rollout.sglang.transport_base import PIPELINE_DEPTH, SyncStats, Transport, TransportContext

__all__ = ["server_gpu_ids", "rank_payloads", "copy_bucket_to_gpu", "serialize_cuda_ipc", "flat_payload",
           "TensorTransport"]


Bucket = list | dict
"""[(hf_name, tensor), ...], or a flattened bucket's payload {"flattened_tensor", "metadata"} (:func:`flat_payload`)."""


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
        bucket: the payload as packed here (on this process's device): a flattened bucket (:func:`flat_payload`)
            or [(name, tensor), ...].
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
    if isinstance(bucket, dict):          # a flattened bucket: one tensor to copy, the metadata as it is
        out = {**bucket, "flattened_tensor": bucket["flattened_tensor"].to(device)}
    else:
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


def flat_payload(fb: FlatBucket) -> dict:
    """What SGLang's ``load_format="flattened_bucket"`` unpickles: the packed bytes and each tensor's metadata."""
    return {"flattened_tensor": fb.flat, "metadata": fb.metadata()}


class TensorTransport(Transport):
    """/update_weights_from_tensor with flattened-bucket payloads, one per server tp rank (shared memory on CPU,
    CUDA IPC handles to a copy on each rank's own GPU)."""

    def __init__(self, ctx: TransportContext, *, place: Callable[[Bucket, int], Bucket] | None = None,
                 serialize: Callable[[Bucket], str] | None = None):
        """
        Args:
            place: (payload, gpu index) -> the payload on that GPU; default :func:`copy_bucket_to_gpu` when this
                process has CUDA. Given (a test on CPU), payloads are built per server GPU as on a GPU machine.
            serialize: payload -> base64 string; default :func:`serialize_cuda_ipc` with CUDA, else
                :meth:`serialize` (plain ForkingPickler: shared memory).
        """
        import torch.multiprocessing as tmp

        # Registers torch's tensor reductions with ForkingPickler; file_system: see docs/design/rollout.md.
        tmp.set_sharing_strategy("file_system")
        cuda = torch.cuda.is_available()
        self.device = "cuda" if cuda else "cpu"
        super().__init__(ctx)
        if cuda:      # colocated servers need the GPU memory back between syncs; one bucket of slack (see sync)
            self.ring = type(self.ring)(PIPELINE_DEPTH + 2, self.alloc)
        self.per_gpu = cuda or place is not None
        self.place = place or copy_bucket_to_gpu
        self.serialize_bucket = serialize or (serialize_cuda_ipc if cuda else self.serialize)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """Staging on this process's GPU (CUDA IPC), or in shared memory (CPU: created once, kept)."""
        if self.device == "cuda":
            return torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_()

    @staticmethod
    def serialize(obj) -> str:
        """What sglang's MultiprocessingSerializer.serialize(obj, output_str=True) produces."""
        from multiprocessing.reduction import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def sync(self, named_tensors: NamedTensors, version: int, seen: set, servers: list[Server]) -> dict:
        infos = self.server_infos(servers)
        self.targets = list(infos)
        gpus = {s: server_gpu_ids(info, s.url) if self.per_gpu else [None] * int(info.get("tp_size", 1))
                for s, info in infos.items()}
        errors, st = [], SyncStats()
        try:
            with SendPipeline(lambda fb: self._send(fb, gpus, st), depth=PIPELINE_DEPTH) as pipe:
                for fb in self.packed(named_tensors, errors, self.targets):
                    pipe.submit(fb)
                pipe.finish()
        finally:
            if self.device == "cuda":
                # The staging and its copies stay in this process's allocator cache on the servers' GPUs
                # otherwise; colocated servers take that memory back after the sync.
                self.ring.clear()
                torch.cuda.synchronize()
                torch.cuda.ipc_collect()
                torch.cuda.empty_cache()
        return self.stats(st, self.finish(errors, seen, st.sent, version))

    def _send(self, fb: FlatBucket, gpus: dict, st: SyncStats) -> None:
        """Post one packed bucket to every server (on the pipeline thread). The staging buffer and its GPU copies
        stay untouched until every server has answered: the handles point into them. On GPUs a buffer is
        written again only two buckets later (the ring has one spare), never right after a server's reply."""
        copies: dict = {}
        obj = flat_payload(fb)
        bodies = {s: {"serialized_named_tensors": rank_payloads(obj, gpus[s], place=self.place,
                                                                serialize=self.serialize_bucket, copies=copies),
                      "load_format": "flattened_bucket", "flush_cache": False} for s in self.targets}
        self.targets = self.ctx.pool.post_all(self.targets, "/update_weights_from_tensor", lambda s: bodies[s])
        st.add(fb)
        copies.clear()
