"""The one-GPU check's two-process weight-payload round trip (phase cuda_ipc of tools/gpu_check.py), no SGLang.

The sender builds a bucket of HF-named tensors from a seed and turns it into a payload with the 'tensor' weight
sync's own code (rollout/sglang/transports.py: ``rank_payloads`` with ``copy_bucket_to_gpu`` and
``serialize_cuda_ipc`` on a GPU, ``TensorTransport.serialize`` over shared memory on CPU). A receiver in a second
process rebuilds the tensors as SGLang's scheduler does (``monkey_patch_torch_reductions``: the device of a CUDA
IPC handle is a GPU UUID, mapped to this process's device index), copies them to the host and compares their
bytes with the same bucket drawn from the seed on its own side. The sender keeps its tensors alive until the
receiver has answered: the handles point into them.

    python tools/gpu_check_ipc.py receive PAYLOAD_FILE OUT_JSON     # the receiver (started by round_trip)
    python tools/gpu_check_ipc.py serve                              # the timed receiver (started by timed_sync)

Timed part (``timed_sync``): the 'tensor' sync's real sender path on a model-sized flattened bucket (the
transport's ``FlatBucket`` packing, ``flat_payload``, ``copy_bucket_to_gpu`` and ``serialize_cuda_ipc``; shared
memory and ``TensorTransport.serialize`` on CPU) against a long-lived receiver that rebuilds the flattened bucket as
SGLang's ``FlattenedTensorBucket`` does and copies every tensor into its own parameters, as SGLang's loader does
(then synchronizes its GPU): the seconds per sync from packing to the receiver's answer, beside a
device-to-device copy (CPU: a memcpy) of the same bytes in this process, and their ratio.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

SEED = 11
BUCKET = (("model.embed_tokens.weight", (1024, 256), "bfloat16"), ("model.norm.weight", (256,), "float32"),
          ("model.layers.0.self_attn.qkv_proj.bias", (384,), "bfloat16"), ("lm_head.weight", (512, 256), "float16"))
"""(name, shape, dtype) of the bucket sent: three dtypes, a 2-D and two 1-D tensors."""


def make_bucket(seed: int = SEED) -> list:
    """The bucket on the host, drawn from ``seed`` (both processes draw it: the receiver's reference)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g).to(getattr(torch, dtype))) for name, shape, dtype in BUCKET]


def _uuid_rebuild(original):
    """``rebuild_cuda_tensor`` taking a GPU UUID where torch puts the device index (SGLang's patch_torch.py)."""
    import torch

    def rebuild(*args):
        device = args[6]
        if isinstance(device, str):
            uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
            if device not in uuids:
                raise RuntimeError(f"CUDA IPC payload names GPU {device}, which this process does not see ({uuids})")
            args = (*args[:6], uuids.index(device), *args[7:])
        return original(*args)

    return rebuild


def receive(payload_file: Path, out_json: Path) -> int:
    """Rebuild the payload's tensors, compare their bytes with the bucket drawn here; write the result."""
    from multiprocessing.reduction import ForkingPickler

    import torch
    from torch.multiprocessing import reductions

    reductions.rebuild_cuda_tensor = _uuid_rebuild(reductions.rebuild_cuda_tensor)
    t0 = time.perf_counter()
    got = ForkingPickler.loads(base64.b64decode(Path(payload_file).read_text()))
    devices = sorted({str(t.device) for _, t in got})
    host = [(n, t.to("cpu")) for n, t in got]
    rebuild_s = time.perf_counter() - t0
    want = make_bucket()
    same = {n: bool(a.dtype == b.dtype and a.shape == b.shape and
                    a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)))
            for (n, a), (_, b) in zip(host, want, strict=True)}
    names_ok = [n for n, _ in got] == [n for n, _ in want]
    del got
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    Path(out_json).write_text(json.dumps({"names_ok": names_ok, "bytes_equal": same, "devices": devices,
                                          "rebuild_s": rebuild_s}))
    return 0


def round_trip(python: str, work: Path, gpu: bool, timeout_s: float = 120.0) -> dict:
    """Send the bucket to a receiver process started with ``python``; returns the figures: payload size, the
    sender's device and UUID, the receiver's answer, seconds. Raises when the receiver fails."""
    import torch

    from megatron_entcov.rollout.sglang.transports import (
        TensorTransport,
        copy_bucket_to_gpu,
        rank_payloads,
        serialize_cuda_ipc,
    )

    torch.multiprocessing.set_sharing_strategy("file_system")     # what TensorTransport sets
    bucket, copies = make_bucket(), {}
    t0 = time.perf_counter()
    if gpu:
        gpus = [torch.cuda.current_device()]
        (payload,) = rank_payloads(bucket, gpus, place=copy_bucket_to_gpu, serialize=serialize_cuda_ipc,
                                   copies=copies)
        sent_from = {"device": f"cuda:{gpus[0]}", "uuid": str(torch.cuda.get_device_properties(gpus[0]).uuid)}
    else:
        (payload,) = rank_payloads(bucket, [None], place=copy_bucket_to_gpu, serialize=TensorTransport.serialize,
                                   copies=copies)
        sent_from = {"device": "cpu (shared memory)"}
    serialize_s = time.perf_counter() - t0
    work.mkdir(parents=True, exist_ok=True)
    payload_file, answer = work / "payload.b64", work / "received.json"
    payload_file.write_text(payload)
    t1 = time.perf_counter()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "receive", str(payload_file), str(answer)],
                          capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t1
    copies.clear()                  # the receiver is done: the IPC handles may go
    if gpu:
        torch.cuda.ipc_collect()
    if proc.returncode != 0 or not answer.is_file():
        raise RuntimeError(f"the receiver exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return {"payload_bytes": len(payload), "tensor_bytes": sum(t.numel() * t.element_size() for _, t in bucket),
            "sent_from": sent_from, "serialize_s": serialize_s, "receiver_wall_s": wall,
            "received": json.loads(answer.read_text())}


# ------------------------------------------------------------------------------------------------ timed sync


def serve() -> int:
    """The timed receiver: one base64 flattened-bucket payload per stdin line; rebuild it, copy each tensor into
    this process's parameter of that name (allocated at first sight), synchronize, answer 'ok' plus the checksum
    of the bytes received on stdout. A line 'quit' ends it."""
    from multiprocessing.reduction import ForkingPickler

    import torch
    from torch.multiprocessing import reductions

    reductions.rebuild_cuda_tensor = _uuid_rebuild(reductions.rebuild_cuda_tensor)
    params: dict = {}
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        obj = ForkingPickler.loads(base64.b64decode(line))
        flat, total = obj["flattened_tensor"], 0
        for m in obj["metadata"]:                    # sglang's FlattenedTensorBucket.reconstruct_tensors
            t = flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)
            if m.name not in params:
                params[m.name] = torch.empty_like(t)
            params[m.name].copy_(t)                  # what the model's weight loader does
            total += int(params[m.name].reshape(-1).view(torch.uint8)[:: 4096].sum())
        if flat.is_cuda:
            torch.cuda.synchronize()
        del obj, flat
        print(f"ok {total}", flush=True)
    return 0


def _model_tensors(nbytes: int, device: str, seed: int = SEED) -> list:
    """HF-like float32 tensors of about ``nbytes`` in all (rows of 4096 values), on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = max(1, nbytes // (4096 * 4 * 16))
    return [(f"model.layers.{i}.w", torch.randn(rows, 4096, generator=g).to(device)) for i in range(16)]


def _floor_s(nbytes: int, device: str, repeats: int) -> list:
    """Seconds of a copy of ``nbytes`` between two buffers on ``device`` (device-to-device on a GPU)."""
    import torch

    src, dst = torch.ones(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8,
                                                                                   device=device)
    out = []
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device != "cpu":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out[1:]


def timed_sync(python: str, gpu: bool, nbytes: int = 1 << 30, bucket_bytes: int = 256 << 20, repeats: int = 3,
               timeout_s: float = 120.0) -> dict:
    """Time ``repeats`` syncs of ``nbytes`` (float32 tensors, buckets of ``bucket_bytes``) by the 'tensor'
    sync's sender path against :func:`serve` in a second process, after one warm-up sync; returns the median
    seconds, the floor's, the ratio, GB/s and whether the receiver's checksums agree with this side's."""
    import statistics

    import torch

    from megatron_entcov.rollout.sglang.staging import FlatBucket, StagingRing, bucket_nbytes
    from megatron_entcov.rollout.sglang.transports import (
        TensorTransport,
        copy_bucket_to_gpu,
        flat_payload,
        rank_payloads,
        serialize_cuda_ipc,
    )

    torch.multiprocessing.set_sharing_strategy("file_system")
    device = "cuda" if gpu else "cpu"
    tensors = _model_tensors(nbytes, device)
    total = sum(t.numel() * 4 for _, t in tensors)
    alloc = (lambda n: torch.empty(n, dtype=torch.uint8, device="cuda")) if gpu else \
        (lambda n: torch.empty(n, dtype=torch.uint8).share_memory_())
    ring = StagingRing(3, alloc)
    gpus = [torch.cuda.current_device()] if gpu else [None]
    serialize = serialize_cuda_ipc if gpu else TensorTransport.serialize
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        seconds, sums = [], set()
        for rep in range(repeats + 1):
            t0 = time.perf_counter()
            sums.add(_one_timed_sync(proc, tensors, bucket_bytes, ring, gpus, serialize,
                                     FlatBucket, bucket_nbytes, flat_payload, rank_payloads, copy_bucket_to_gpu))
            if rep:
                seconds.append(time.perf_counter() - t0)
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    floor = statistics.median(_floor_s(total, device, repeats))
    med = statistics.median(seconds)
    return {"bytes": total, "bucket_bytes": bucket_bytes, "seconds": med, "seconds_all": seconds,
            "floor": "device-to-device copy" if gpu else "memcpy", "floor_s": floor, "ratio_to_floor": med / floor,
            "gbps": total / med / 1e9, "checksums_agree": len(sums) == 1}


def _one_timed_sync(proc, tensors, bucket_bytes, ring, gpus, serialize, FlatBucket, bucket_nbytes, flat_payload,
                    rank_payloads, place) -> int:
    """One sync: pack each bucket, post it to the receiver, read its answer; the receiver's checksums summed."""
    import torch

    buckets, cur, size = [], [], 0
    for name, t in tensors:
        if cur and size + t.numel() * 4 > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += t.numel() * 4
    buckets.append(cur)
    total = 0
    for bucket in buckets:
        fb = FlatBucket(ring.current(bucket_nbytes(bucket, torch.float32)), torch.float32)
        for name, t in bucket:
            fb.add(name, t)
        ring.advance()
        (payload,) = rank_payloads(flat_payload(fb), gpus, place=place, serialize=serialize, copies={})
        proc.stdin.write(payload + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline().split()
        if not answer or answer[0] != "ok":
            raise RuntimeError(f"the timed receiver answered {answer!r} (exit code {proc.poll()})")
        total += int(answer[1])
    return total


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "serve":
        sys.exit(serve())
    if len(sys.argv) != 4 or sys.argv[1] != "receive":
        sys.exit("usage: python tools/gpu_check_ipc.py receive PAYLOAD_FILE OUT_JSON | serve")
    sys.exit(receive(Path(sys.argv[2]), Path(sys.argv[3])))
