"""The one-GPU check: what a borrowed GPU machine (one GPU, its own Python 3.12 + CUDA torch, no package registry)
can tell us in a few minutes, written as one JSON report.

Run:
    make gpu-wheelhouse                         # where PyPI is reachable: the cp312 wheels the GPU image lacks
    tools/gpu_check.sh OUT_DIR                  # on the GPU machine, with gpu-wheelhouse/ beside the checkout
    tools/gpu_check.sh --cpu-dry-run OUT_DIR    # here: the same phases on .venv, CPU-sized

Subcommands (tools/gpu_check.sh calls `run`; `make gpu-wheelhouse` calls `wheelhouse`):
    wheelhouse DIR [--max-mib 60]               download the wheels (pins from requirements/cpu.txt), check size
    run OUT_DIR [--cpu-dry-run] [--budget-s 480] [--phases ...] [--rl-set key=value ...]
    phase NAME --out-json FILE [--cpu-dry-run]  one phase in its own process (internal)

Phases, in order, each with its own time-out, all within --budget-s (a phase that would start with less than
MIN_PHASE_S left is recorded as not_run). Every phase but setup runs in its own process (group): past its
time-out it is killed with everything it started and recorded as timeout with whatever figures it had written.
    setup      GPU: a venv with --system-site-packages --without-pip (sees the image's torch; an image Python that
               is itself a venv adds its site directories), then the wheels the image lacks installed with
               --no-index --no-deps by the pip the venv now sees, or unpacked by this check when the image has no
               pip; the checkout put on its path by a .pth file (no build backend needed:
               `pip install --no-index -e .` needs setuptools and wheel in the build environment). Dry run: no venv
               (.venv already has everything); the wheelhouse, if present, is unpacked with --target for
               cp312/manylinux, which proves it installs offline but imports nothing (no Python 3.12 torch here).
    env        device, torch/CUDA/cuDNN/NCCL versions, glibc, package versions, every import the trainer needs.
    vocab_op   ops.vocab_parallel.logprobs_and_entropy against a float64 autograd reference (log-probs, entropy,
               gradient under random upstream gradients) and its time against a clone of the logits, fp32 and
               bf16, on a [8192, 152064] shard (dry run: [256, 4096]).
    cuda_ipc   the 'tensor' weight sync's sender (transports.py) and a second process, without SGLang, that
               rebuilds the tensors by GPU UUID as SGLang does: every byte equal (tools/gpu_check_ipc.py). Dry
               run: the same round trip over shared memory; skipped, its CUDA checks listed.
    nccl       this torch's NCCL version beside the SGLang venv's (transports.server_nccl_version); skipped
               without an SGLang venv or without NCCL (dry run).
    rl         `python -m megatron_entcov train`: 3 steps of a Qwen2-shaped model (random weights, bf16 on GPU,
               embedded engine, tp1) with TensorBoard metrics and a checkpoint, then --resume for a 4th step; the
               scalars read back (step times, entropy, reward, every mem/* and memory/* tag).
    rl_qwen    the Qwen path: the rl run's model with packed THD micro-batches, the distributed optimizer (gloo
               groups beside NCCL, its checkpoint saved and resumed) and compiled log-prob kernels, in bf16; the
               jit_fuser probe. Dry run: skipped, its checks listed (PLANS).
    gpu_tests  pytest -m gpu tests/gpu without the SGLang tests, ENTCOV_GPU_REQUIRE=cuda (a test skipped for want
               of CUDA fails); the dry run has no CUDA, so every test skips by its own marker.

OUT_DIR gets report.json (see REPORT_SCHEMA), phases/<name>.json, logs/<name>.log, cuda_ipc/ (the payload) and
rl/ and rl_qwen/ (each RL run's TensorBoard files, resolved config and console logs; checkpoints stay in a
temporary directory, removed at the end; --rl-set values go to both runs). The exit code is 0 only when no phase failed, timed out or was left unrun.

Module level is the standard library only: `run` and `wheelhouse` start under any Python 3.11+.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_SCHEMA = 1
"""report.json: {schema, mode, ok, started, finished, duration_s, budget_s, python, device, shapes,
phases: {name: PhaseResult as a dict}, notes}. Bump when a field changes meaning."""

PHASES = ("setup", "env", "vocab_op", "cuda_ipc", "nccl", "rl", "rl_qwen", "gpu_tests")
PHASE_CAPS_S = {"setup": 120.0, "env": 60.0, "vocab_op": 120.0, "cuda_ipc": 60.0, "nccl": 60.0, "rl": 180.0,
                "rl_qwen": 180.0, "gpu_tests": 150.0}
"""Each phase's own time-out; the budget left lowers it. Sized for one H100/H200 (not yet measured on one); the
short phases run first so that a slow RL run cannot leave them unrun."""
IPC_TIMING = {"gpu": {"nbytes": 1 << 30, "bucket_bytes": 256 << 20, "repeats": 3},
              "cpu": {"nbytes": 64 << 20, "bucket_bytes": 16 << 20, "repeats": 2}}
"""cuda_ipc's timed syncs (gpu_check_ipc.timed_sync): 1 GiB of float32 in 256 MiB buckets on a GPU (~1 s per
sync expected beside the receiver's start-up), a CPU-sized run in the dry run."""
PLANS = {
    "cuda_ipc": ["the 'tensor' weight sync's sender (transports.rank_payloads + copy_bucket_to_gpu + "
                 "serialize_cuda_ipc) turns a bf16/fp32/fp16 bucket into a CUDA IPC payload whose device is the "
                 "GPU's UUID", "a second process, without SGLang, rebuilds the tensors by that UUID as SGLang's "
                 "monkey_patch_torch_reductions does and finds every byte equal to the bucket drawn from the seed",
                 "figures: payload and tensor bytes, serialize and receive seconds",
                 "timed: 1 GiB of float32 in 256 MiB flattened buckets through the 'tensor' sync's sender path "
                 "(FlatBucket, flat_payload, serialize_cuda_ipc) to a receiver that loads them as SGLang does, "
                 "median seconds per sync beside a device-to-device copy of the same bytes (ratio, GB/s)"],
    "nccl": ["the NCCL version of this torch (the image's) beside that of the SGLang venv's python (its torch, else "
             "its nvidia-nccl-cu* wheel: transports.server_nccl_version, as the 'distributed' sync's start-up check "
             "asks it)", "equal, or failed naming both and the fix (make gpu-nccl-align); skipped without an "
             "SGLang venv ($SGLANG_PY or make sglang-env-gpu's)"],
    "rl_qwen": ["the Qwen path on one GPU in bf16: packed THD micro-batches (optim.max_tokens_per_micro_batch > 0), "
                "the distributed optimizer (gloo groups beside NCCL: its checkpoint saved at step 2 and loaded by "
                "--resume for step 3), compiled log-prob kernels (loss.compile_logprob_kernels, no eager fallback)",
                "Megatron's jit_fuser probe (compat/toolchain.py) on the GPU in bf16, and the Transformer Engine "
                "probe's answer (figure only: this run uses the local spec)",
                "every step's grad norm and entropy finite, weight_version == step"],
}
"""What each phase added for the Qwen path checks: written as the 'planned' figure of a phase, and what a CPU dry
run lists for the parts it cannot run."""
BUDGET_S = 480.0
MIN_PHASE_S = 10.0
KILL_GRACE_S = 10.0

PASSED, FAILED, TIMEOUT, SKIPPED, NOT_RUN = "passed", "failed", "timeout", "skipped", "not_run"
STATUSES = (PASSED, FAILED, TIMEOUT, SKIPPED, NOT_RUN)
FAILING = (FAILED, TIMEOUT, NOT_RUN)

WHEELHOUSE_FROM_CPU_PINS = ("megatron-core", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime",
                            "psutil", "matplotlib", "pytest")
"""What the trainer and the tests import that the GPU image (torch, transformers, triton, tensorboard,
safetensors, pyyaml and their dependencies: numpy, sympy, pillow, packaging, tqdm, ...) does not hold. Pinned
by requirements/cpu.txt. Left out: pyarrow (only parquet data files read it; ~40 MiB)."""
WHEELHOUSE_EXTRA_PINS = ("contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.68.0", "kiwisolver==1.5.1",
                         "pyparsing==3.3.3", "python-dateutil==4.0.0", "tzdata==2026.6", "pillow==13.0.0",
                         "iniconfig==2.3.1", "pluggy==1.7.0", "pygments==2.21.0")
"""Their dependencies (matplotlib's, pytest's), at the versions the CPU environment resolved. A wheel whose
distribution the image already has is not installed there (the image's copy is kept)."""
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_28_x86_64")
"""megatron-core 0.16.1's cp312 wheel is manylinux_2_28 (glibc >= 2.28 on the GPU machine)."""
WHEELHOUSE_MAX_MIB = 60.0

IMPORTS = ("torch", "numpy", "yaml", "safetensors", "transformers", "tokenizers", "tensorboard", "megatron.core",
           "math_verify", "latex2sympy2_extended", "antlr4", "psutil", "matplotlib", "pytest", "megatron_entcov",
           "megatron_entcov.trainer")
PACKAGES = ("torch", "triton", "numpy", "transformers", "tokenizers", "tensorboard", "safetensors", "pyyaml",
            "megatron-core", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "psutil",
            "matplotlib", "pillow", "sympy", "pytest", "transformer-engine")

OP_SHAPE = {"gpu": (8192, 152064), "cpu": (256, 4096)}
OP_REF_ROWS = {"gpu": 1024, "cpu": 256}
"""The float64 reference runs on this many rows at a time (rows are independent): ~6 GiB of float64 per chunk
at V = 152064 instead of ~60 GiB for the whole shard."""
OP_REPS = {"gpu": (3, 10), "cpu": (1, 3)}
"""(warm-up, timed) repetitions per timed variant."""
OP_TOL = {"float32": {"value": (5e-4, 1e-5), "grad": (2e-6, 1e-4)},
          "bfloat16": {"value": (5e-4, 1e-5), "grad": (1e-6, 1e-2)}}
"""(atol, rtol) against float64 on the same (already rounded) input values. The op computes in float32 whatever
the input dtype: log-probs and entropy (|values| ~ 10-20 at V = 152k) carry float32 sums over the vocab (on the
CPU dry run's [256, 4096] the worst error is ~1/300 of these bounds, the fp32 gradient's ~1/50; a vocab 37x
larger may cost a few times more). The gradient comes back in the input dtype: in bfloat16 it carries one
rounding (relative 2^-8; 0.38 of the bound on the dry run)."""

RL_STEPS, RL_RESUME_STEPS = 3, 4
RL_MODEL = {
    "gpu": ["model.num_layers=4", "model.hidden_size=512", "model.ffn_hidden_size=1536",
            "model.num_attention_heads=8", "model.num_query_groups=2", "model.vocab_size=151936",
            "model.max_position_embeddings=128", "model.params_dtype=bfloat16",
            "rollout.prompts_per_step=16", "rollout.n_samples_per_prompt=8", "rollout.max_prompt_len=32",
            "sampling.max_new_tokens=64", "optim.micro_batch_size=16",
            # The embedded engine generates in float32 from the bf16 weights: its log-probs differ from the bf16
            # trainer's by ~1e-2 at this vocabulary, past the probe's default 1e-3 (as in the Qwen configs).
            "weight_sync.verify_tol=0.1"],
    "cpu": ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=4096",
            "model.max_position_embeddings=64", "model.params_dtype=float32",
            "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4", "rollout.max_prompt_len=16",
            "sampling.max_new_tokens=16", "optim.micro_batch_size=8"],
}
"""Qwen2-shaped (GQA, QKV bias, untied embeddings, RoPE base 1e6, Qwen2's vocabulary of 151936 on GPU), random
weights. The dry run is CPU-sized and float32 (Megatron's bf16 optimizer is CUDA-only)."""
RL_COMMON = ["name=gpu-check", "seed=7", "model.add_qkv_bias=true", "model.tie_word_embeddings=false",
             "model.rotary_base=1000000", "model.transformer_impl=local", "parallel.tensor_model_parallel_size=1",
             "rollout.engine=local", "data.source=arithmetic", "data.arithmetic_digits=2", "loss.name=clip_cov",
             "loss.entropy_coef=0.001", "optim.lr=1e-5", "optim.num_mini_batches=2", "eval.interval=0",
             f"checkpoint.save_interval={RL_STEPS}", "metrics.tensorboard=true"]
"""Random weights earn no reward, so every advantage is 0: the entropy bonus (entropy_coef) is what gives the
backward pass and the optimizer a non-zero gradient to apply."""
RL_QWEN = ["name=gpu-check-qwen", "optim.max_tokens_per_micro_batch=512", "parallel.use_distributed_optimizer=true",
           "loss.compile_logprob_kernels=true", "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=4",
           "checkpoint.save_interval=2"]
"""rl_qwen on top of the rl run's GPU settings: rows of at most 512 tokens (the longest sample is 32 + 64), Adam
sharded by Megatron's distributed optimizer (dp = 1 here: the code path and its gloo groups, not the sharding),
the compiled vocab-parallel kernels; 2 steps, a checkpoint, --resume for a 3rd."""
RL_QWEN_STEPS, RL_QWEN_RESUME_STEPS = 2, 3
RL_TAGS = ("perf/step_time_s", "perf/rollout_time_s", "perf/train_time_s", "perf/sync_time_s",
           "perf/tokens_per_s", "entropy/mean", "reward/mean", "reward/mean_all", "train/loss", "train/grad_norm",
           "rollout/logprob_gap", "sync/probe_gap", "train/weight_version")
MEM_PREFIXES = ("mem/", "memory/")

GPU_TESTS_IGNORE = ("tests/gpu/test_sglang_gpu.py",)
"""The SGLang GPU tests need SGLang's full GPU environment, which the wheelhouse cannot hold."""


# ------------------------------------------------------------------------------------------- results, report

@dataclass
class PhaseResult:
    """One phase's outcome. status: one of STATUSES; reason: why skipped/not_run; error: the failure's text."""

    name: str
    status: str
    duration_s: float = 0.0
    timeout_s: float | None = None
    figures: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    log: str | None = None
    log_tail: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"phase {self.name!r}: status {self.status!r} is not one of {STATUSES}")


def overall_ok(phases: dict[str, PhaseResult]) -> bool:
    """True when no phase failed, timed out or was left unrun (skipped phases are fine), and one phase ran."""
    return bool(phases) and all(p.status not in FAILING for p in phases.values())


def build_report(mode: str, phases: dict[str, PhaseResult], *, started: float, finished: float, budget_s: float,
                 notes: list[str]) -> dict:
    """The report.json document (REPORT_SCHEMA); ``device`` is lifted from the env phase's figures."""
    if mode not in ("gpu", "cpu-dry-run"):
        raise ValueError(f"mode: expected 'gpu' or 'cpu-dry-run', got {mode!r}")
    env = phases.get("env")
    return {
        "schema": REPORT_SCHEMA,
        "mode": mode,
        "ok": overall_ok(phases),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
        "duration_s": round(finished - started, 3),
        "budget_s": budget_s,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "device": (env.figures.get("device") if env else None),
        "shapes": {"vocab_op": list(OP_SHAPE["gpu" if mode == "gpu" else "cpu"])},
        "phases": {name: asdict(p) for name, p in phases.items()},
        "notes": notes,
    }


def _strict(obj):
    """JSON has no NaN or infinity: such floats become the strings 'nan', 'inf', '-inf' (a NaN loss is a finding)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: Path, doc: dict) -> None:
    """Write strict JSON atomically (a reader never sees half a file; a killed writer leaves the last version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(doc), indent=1, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


class Budget:
    """Wall-clock budget shared by the phases. ``clock`` is injectable for tests."""

    def __init__(self, total_s: float, clock=time.monotonic):
        if not total_s > 0:
            raise ValueError(f"--budget-s: expected > 0 seconds, got {total_s}")
        self.total_s, self.clock, self.start = total_s, clock, clock()

    def remaining(self) -> float:
        return self.total_s - (self.clock() - self.start)

    def allot(self, cap_s: float) -> float | None:
        """The time-out for a phase capped at ``cap_s``, or None when less than MIN_PHASE_S is left."""
        left = self.remaining()
        return None if left < MIN_PHASE_S else min(cap_s, left)


# ------------------------------------------------------------------------------------------- processes

def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this check started (the trainer checkpoints and stops on it), then
    SIGKILL to whatever of the group is left after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def run_command(cmd: list[str], *, timeout_s: float, log_path: Path, env: dict | None = None,
                cwd: Path = ROOT, new_session: bool = True) -> tuple[int | None, float]:
    """Run ``cmd`` with stdout and stderr appended to ``log_path``, in a session of its own (``new_session``;
    a phase's own commands stay in the phase's group, so that killing the phase kills them). Returns (exit code,
    or None when it ran past ``timeout_s`` and was killed with its process group; seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(cwd), start_new_session=new_session)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return rc, time.monotonic() - t0


def read_tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return _tail(data[-limit * 2:].decode(errors="replace"), limit)


def run_phase_process(name: str, cmd: list[str], *, timeout_s: float, out_json: Path, log_path: Path,
                      env: dict | None = None) -> PhaseResult:
    """Run one phase's process and build its result from what it wrote to ``out_json`` (figures, checks,
    status) and its exit: a time-out keeps the figures written so far; a crash without a status is a failure."""
    rc, dt = run_command(cmd, timeout_s=timeout_s, log_path=log_path, env=env)
    try:
        doc = json.loads(out_json.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        doc = {}
    res = PhaseResult(name, PASSED, duration_s=round(dt, 3), timeout_s=round(timeout_s, 1),
                      figures=doc.get("figures", {}), checks=doc.get("checks", []), reason=doc.get("reason"),
                      error=doc.get("error"), log=str(log_path))
    if rc is None:
        res.status = TIMEOUT
        res.error = (res.error or "") + f"ran past its {timeout_s:.0f} s time-out; killed with its process group"
    elif doc.get("status") in STATUSES:
        res.status = doc["status"]
        if rc != 0 and res.status in (PASSED, SKIPPED):
            res.status, res.error = FAILED, f"reported {doc['status']} but exited {rc}"
    else:
        res.status = FAILED
        res.error = res.error or f"exited {rc} without reporting a status"
    if res.status in FAILING:
        res.log_tail = read_tail(log_path)
    return res


# ------------------------------------------------------------------------------------------- wheelhouse

def _canon(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_pins(cpu_txt: Path = ROOT / "requirements" / "cpu.txt") -> list[str]:
    """name==version for every wheel the GPU image lacks: WHEELHOUSE_FROM_CPU_PINS at requirements/cpu.txt's
    pins, then WHEELHOUSE_EXTRA_PINS."""
    pins = {}
    for line in cpu_txt.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[_canon(m.group(1))] = f"{m.group(1)}=={m.group(2)}"
    missing = [n for n in WHEELHOUSE_FROM_CPU_PINS if _canon(n) not in pins]
    if missing:
        raise ValueError(f"{cpu_txt}: no exact pin (name==version) for {missing}; the GPU wheelhouse takes their "
                         "versions from it: pin them there, or drop them from WHEELHOUSE_FROM_CPU_PINS")
    return [pins[_canon(n)] for n in WHEELHOUSE_FROM_CPU_PINS] + list(WHEELHOUSE_EXTRA_PINS)


def wheel_dist(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    parts = Path(path).name.split("-")
    if not Path(path).name.endswith(".whl") or len(parts) < 5:
        raise ValueError(f"{Path(path).name!r} is not a wheel file name (name-version-[build-]python-abi-platform.whl)")
    return _canon(parts[0]), parts[1]


def check_wheelhouse_size(directory: Path, max_mib: float) -> float:
    """Total size of ``directory``'s files in MiB; ValueError listing the largest wheels when over ``max_mib``."""
    files = sorted((p for p in Path(directory).iterdir() if p.is_file()), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in files) / 2**20
    if total > max_mib:
        largest = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in files[:5])
        raise ValueError(f"the wheelhouse {str(directory)!r} holds {total:.1f} MiB > the {max_mib:g} MiB limit "
                         f"(largest: {largest}); drop wheels the GPU image already has, or raise --max-mib if "
                         "the transfer to the GPU machine allows it")
    return total


def build_wheelhouse(dest: Path, max_mib: float, python: str = sys.executable) -> float:
    """Download the pinned cp312 manylinux x86_64 wheels into ``dest`` (replaced only once complete and within
    ``max_mib``). Needs PyPI, not Python 3.12. Returns the size in MiB."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(tmp)]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + wheelhouse_pins(), check=True)
    total = check_wheelhouse_size(tmp, max_mib)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    for p in sorted(dest.iterdir()):
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    print(f"gpu wheelhouse: {len(list(dest.iterdir()))} wheels, {total:.1f} MiB (limit {max_mib:g}) in {dest}")
    return total


def select_wheels(wheels: list[Path], installed: dict[str, str]) -> tuple[list[Path], dict[str, str]]:
    """The wheels to install: those whose distribution is not in ``installed`` ({normalised name: version}, what
    the image's Python has). Returns (to install, {name: image version} of those left to the image)."""
    todo, kept = [], {}
    for w in sorted(wheels):
        name, _ = wheel_dist(w)
        if name in installed:
            kept[name] = installed[name]
        else:
            todo.append(w)
    return todo, kept


def _installed_dists() -> dict[str, str]:
    import importlib.metadata as md

    return {_canon(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def _requires_python(wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            return None
        for line in z.read(meta).decode(errors="replace").splitlines():
            if line.startswith("Requires-Python:"):
                return line.split(":", 1)[1].strip()
            if not line.strip():
                return None
    return None


def setup_phase(mode: str, wheelhouse: Path, timeout_s: float, logs: Path,
                venv: Path | None) -> tuple[PhaseResult, str]:
    """GPU: venv (system site packages) + offline install + .pth of the checkout. Dry run: prove the wheelhouse
    installs offline for cp312 (unpacked with --target). Returns (result, the python the phases run under)."""
    t0 = time.monotonic()
    log = logs / "setup.log"
    res = PhaseResult("setup", PASSED, timeout_s=round(timeout_s, 1), log=str(log))

    def step(cmd: list[str], what: str, fatal: bool = True) -> bool:
        rc, _ = run_command(cmd, timeout_s=max(timeout_s - (time.monotonic() - t0), 1.0), log_path=log)
        if rc != 0 and fatal:
            res.status = TIMEOUT if rc is None else FAILED
            res.error = f"{what}: " + ("ran past the phase's time-out" if rc is None else f"exited {rc}")
        return rc == 0

    wheels = sorted(Path(wheelhouse).glob("*.whl")) if Path(wheelhouse).is_dir() else []
    res.figures["wheelhouse"] = {"dir": str(wheelhouse), "wheels": [w.name for w in wheels],
                                 "mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 2)}
    python = sys.executable
    try:
        if mode == "cpu-dry-run":
            _setup_dry_run(res, wheels, step)
        else:
            python = _setup_venv(res, wheels, venv, step)
    except Exception:  # noqa: BLE001 - a broken set-up is a finding; the phases still run and say what is missing
        res.status, res.error = FAILED, _tail(traceback.format_exc())
    if res.status == PASSED and not all(c["ok"] for c in res.checks):
        res.status = FAILED
    res.duration_s = round(time.monotonic() - t0, 3)
    if res.status in FAILING:
        res.log_tail = read_tail(log)
    return res, python


def _setup_dry_run(res: PhaseResult, wheels: list[Path], step) -> None:
    res.figures["python"] = sys.executable
    if not wheels:
        res.status = SKIPPED
        res.reason = ("no wheelhouse (make gpu-wheelhouse): nothing to check; the dry run runs on "
                      f"{sys.executable}, which already holds every package")
        return
    bad = {w.name: rp for w in wheels if (rp := _requires_python(w)) and not _python_ok(rp, "3.12")}
    res.checks.append({"name": "Requires-Python of every wheel admits 3.12", "ok": not bad, "detail": bad or None})
    target = Path(tempfile.mkdtemp(prefix="gpu-check-target-"))
    try:
        # --ignore-requires-python: pip would test local wheel files against THIS interpreter (3.11); checked above.
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--only-binary=:all:",
               "--ignore-requires-python", "--target", str(target), "--python-version", "3.12",
               "--implementation", "cp", "--abi", "cp312"]
        for plat in WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        ok = step(cmd + [str(w) for w in wheels], "pip install --target (cp312, offline)")
        res.checks.append({"name": "the wheelhouse installs offline for cp312 manylinux x86_64", "ok": ok,
                           "detail": "unpacked with --target; nothing imported (no Python 3.12 with torch here)"})
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _setup_venv(res: PhaseResult, wheels: list[Path], venv: Path | None, step) -> str:
    """The GPU machine's venv; returns its python (or this one when the venv could not be made). Nothing asks for
    pip before the venv exists and sees the image's packages: the image's Python, or its base, may have none."""
    if not wheels:  # the phases then run on the image's Python and list what it lacks
        res.status = FAILED
        res.error = ("no wheels in the wheelhouse: run `make gpu-wheelhouse` on a machine with PyPI and bring "
                     "gpu-wheelhouse/ beside this checkout (or pass --wheelhouse DIR)")
        return sys.executable
    venv = Path(venv) if venv else Path(tempfile.mkdtemp(prefix="gpu-check-venv-"))
    res.figures["venv"] = str(venv)
    python = str(venv / "bin" / "python")
    # --without-pip: ensurepip is slow and missing from Debian-style images without python3-venv.
    if not step([sys.executable, "-m", "venv", "--clear", "--system-site-packages", "--without-pip", str(venv)],
                "python -m venv --system-site-packages --without-pip"):
        return sys.executable
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, timeout=60, check=True).stdout.strip())
    _see_parent_site(res, purelib)
    if not step([python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                "the image's torch imports in the venv"):
        return python
    todo, kept = select_wheels(wheels, _installed_dists())
    res.figures["installed"] = [w.name for w in todo]
    res.figures["kept_from_image"] = kept
    has_pip = step([python, "-m", "pip", "--version"], "pip in the venv", fatal=False)
    res.figures["installer"] = "the image's pip" if has_pip else "unpacked by the check (no pip in the image)"
    if todo and has_pip:
        step([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"] + [str(w) for w in todo],
             "pip install --no-index --no-deps")
    elif todo:
        for w in todo:
            unpack_wheel(w, purelib, venv)
    pth = purelib / "megatron_entcov_checkout.pth"   # the checkout on the venv's path, no build backend
    pth.write_text(str(ROOT) + "\n")
    res.figures["pth"] = str(pth)
    if has_pip:
        check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
        res.figures["pip_check"] = _tail(check.stdout + check.stderr, 3000)
    else:
        res.figures["pip_check"] = "not run: no pip in the image"
    return python


def _see_parent_site(res: PhaseResult, purelib: Path) -> None:
    """When this python is itself a venv (uv-style images), --system-site-packages shows its base interpreter's
    packages, not this venv's torch (nor its pip): add this venv's site directories to the new one, .pth files
    included (site.addsitedir), as this python sees them."""
    if sys.prefix == sys.base_prefix:
        return
    import site

    dirs = site.getsitepackages()
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    (purelib / "gpu_check_parent_site.pth").write_text("\n".join(lines) + "\n")
    res.figures["parent_site_packages"] = dirs


WHEEL_DATA_DIRS = ("purelib", "platlib", "scripts", "data", "headers")


def unpack_wheel(wheel: Path, purelib: Path, prefix: Path) -> None:
    """Install ``wheel`` into the venv at ``prefix`` without pip (PEP 427's unpack step; no byte-compiling, no
    entry-point scripts: the check runs ``python -m``): its files under ``purelib``, ``<dist>.data/<key>/``
    to purelib (purelib, platlib), prefix/bin (scripts), prefix (data) or prefix/include (headers); an INSTALLER
    file names the check. ValueError naming the wheel and member for a path outside its directory."""
    dist_info = None
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if info.filename.startswith("/") or ".." in parts or "\\" in info.filename:
                raise ValueError(f"{Path(wheel).name}: member {info.filename!r} leaves the install directory; "
                                 "rebuild the wheelhouse (make gpu-wheelhouse)")
            if info.is_dir():
                continue
            dest, executable = purelib / info.filename, bool((info.external_attr >> 16) & 0o111)
            if parts[0].endswith(".dist-info"):
                dist_info = purelib / parts[0]
            elif parts[0].endswith(".data") and len(parts) > 2:
                if parts[1] not in WHEEL_DATA_DIRS:
                    raise ValueError(f"{Path(wheel).name}: {parts[0]}/{parts[1]} is not one of {WHEEL_DATA_DIRS}")
                base = {"scripts": prefix / "bin", "data": prefix, "headers": prefix / "include"}.get(parts[1], purelib)
                dest, executable = base.joinpath(*parts[2:]), executable or parts[1] == "scripts"
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = z.read(info)
            if executable and data.startswith(b"#!python"):
                data = b"#!" + str(prefix / "bin" / "python").encode() + data[len(b"#!python"):]
            dest.write_bytes(data)
            if executable:
                dest.chmod(0o755)
    if dist_info is not None:
        (dist_info / "INSTALLER").write_text("gpu_check\n")


def _python_ok(spec: str, version: str) -> bool:
    try:
        from pip._vendor.packaging.specifiers import SpecifierSet
    except ImportError:  # no pip to read the specifier with: leave it to the install step
        return True
    return version in SpecifierSet(spec)


# ------------------------------------------------------------------------------------------- pytest results

def parse_junit(path: Path) -> dict:
    """Counts and per-test outcomes of a pytest --junitxml file: {passed, failed, errors, skipped, xfailed,
    tests: [{id, outcome, message}]}. A test that failed in its call and errored in teardown counts as failed."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0}
    tests = []
    for case in root.iter("testcase"):
        tags = {child.tag: child for child in case}
        if "failure" in tags:
            outcome, node = "failed", tags["failure"]
        elif "error" in tags:
            outcome, node = "errors", tags["error"]
        elif "skipped" in tags:
            node = tags["skipped"]
            outcome = "xfailed" if node.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome, node = "passed", None
        counts[outcome] += 1
        tests.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "message": _tail(node.get("message") or (node.text or ""), 600) if node is not None else None})
    return {**counts, "tests": tests}


# ------------------------------------------------------------------------------------------- phases (children)

class Recorder:
    """What a phase process reports: figures and checks, rewritten to ``path`` after every change so that a
    time-out keeps what was measured."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.doc = {"figures": {}, "checks": [], "status": None, "reason": None, "error": None}
        self.flush()

    def figure(self, key: str, value) -> None:
        self.doc["figures"][key] = value
        self.flush()

    def check(self, name: str, ok: bool, detail=None) -> bool:
        self.doc["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.flush()
        return bool(ok)

    def flush(self) -> None:
        write_json(self.path, self.doc)


def _device(gpu: bool) -> str:
    import torch

    if gpu and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False); run the GPU check on "
                           "the GPU machine, or pass --cpu-dry-run")
    return "cuda" if gpu else "cpu"


def phase_env(rec: Recorder, gpu: bool) -> None:
    import importlib
    import importlib.metadata as md

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    rec.figure("packages", versions)
    rec.figure("python", sys.executable)
    failed = {}
    for mod in IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - every import failure is a finding
            failed[mod] = f"{type(e).__name__}: {e}"
    rec.check("every module the trainer and tests import imports", not failed, failed or None)
    import torch

    dev = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "glibc": "-".join(platform.libc_ver()), "machine": platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        dev.update(name=props.name, capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count(),
                   memory_gib=round(props.total_memory / 2**30, 2), cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())), bf16=torch.cuda.is_bf16_supported())
    else:
        dev["name"] = f"CPU ({platform.processor() or platform.machine()})"
    rec.figure("device", dev)
    if "megatron_entcov" not in failed:
        import megatron_entcov

        where = Path(megatron_entcov.__file__).resolve()
        rec.check("megatron_entcov is this checkout", ROOT in where.parents, str(where))
    if gpu:
        rec.check("CUDA available", torch.cuda.is_available(), dev.get("name"))


def _median_ms(fn, sync, warmup: int, reps: int) -> float:
    import statistics

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _op_errors(logits, labels, g_lp, g_h, ref_rows: int, tol: dict) -> dict[str, tuple[float, float]]:
    """The op's forward and backward against float64 autograd through log_softmax, ``ref_rows`` rows at a time
    (rows are independent). Returns {logprob|entropy|grad: (worst |err| / (atol + rtol |ref|), max |err|)}."""
    import torch

    from megatron_entcov.ops.vocab_parallel import logprobs_and_entropy

    z = logits.detach().requires_grad_(True)
    lp, ent = logprobs_and_entropy(z, labels)
    torch.autograd.backward([lp, ent], [g_lp, g_h])
    mine = {"logprob": lp.detach(), "entropy": ent.detach(), "grad": z.grad}
    worst = {name: (0.0, 0.0) for name in mine}
    for s in range(0, logits.shape[0], ref_rows):
        rows = slice(s, s + ref_rows)
        ref_z = logits[rows].double().requires_grad_(True)
        logp = torch.log_softmax(ref_z, dim=-1)
        ref = {"logprob": logp.gather(-1, labels[rows, None]).squeeze(-1), "entropy": -(logp.exp() * logp).sum(-1)}
        torch.autograd.backward([ref["logprob"], ref["entropy"]], [g_lp[rows].double(), g_h[rows].double()])
        ref = {k: v.detach() for k, v in ref.items()} | {"grad": ref_z.grad}
        with torch.no_grad():
            for name, r in ref.items():
                atol, rtol = tol["grad" if name == "grad" else "value"]
                err = (mine[name][rows].double() - r).abs()
                ratio, abs_err = float((err / (atol + rtol * r.abs())).max()), float(err.max())
                worst[name] = (max(worst[name][0], ratio), max(worst[name][1], abs_err))
        del ref_z, logp, ref
    return worst


def _op_times(logits, labels, g_lp, g_h, gpu: bool, warmup: int, reps: int) -> dict[str, float]:
    """Median ms of a clone of the logits (the memcpy floor: read + write them once), the op's forward, and its
    forward + backward (a new gradient tensor); on GPU also the peak memory of forward + backward beyond what
    was allocated before it."""
    import torch

    from megatron_entcov.ops.vocab_parallel import logprobs_and_entropy

    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def fwd():
        return logprobs_and_entropy(logits.detach().requires_grad_(True), labels)

    def fwd_bwd():
        torch.autograd.backward(list(fwd()), [g_lp, g_h])

    out = {"clone_ms": _median_ms(logits.clone, sync, warmup, reps), "fwd_ms": _median_ms(fwd, sync, warmup, reps),
           "fwd_bwd_ms": _median_ms(fwd_bwd, sync, warmup, reps)}
    out["fwd_over_clone"] = out["fwd_ms"] / out["clone_ms"]
    out["fwd_bwd_over_clone"] = out["fwd_bwd_ms"] / out["clone_ms"]
    if gpu:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        sync()
        out["fwd_bwd_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out


def phase_vocab_op(rec: Recorder, gpu: bool) -> None:
    import torch

    key = "gpu" if gpu else "cpu"
    dev = _device(gpu)
    rows, vocab = OP_SHAPE[key]
    rec.figure("shape", [rows, vocab])
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        g = torch.Generator(device=dev).manual_seed(0)
        logits = (torch.randn(rows, vocab, device=dev, generator=g) * 4).to(dtype)  # a spread like real logits
        labels = torch.randint(0, vocab, (rows,), device=dev, generator=g)
        g_lp, g_h = torch.randn(rows, device=dev, generator=g), torch.randn(rows, device=dev, generator=g)
        out = {"logits_gib": logits.numel() * logits.element_size() / 2**30, "tol": OP_TOL[dname]}
        worst = _op_errors(logits, labels, g_lp, g_h, OP_REF_ROWS[key], OP_TOL[dname])
        for name, (ratio, abs_err) in worst.items():
            out[f"{name}_max_abs_err"] = abs_err
            rec.check(f"{dname} {name} vs float64", ratio <= 1.0,
                      f"max |err| {abs_err:.3g}; worst |err| / (atol + rtol |ref|) = {ratio:.3g} (pass: <= 1)")
        rec.figure(dname, out)
        if gpu:
            torch.cuda.empty_cache()
        out.update(_op_times(logits, labels, g_lp, g_h, gpu, *OP_REPS[key]))
        rec.figure(dname, out)
        del logits, labels, g_lp, g_h
        if gpu:
            torch.cuda.empty_cache()


def _train_cmd(python: str, overrides: list[str], resume: bool) -> list[str]:
    cmd = [python, "-m", "megatron_entcov", "train"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def _steps_logged(log: Path) -> list[int]:
    """The steps of the console's step lines ('step N | ...') in a train log."""
    return [int(m.group(1)) for m in re.finditer(r"^step (\d+) \|", read_tail(log, 10**7), re.M)]


def merge_overrides(*groups: list[str]) -> list[str]:
    """KEY=VALUE lists merged in order, a later value of a key replacing an earlier one in its place (the config
    loader refuses a key given twice)."""
    merged: dict[str, str] = {}
    for group in groups:
        for o in group:
            key, _, value = o.partition("=")
            merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def rl_overrides(gpu: bool, run_root: Path, extra: list[str]) -> list[str]:
    return merge_overrides(RL_COMMON, RL_MODEL["gpu" if gpu else "cpu"], [f"output_dir={run_root}"], list(extra))


def rl_qwen_overrides(run_root: Path, extra: list[str]) -> list[str]:
    """rl_qwen's run: the rl run's GPU settings, then RL_QWEN, then --rl-set values."""
    return merge_overrides(RL_COMMON, RL_MODEL["gpu"], RL_QWEN, [f"output_dir={run_root}"], list(extra))


def _train_and_resume(rec: Recorder, overrides: list[str], run_root: Path, run_dir: Path, dest: Path,
                      steps: int, resume_steps: int, keep_run: bool) -> None:
    """Train ``steps`` steps (a checkpoint at the last), then --resume to ``resume_steps``; checks each run's exit,
    step lines and checkpoint, then the TensorBoard scalars. Logs, resolved config and TensorBoard go to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    rec.figure("overrides", overrides)
    try:
        for label, upto, resume in (("train", steps, False), ("resume", resume_steps, True)):
            log = dest / f"{label}.log"
            cmd = _train_cmd(sys.executable, overrides + [f"steps={upto}"], resume)
            rc, dt = run_command(cmd, timeout_s=10**6, log_path=log, new_session=False)  # the phase's limit
            logged = _steps_logged(log)
            rec.figure(f"{label}_wall_s", round(dt, 2))
            rec.figure(f"{label}_steps_logged", logged)
            expect = list(range(1, steps + 1)) if not resume else list(range(steps + 1, resume_steps + 1))
            if not rec.check(f"{label}: exit 0 and steps {expect}", rc == 0 and logged == expect,
                             f"exit {rc}, steps {logged}; log tail: {read_tail(log, 1500)}"
                             if rc != 0 or logged != expect else None):
                break
            ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file())
            rec.figure(f"{label}_checkpoints", ckpts)
            rec.check(f"{label}: complete checkpoint of step {upto}", f"step_{upto:06d}" in ckpts, ckpts)
        _read_rl_scalars(rec, run_dir, resume_steps)
    finally:
        for name in ("resolved_config.yaml",):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, dest / name)
        if (run_dir / "tensorboard").is_dir():
            shutil.copytree(run_dir / "tensorboard", dest / "tensorboard", dirs_exist_ok=True)
        if keep_run:
            rec.figure("run_dir", str(run_dir))
        else:
            shutil.rmtree(run_root, ignore_errors=True)


def phase_rl(rec: Recorder, gpu: bool, out_dir: Path, extra: list[str], keep_run: bool) -> None:
    _device(gpu)
    run_root = Path(tempfile.mkdtemp(prefix="gpu-check-rl-"))
    _train_and_resume(rec, rl_overrides(gpu, run_root, extra), run_root, run_root / "gpu-check", out_dir / "rl",
                      RL_STEPS, RL_RESUME_STEPS, keep_run)


def _read_rl_scalars(rec: Recorder, run_dir: Path, last_step: int) -> None:
    from megatron_entcov.monitor.metrics import read_scalars

    if not (run_dir / "tensorboard").is_dir():
        rec.check("TensorBoard scalars written", False, f"no {run_dir / 'tensorboard'}")
        return
    scalars = read_scalars(run_dir)
    per_step = {tag: {str(s): v for s, v in scalars[tag]} for tag in RL_TAGS if tag in scalars}
    mem = {tag: {str(s): v for s, v in pts} for tag, pts in scalars.items() if tag.startswith(MEM_PREFIXES)}
    rec.figure("scalars", per_step)
    rec.figure("mem", mem)
    rec.figure("mem_tags_found", sorted(mem))
    rec.figure("all_tags", sorted(scalars))
    steps = sorted({s for pts in scalars.values() for s, _ in pts})
    rec.check(f"scalars for steps 1..{last_step}", steps == list(range(1, last_step + 1)), steps)
    ent = [v for _, v in scalars.get("entropy/mean", [])]
    rec.check("entropy/mean finite and positive every step", len(ent) == last_step and
              all(math.isfinite(v) and v > 0 for v in ent), ent)
    gn = [v for _, v in scalars.get("train/grad_norm", [])]
    rec.check("train/grad_norm finite and non-zero every step (entropy bonus)", len(gn) == last_step and
              all(math.isfinite(v) and v > 0 for v in gn), gn)
    wv = scalars.get("train/weight_version", [])
    rec.check("weight_version == step (every step applied and synced)", bool(wv) and all(s == v for s, v in wv), wv)


def _log_lines(log: Path, pattern: str) -> list[str]:
    return re.findall(rf"^.*{pattern}.*$", read_tail(log, 10**7), re.M)


def phase_rl_qwen(rec: Recorder, gpu: bool, out_dir: Path, extra: list[str], keep_run: bool) -> None:
    """PLANS['rl_qwen']. The dry run skips it (bf16 training and Triton are CUDA-only) and lists what it checks."""
    rec.figure("planned", PLANS["rl_qwen"])
    if not gpu:
        rec.figure("overrides", rl_qwen_overrides(Path("<tmp>"), extra))
        rec.doc["status"] = SKIPPED
        rec.doc["reason"] = ("CPU dry run: bf16 training, Triton and the distributed optimizer's NCCL beside gloo "
                             "need CUDA; planned checks listed, its config validated by the CPU tests")
        return
    import torch

    from megatron_entcov.compat import toolchain

    _device(gpu)
    fuser = toolchain.jit_fuser(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    rec.figure("jit_fuser", asdict(fuser))
    rec.check("Megatron's jit_fuser compiles and runs on the GPU in bf16 (else the TE path runs unfused)",
              fuser.ok, fuser.reason)
    rec.figure("transformer_engine", asdict(toolchain.transformer_engine()))
    run_root = Path(tempfile.mkdtemp(prefix="gpu-check-rl-qwen-"))
    dest = out_dir / "rl_qwen"
    _train_and_resume(rec, rl_qwen_overrides(run_root, extra), run_root, run_root / "gpu-check-qwen", dest,
                      RL_QWEN_STEPS, RL_QWEN_RESUME_STEPS, keep_run)
    train_log = dest / "train.log"
    if not train_log.is_file():
        return
    opt = _log_lines(train_log, r"optimizer: .* distributed=")
    rec.figure("optimizer_log", opt)
    rec.check("the distributed optimizer was built (log: distributed=True)", any("distributed=True" in x for x in opt),
              opt or "no optimizer line in train.log")
    compiled = _log_lines(train_log, "vocab_parallel: compiling chunk kernel")
    fallback = [x for log in (train_log, dest / "resume.log") for x in _log_lines(log, "torch.compile failed")]
    rec.figure("compiled_kernels", len(compiled))
    rec.check("the log-prob kernels compiled, no eager fallback", bool(compiled) and not fallback,
              fallback or (None if compiled else "no 'compiling chunk kernel' line in train.log"))
    resolved = dest / "resolved_config.yaml"
    budget = re.search(r"max_tokens_per_micro_batch: (\d+)", resolved.read_text()) if resolved.is_file() else None
    rec.check("packed micro-batches in the resolved config", bool(budget) and int(budget.group(1)) > 0,
              budget.group(0) if budget else f"no max_tokens_per_micro_batch in {resolved}")


def phase_cuda_ipc(rec: Recorder, gpu: bool, out_dir: Path) -> None:
    """PLANS['cuda_ipc'] (tools/gpu_check_ipc.py). The dry run makes the same round trip over shared memory
    (the 'tensor' sync's CPU payload) and leaves the CUDA IPC part planned."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_check_ipc

    rec.figure("planned", PLANS["cuda_ipc"])
    if gpu:
        _device(gpu)
    fig = gpu_check_ipc.round_trip(sys.executable, out_dir / "cuda_ipc", gpu)
    rec.figure("round_trip", fig)
    got = fig["received"]
    rec.check("the receiver rebuilt the bucket's tensors in order", got["names_ok"], got)
    rec.check("every byte equal", bool(got["bytes_equal"]) and all(got["bytes_equal"].values()), got["bytes_equal"])
    if gpu:
        rec.check("rebuilt on the GPU the UUID names", got["devices"] == [fig["sent_from"]["device"]],
                  {"sent": fig["sent_from"], "received": got["devices"]})
    timed = gpu_check_ipc.timed_sync(sys.executable, gpu, **IPC_TIMING["gpu" if gpu else "cpu"])
    rec.figure("sync_timing", timed)
    rec.check("the timed syncs' receiver got the same bytes every time", timed["checksums_agree"], timed)
    if not gpu and all(c["ok"] for c in rec.doc["checks"]):
        rec.doc["status"] = SKIPPED
        rec.doc["reason"] = ("CPU dry run: no CUDA; the two-process round trip ran over shared memory (checks "
                             "passed), the CUDA IPC by device UUID is planned")


def phase_nccl(rec: Recorder, gpu: bool) -> None:
    """PLANS['nccl']: this torch's NCCL and the SGLang venv's, side by side (transports' own probes)."""
    from megatron_entcov.rollout.sglang.server import default_server_python
    from megatron_entcov.rollout.sglang.transports import server_nccl_version, trainer_nccl_version

    rec.figure("planned", PLANS["nccl"])
    image = trainer_nccl_version()
    python = default_server_python("cuda")
    side = {"image_torch": image, "sglang_python": python, "sglang_venv": None, "sglang_nccl_wheel": None}
    if Path(python).is_file():
        side["sglang_venv"], side["sglang_nccl_wheel"] = server_nccl_version(python, timeout_s=40.0)
    rec.figure("nccl", side)
    if image is None and gpu:
        rec.check("this torch reports its NCCL version", False, "torch.cuda.nccl.version() failed on a CUDA torch")
        return
    if image is None or side["sglang_venv"] is None:
        rec.doc["status"] = SKIPPED
        rec.doc["reason"] = "; ".join(
            ([] if image else ["this torch has no NCCL (a CPU build)"]) +
            ([] if side["sglang_venv"] else [f"{python} reports no NCCL version (neither its torch nor an "
                                             "nvidia-nccl-cu* wheel)" if Path(python).is_file() else
                                             f"no SGLang venv at {python} (set SGLANG_PY, or make sglang-env-gpu)"]))
        return
    same = image == side["sglang_venv"]
    rec.check("one NCCL for the trainer and the SGLang servers (the 'distributed' sync needs it)", same,
              None if same else f"image {image} vs SGLang venv {side['sglang_venv']}: make gpu-nccl-align installs "
              f"the venv's {side['sglang_nccl_wheel'] or 'nvidia-nccl-cu12'} into the trainer's venv")


def phase_gpu_tests(rec: Recorder, gpu: bool, out_dir: Path) -> None:
    junit = out_dir / "gpu_tests.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", "-rA",
           f"--junitxml={junit}"] + [f"--ignore={p}" for p in GPU_TESTS_IGNORE]
    env = dict(os.environ)
    if gpu:
        env["ENTCOV_GPU_REQUIRE"] = "cuda"  # a test skipped for want of CUDA fails (tests/gpu/conftest.py)
    else:
        env.pop("ENTCOV_GPU_REQUIRE", None)
    log = out_dir / "logs" / "gpu_tests.pytest.log"
    rc, dt = run_command(cmd, timeout_s=10**6, log_path=log, env=env, new_session=False)
    rec.figure("pytest_exit", rc)
    rec.figure("pytest_s", round(dt, 2))
    if not junit.is_file():
        rec.check("pytest wrote its junit XML", False, read_tail(log, 2000))
        return
    res = parse_junit(junit)
    rec.figure("counts", {k: v for k, v in res.items() if k != "tests"})
    rec.figure("tests", res["tests"])
    if not gpu and rc == 0 and res["skipped"] == len(res["tests"]) and res["tests"]:
        rec.doc["status"], rec.doc["reason"] = SKIPPED, "skipped (no CUDA)"
        return
    rec.check("pytest exit 0, no failures or errors", rc == 0 and res["failed"] == res["errors"] == 0,
              {"exit": rc, "failed": res["failed"], "errors": res["errors"]})
    rec.check("at least one GPU test passed", res["passed"] > 0, res["passed"])


def run_phase_child(name: str, out_json: Path, gpu: bool, out_dir: Path, rl_set: list[str], keep_run: bool) -> int:
    rec = Recorder(out_json)
    try:
        if name == "env":
            phase_env(rec, gpu)
        elif name == "vocab_op":
            phase_vocab_op(rec, gpu)
        elif name == "cuda_ipc":
            phase_cuda_ipc(rec, gpu, out_dir)
        elif name == "nccl":
            phase_nccl(rec, gpu)
        elif name == "rl":
            phase_rl(rec, gpu, out_dir, rl_set, keep_run)
        elif name == "rl_qwen":
            phase_rl_qwen(rec, gpu, out_dir, rl_set, keep_run)
        elif name == "gpu_tests":
            phase_gpu_tests(rec, gpu, out_dir)
        else:
            raise ValueError(f"phase {name!r}: expected one of {PHASES[1:]}")
    except Exception:  # noqa: BLE001 - the report carries the failure
        rec.doc["status"], rec.doc["error"] = FAILED, _tail(traceback.format_exc(), 4000)
        rec.flush()
        return 1
    if rec.doc["status"] is None:
        rec.doc["status"] = PASSED if all(c["ok"] for c in rec.doc["checks"]) else FAILED
    rec.flush()
    return 0 if rec.doc["status"] in (PASSED, SKIPPED) else 1


# ------------------------------------------------------------------------------------------- orchestration

def run_check(out_dir: Path, *, dry_run: bool, budget_s: float = BUDGET_S, phases: tuple[str, ...] = PHASES,
              wheelhouse: Path = ROOT / "gpu-wheelhouse", venv: Path | None = None, rl_set: tuple[str, ...] = (),
              keep: bool = False) -> dict:
    """Run the phases, write OUT_DIR/report.json, return the report."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise ValueError(f"--phases: {unknown or 'none given'}; choose from {', '.join(PHASES)}")
    mode = "cpu-dry-run" if dry_run else "gpu"
    out_dir = Path(out_dir).resolve()
    (out_dir / "phases").mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    budget, started = Budget(budget_s), time.time()
    notes = []
    if dry_run:
        notes.append(f"CPU dry run: vocab_op on a {OP_SHAPE['cpu']} shard instead of {OP_SHAPE['gpu']}; the RL run "
                     "is CPU-sized and float32 (bf16 training is CUDA-only); cuda_ipc makes its round trip over "
                     "shared memory; nccl and rl_qwen list what they check on a GPU (figure 'planned'); the GPU "
                     "tests skip (no CUDA); no venv is created and nothing is installed: the phases run on "
                     + sys.executable)
    results: dict[str, PhaseResult] = {}
    python = sys.executable
    if not dry_run and "setup" not in phases and venv is not None:   # a venv kept (--keep) by an earlier check
        python = str(Path(venv) / "bin" / "python")
    # The checkout first on every phase's path: a venv may hold another checkout's editable install.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    created_venv = None
    for name in PHASES:
        if name not in phases:
            continue
        timeout = budget.allot(PHASE_CAPS_S[name])
        if timeout is None:
            results[name] = PhaseResult(name, NOT_RUN, reason=f"budget of {budget_s:.0f} s spent")
        elif name == "setup":
            results[name], python = setup_phase(mode, Path(wheelhouse).resolve(), timeout, logs, venv)
            if not dry_run and venv is None and "venv" in results[name].figures:
                created_venv = Path(results[name].figures["venv"])
        else:
            out_json = out_dir / "phases" / f"{name}.json"
            out_json.unlink(missing_ok=True)
            cmd = [python, str(Path(__file__).resolve()), "phase", name, "--out-json", str(out_json),
                   "--out-dir", str(out_dir)] + (["--cpu-dry-run"] if dry_run else []) + (["--keep"] if keep else [])
            for o in rl_set:
                cmd += ["--rl-set", o]
            results[name] = run_phase_process(name, cmd, timeout_s=timeout, out_json=out_json,
                                              log_path=logs / f"{name}.log", env=env)
        _print_line(results[name])
        report = build_report(mode, results, started=started, finished=time.time(), budget_s=budget_s, notes=notes)
        write_json(out_dir / "report.json", report)  # after every phase: a killed check still leaves a report
    if created_venv is not None and not keep:
        shutil.rmtree(created_venv, ignore_errors=True)
    print(f"gpu check ({mode}): {'OK' if report['ok'] else 'FAILED'} in {report['duration_s']:.0f} s; report: "
          f"{out_dir / 'report.json'}", flush=True)
    return report


def _print_line(r: PhaseResult) -> None:
    why = r.reason or (r.error.strip().splitlines()[-1] if r.error else "")
    bad = [c["name"] for c in r.checks if not c["ok"]]
    print(f"[gpu-check] {r.name:<9} {r.status:<8} {r.duration_s:6.1f} s  {why}"
          + (f" failed checks: {bad}" if bad else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheelhouse", help="download the cp312 wheels the GPU image lacks (needs PyPI)")
    w.add_argument("dir", type=Path)
    w.add_argument("--max-mib", type=float, default=WHEELHOUSE_MAX_MIB)
    r = sub.add_parser("run", help="run the check, write OUT_DIR/report.json")
    r.add_argument("out_dir", type=Path)
    r.add_argument("--cpu-dry-run", action="store_true", help="this machine's venv, CPU-sized shapes")
    r.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"all phases together (default {BUDGET_S:.0f})")
    r.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset, in the fixed order")
    r.add_argument("--wheelhouse", type=Path, default=Path(os.environ.get("GPU_WHEELHOUSE", ROOT / "gpu-wheelhouse")))
    r.add_argument("--venv", type=Path, default=None, help="GPU: create the venv here (default: a temporary one)")
    r.add_argument("--rl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set override for the RL run (repeatable)")
    r.add_argument("--keep", action="store_true", help="keep the venv and the RL run directory")
    ph = sub.add_parser("phase", help="one phase in this process (internal)")
    ph.add_argument("name", choices=PHASES[1:])
    ph.add_argument("--out-json", type=Path, required=True)
    ph.add_argument("--out-dir", type=Path, required=True)
    ph.add_argument("--cpu-dry-run", action="store_true")
    ph.add_argument("--rl-set", action="append", default=[])
    ph.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    if args.command == "wheelhouse":
        try:
            build_wheelhouse(args.dir, args.max_mib)
        except (ValueError, subprocess.CalledProcessError) as e:
            print(f"gpu wheelhouse: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "phase":
        return run_phase_child(args.name, args.out_json, not args.cpu_dry_run, args.out_dir.resolve(), args.rl_set,
                               args.keep)
    for o in args.rl_set:
        if "=" not in o:
            p.error(f"--rl-set {o!r}: expected KEY=VALUE, e.g. --rl-set rollout.prompts_per_step=8")
    try:
        report = run_check(args.out_dir, dry_run=args.cpu_dry_run, budget_s=args.budget_s,
                           phases=tuple(x for x in args.phases.split(",") if x), wheelhouse=args.wheelhouse,
                           venv=args.venv, rl_set=tuple(args.rl_set), keep=args.keep)
    except ValueError as e:
        p.error(str(e))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
