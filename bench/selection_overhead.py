"""Clip-Cov / KL-Cov overhead per training step, as ratios: the token selection and the extra current-policy forward.

Clip-Cov and KL-Cov choose tokens from a GLOBAL covariance over each optimizer mini-batch
(losses/policy.py ``compute_token_selection``, ops/covariance.py). The trainer (``Trainer._token_selection``)
runs it once per mini-batch; with ``loss.selection_logprobs='current'`` (default) every mini-batch after the
first first runs one extra no-grad forward (``Actor.logprobs``) for the current policy's log-probs, with 'old'
it reuses the step's old log-probs. Goal (issue): the overhead under 2% of the step time at the Qwen shapes'
proportions (configs/qwen2.5-7b_*.yaml: 8 mini-batches of 256 prompts x 8 responses, responses up to 8k tokens,
vocabulary 152k, tp 4, 8 GPUs).

Run:
    python bench/selection_overhead.py                     # ~3 min on 2 idle cores (table on stdout)
    python bench/selection_overhead.py --quick             # smaller model and batch, < 40 s on 2 idle cores
    python bench/selection_overhead.py --out sel.json      # also write every measurement as JSON
    python bench/selection_overhead.py --e2e               # also time one real trainer step per mode (slow)

What is measured, in ONE process (gloo, world size 1, through ``init_parallel``), all as RATIOS (absolute times
are printed as context only):
 (1) selection alone: ``compute_token_selection`` with the Qwen configs' KL-Cov and Clip-Cov settings, called
     as the trainer calls it (token keys, dp group, step, seed) on one mini-batch given its log-probs, against
     one mini-batch forward+backward+optimizer step (``Actor.train_step`` with the trainer's KL-Cov policy loss,
     ``Trainer._policy_loss_fn``), on a Megatron-Core GPT built by the project's own ``Actor`` and scaled to keep
     Qwen2.5-7B-like proportions on CPU (SwiGLU ffn = 5.25 x hidden, GQA, untied output layer, lm-head ~10% of
     the matmul FLOPs as in Qwen2.5-7B's 7.7%, rows right-padded to the batch's longest row as
     rows_from_samples does, 8 mini-batches, micro-batch size 1 as the Qwen configs).
 (2) the extra current-policy forward (``Actor.logprobs`` on one mini-batch) against the forward+backward, and
     the per-step share it adds with M mini-batches: (M-1) forwards over M forward+backwards, and also over the
     step's whole training compute (M forward+backwards + the old-log-prob forward over the batch, M mini-batch
     forwards).
 (3) the same selection at the real Qwen2.5-7B token count per mini-batch (256 x 8 / 8 = 256 sequences x the
     assumed mean of 2048 tokens = 524,288 tokens; and each data-parallel rank's half of it, which is what one
     rank computes with dp = 2), measured on this CPU, against an ANALYTIC estimate of the 7B forward+backward
     of that mini-batch: FLOPs = 6 x P x tokens (P = matmul parameters: transformer layers + untied output
     layer, computed from the config's shapes, i.e. attention FLOPs and the input embedding are left out, which
     makes the estimate of the forward+backward smaller and the ratios larger), at an assumed 400 TFLOP/s per
     GPU (bf16 H100: ~989 TFLOP/s dense peak at a realistic ~40% MFU) on the config's 8 GPUs. A CPU core is far
     slower than a GPU at the selection, so that ratio is an upper bound; a GPU estimate of the selection is
     added from the selection's own op trace (kernels counted, bytes each kernel reads and writes, all-reduces;
     see ``--gpu-*``), stated with its assumptions.
Every time is the median of --reps runs after one warm-up run; the reps go round robin over the variants, so
load from other processes hits each alike (a load spike can still move a median of 2-3 runs: rerun, or raise
--reps, when one row stands out). The selection is O(tokens) and so is the forward+backward (O(tokens x P)),
so padding changes neither ratio: both run on the padded [rows, T] tensors.

Threads: 1 intra-op thread by default. On a shared 2-core machine two OpenMP threads were 3x (matmul) to 100x
(small element-wise ops) slower than one, because each op waits for a descheduled thread; use --threads 2 on
an idle machine. Ratios change little with the thread count; absolute times do.

This is a measurement script, not a test: it asserts nothing.

Measured (`python bench/selection_overhead.py`, one full run): 2-core AMD EPYC KVM guest, torch 2.13.0+cpu,
1 thread, shared with other jobs (1-minute load average 9-10 on 2 cores during the run, so absolute times are
~4x an idle machine's; wall 104 s + 12 s imports; `--quick` took 39 s at load ~10).

(1)+(2) one mini-batch of the scaled model (4 layers, hidden 256, ffn 1344, vocab 2048, 5.84M parameters;
16 rows x 256 = 4096 padded tokens, 559 valid; KL-Cov ratio 2e-3, Clip-Cov 2e-4 as the Qwen configs):

| part | median s | / forward+backward |
|---|---:|---:|
| Actor.train_step (forward+backward+Adam step) | 6.150 | 1.0000 |
| Actor.logprobs (the extra 'current' forward) | 2.340 | 0.3804 |
| compute_token_selection kl_cov | 0.0115 | 0.0019 |
| compute_token_selection clip_cov | 0.0093 | 0.0015 |

Per step, M = 8 mini-batches (selection = the slower of the two):

| selection_logprobs | over M forward+backwards | over the training compute (+ old-log-prob forward) |
|---|---:|---:|
| old | 0.19% | 0.14% |
| current | 33.5% | 24.2% |

'current' is under 2% of the step time only if training is under 8.2% of the step (rollouts and sync the rest).
`--quick --e2e` (real trainer loop, Trainer._token_selection + Actor.train_step over 8 mini-batches, 2 steps per
mode): current/old - 1 = 25.9% of the training part measured vs 24.1% predicted from the parts above.

(3) Qwen2.5-7B (P = 7.07B matmul parameters of 7.62B; 256 x 2048 = 524,288 tokens per mini-batch; 6 P tokens =
2.22e16 FLOP on 8 GPUs at 400 TFLOP/s = 6.95 s of forward+backward per mini-batch; dp = 2):

| selection | tokens | CPU s | CPU / 7B fwd+bwd | GPU estimate s | GPU est. / 7B fwd+bwd |
|---|---:|---:|---:|---:|---:|
| kl_cov, whole mini-batch on one rank | 524,288 | 0.232 | 3.33% | 0.0107 | 0.154% |
| clip_cov, whole mini-batch on one rank | 524,288 | 0.208 | 2.99% | 0.0093 | 0.134% |
| kl_cov, one dp rank's half (the config) | 262,144 | 0.105 | 1.52% | 0.0103 | 0.148% |
| clip_cov, one dp rank's half (the config) | 262,144 | 0.093 | 1.34% | 0.0089 | 0.128% |

GPU estimate: 443 (kl_cov) / 385 (clip_cov) kernels x 20 us + 0.7-1.4 GB / 1.6 TB/s + 19 / 15 all-reduces x 50 us.
The 7B extra 'current' forward is 2 P tokens per mini-batch after the first: 7/8 x 1/3 = 29.2% of the M
forward+backwards, 21.9% of the training compute (the scaled model measures 33.5% / 24.2%).

Conclusion on the 2% goal: with selection_logprobs='old' the Clip-Cov/KL-Cov overhead is the selection alone:
0.19% of the forward+backward at the scaled model on CPU, 1.3-1.5% at the 7B token count even when the selection
runs on one CPU core (per dp rank, as the config runs it), ~0.15% with the selection on the GPU (estimate): under
2%. With 'current' (the default) the extra forwards add ~22-24% of the training compute (29-33% of the
forward+backwards), over 10x the goal; the selection itself is not the cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_entcov.config import load_config  # noqa: E402
from megatron_entcov.losses.advantages import broadcast_to_tokens, compute_group_advantages  # noqa: E402
from megatron_entcov.losses.policy import compute_token_selection  # noqa: E402

GOAL = 0.02
"""The issue's goal: Clip-Cov/KL-Cov overhead under 2% of the step time."""

SCALES = {
    # The CPU model: Qwen2.5-7B proportions (ffn/hidden 5.25 vs 5.29, 4:1 GQA vs 7:1, untied lm head whose share
    # of the matmul parameters is 9.9% here vs 7.7%), 8 mini-batches of 2 prompts x 8 responses, micro-batch 1.
    "full": dict(layers=4, hidden=256, ffn=1344, heads=4, groups=1, vocab=2048, seq=256, prompts_per_mini=2,
                 reps=3, warmup=1, sel_inner=5, qwen_reps=5),
    "quick": dict(layers=2, hidden=128, ffn=672, heads=2, groups=1, vocab=1024, seq=128, prompts_per_mini=1,
                  reps=2, warmup=1, sel_inner=3, qwen_reps=3),
}
N_SAMPLES = 8           # responses per prompt, as the Qwen configs
NUM_MINI = 8            # optimizer mini-batches per step, as the Qwen configs

QWEN_BASE = ROOT / "configs" / "qwen2.5-7b_base.yaml"
QWEN_KL = ROOT / "configs" / "qwen2.5-7b_kl_cov.yaml"
QWEN_CLIP = ROOT / "configs" / "qwen2.5-7b_clip_cov.yaml"


# --------------------------------------------------------------------------------------------- timing


def _median_min(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "runs": len(xs)}


def _round_robin(variants: dict, reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Run every variant (a callable returning its own seconds) warmup + reps times, round robin; medians."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name, fn in variants.items():
            dt = fn()
            if rep >= warmup:
                times[name].append(dt)
    return {name: _median_min(ts) for name, ts in times.items()}


def _timed(fn, inner: int = 1):
    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner
    return run


# --------------------------------------------------------------------------------------------- op trace


class _OpTrace:
    """Counts the kernels (non-view aten ops), the bytes they read and write, and the all-reduces of a call."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        trace = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                trace._record(func, args, kwargs or {}, out)
                return out

        self.mode = Mode()
        self.kernels = 0
        self.allreduces = 0
        self.bytes = 0

    @staticmethod
    def _tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(_OpTrace._tensor_bytes(o) for o in obj)
        if isinstance(obj, dict):
            return sum(_OpTrace._tensor_bytes(o) for o in obj.values())
        return 0

    def _record(self, func, args, kwargs, out) -> None:
        name = str(func)
        if name.startswith("c10d.allreduce"):
            self.allreduces += 1
            return
        if getattr(func, "is_view", False) or name in ("aten.detach.default", "aten.lift_fresh.default"):
            return
        self.kernels += 1
        self.bytes += self._tensor_bytes(args) + self._tensor_bytes(kwargs) + self._tensor_bytes(out)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


# --------------------------------------------------------------------------------------------- model and data


def _qwen_matmul_params(model) -> dict[str, float]:
    """Parameters of a Qwen2-style decoder from its config: total, and the matmul ones (layers + output layer)."""
    h, heads, groups = model.hidden_size, model.num_attention_heads, model.num_query_groups
    kv = model.kv_channels or h // heads
    attn = h * heads * kv + 2 * h * groups * kv + heads * kv * h
    attn_bias = (heads * kv + 2 * groups * kv) if model.add_qkv_bias else 0
    mlp = 3 * h * model.ffn_hidden_size
    layer = attn + attn_bias + mlp + 2 * h
    embed = model.vocab_size * h
    head = 0 if model.tie_word_embeddings else model.vocab_size * h
    total = model.num_layers * layer + embed + head + h
    matmul = model.num_layers * (attn + mlp) + model.vocab_size * h
    return {"total": float(total), "matmul": float(matmul), "lm_head_share": model.vocab_size * h / matmul}


def _build(scale: dict, loss_cfg, out_dir: str):
    """One process, gloo, the project's Actor with the scaled model; returns (cfg, ps, actor)."""
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.actor import Actor

    overrides = [
        f"model.num_layers={scale['layers']}", f"model.hidden_size={scale['hidden']}",
        f"model.ffn_hidden_size={scale['ffn']}", f"model.num_attention_heads={scale['heads']}",
        f"model.num_query_groups={scale['groups']}", f"model.vocab_size={scale['vocab']}",
        "model.make_vocab_size_divisible_by=128", f"model.max_position_embeddings={scale['seq']}",
        "model.add_qkv_bias=true", "model.tie_word_embeddings=false", "model.rotary_base=1000000.0",
        f"rollout.prompts_per_step={scale['prompts_per_mini'] * NUM_MINI}",
        f"rollout.n_samples_per_prompt={N_SAMPLES}", f"optim.num_mini_batches={NUM_MINI}",
        "optim.micro_batch_size=1", "optim.optimizer=adam", "optim.lr=1e-7", "optim.clip_grad=1.0",
        "metrics.tensorboard=false", f"output_dir={out_dir}", "name=selection_overhead", "seed=1234",
    ]
    cfg = load_config(None, overrides).resolve(1)
    # The Qwen KL-Cov loss settings; eager log-prob kernels (compiling costs ~15 s per process on CPU).
    cfg.loss = dataclasses.replace(loss_cfg, compile_logprob_kernels=False)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    actor = Actor(cfg, ps, temperature=1.0)
    return cfg, ps, actor


def _rollout_batch(scale: dict, seed: int):
    """A step's worth of rollouts as padded rows (rows_from_samples), RL-like: short prompts, skewed response
    lengths capped so that the longest row fills the sequence, 0/1 rewards, GRPO advantages."""
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.rollout.types import Sample

    g = torch.Generator().manual_seed(seed)
    t, vocab = scale["seq"], scale["vocab"]
    num = scale["prompts_per_mini"] * NUM_MINI * N_SAMPLES
    prompt_max = max(t // 16, 2)
    cap = t - prompt_max
    samples = []
    for i in range(num):
        p = int(torch.randint(max(prompt_max // 2, 1), prompt_max + 1, (1,), generator=g))
        # Mean response ~ cap / 4 as 2k of 8k in the Qwen runs; some hit the cap (finish_reason 'length').
        r = 1 + min(cap - 1, int(torch.empty(1).exponential_(4.0 / cap, generator=g)))
        if i == 0:                                   # the longest row fills the sequence: T = seq
            p, r = prompt_max, cap
        ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[0.0] * r,
                              finish_reason="length" if r == cap else "stop", weight_version=0, index=i))
    rewards = (torch.rand(num, generator=g) < 0.5).float()
    adv = compute_group_advantages(rewards, group_size=N_SAMPLES).advantages
    return rows_from_samples(samples, adv, pad_id=0, sample_ids=list(range(num)), key_stride=t, multiple_of=1,
                             device="cpu")


def _qwen_tensors(rows: int, t: int, row_offset: int, seed: int):
    """Selection inputs at Qwen scale: [rows, t] all valid, log-probs skewed towards 0 as a trained policy's,
    old log-probs a little apart, GRPO advantages per response. (The selection's cost does not depend on the
    values: its radix select runs a fixed number of passes over every token.)"""
    g = torch.Generator().manual_seed(seed)
    logprobs = -(torch.rand(rows, t, generator=g) ** 4) * 6.0
    old = logprobs + 0.05 * torch.randn(rows, t, generator=g)
    rewards = (torch.rand(rows, generator=g) < 0.5).float()
    mask = torch.ones(rows, t, dtype=torch.bool)
    adv = broadcast_to_tokens(compute_group_advantages(rewards, group_size=N_SAMPLES).advantages, mask)
    keys = (torch.arange(rows, dtype=torch.int64)[:, None] + row_offset) * t + torch.arange(t)[None, :]
    return logprobs, old, adv, mask, keys


# --------------------------------------------------------------------------------------------- parts


def _select(loss_cfg, current, mini, ps, step: int, seed: int):
    """compute_token_selection exactly as Trainer._token_selection calls it."""
    return compute_token_selection(loss_cfg, current, mini.old_logprobs, mini.advantages, mini.loss_mask,
                                   token_keys=mini.token_keys, group=ps.dp_group, step=step, seed=seed)


def _scaled_model_parts(scale: dict, cfg, ps, actor, clip_loss, batch) -> dict:
    """Parts (1) and (2): selection, extra forward and forward+backward on one mini-batch of the scaled model."""
    from megatron_entcov.trainer import Trainer

    trainer = types.SimpleNamespace(cfg=cfg, ps=ps, actor=actor)     # what the trainer's methods read
    batch.old_logprobs, batch.old_entropy = actor.logprobs(batch)   # step start: old log-probs (trainer)
    batch.rollout_logprobs = batch.old_logprobs.clone()
    mini = batch.split(NUM_MINI)[1]                                # a mini-batch after the first
    current, _ = actor.logprobs(mini)

    def sel_kl():
        return _select(cfg.loss, current, mini, ps, actor.optimizer_steps, cfg.seed)

    def sel_clip():
        return _select(clip_loss, current, mini, ps, actor.optimizer_steps, cfg.seed)

    def fwd():
        actor.logprobs(mini)

    def fwd_bwd():
        selection = sel_kl()                       # for this step's index (untimed; timed as sel_kl)
        t0 = time.perf_counter()
        result = actor.train_step(mini, Trainer._policy_loss_fn(trainer, selection))
        dt = time.perf_counter() - t0
        if not result.applied:
            raise RuntimeError("the benchmark's train step was skipped (non-finite gradient norm)")
        return dt

    inner = scale["sel_inner"]
    times = _round_robin({"selection_kl_cov": _timed(sel_kl, inner), "selection_clip_cov": _timed(sel_clip, inner),
                          "forward": _timed(fwd), "forward_backward": fwd_bwd},
                         reps=scale["reps"], warmup=scale["warmup"])
    chosen = sel_kl()
    mask = mini.loss_mask
    info = {"rows": mini.num_rows, "seq": mask.shape[1], "padded_tokens": mask.numel(),
            "valid_tokens": int(mask.sum()), "kl_cov_chosen": int(chosen.kl_cov_mask.sum()),
            "clip_cov_chosen": int(sel_clip().clip_cov_mask.sum())}
    return {"times": times, "mini_batch": info}


def _qwen_selection_at(scale: dict, kl_loss, clip_loss, ps, rows: int, t: int, args) -> dict:
    """Part (3) at one size: CPU medians and the op trace (GPU estimate) of both selections on [rows, t]."""
    lp, old, adv, mask, keys = _qwen_tensors(rows, t, 0, seed=7)
    losses = {"kl_cov": kl_loss, "clip_cov": clip_loss}

    def call(loss):
        return compute_token_selection(loss, lp, old, adv, mask, token_keys=keys, group=ps.dp_group, step=0,
                                       seed=1234)

    times = _round_robin({name: _timed(lambda loss=loss: call(loss)) for name, loss in losses.items()},
                         reps=scale["qwen_reps"], warmup=1)
    traces = {}
    for name, loss in losses.items():
        with _OpTrace() as tr:
            call(loss)
        gpu_s = (tr.kernels * args.gpu_launch_us * 1e-6 + tr.bytes / (args.gpu_hbm_tbps * 1e12)
                 + tr.allreduces * args.gpu_allreduce_us * 1e-6)
        traces[name] = {"kernels": tr.kernels, "bytes": tr.bytes, "allreduces": tr.allreduces,
                        "gpu_estimate_s": gpu_s}
    return {"rows": rows, "seq": t, "tokens": rows * t, "times": times, "trace": traces}


def _qwen_selection(scale: dict, kl_loss, clip_loss, ps, rows: int, t: int, dp: int, args) -> dict:
    """Part (3): the selection at Qwen token counts on this CPU (whole mini-batch and one dp rank's share)."""
    return {label: _qwen_selection_at(scale, kl_loss, clip_loss, ps, n_rows, t, args)
            for label, n_rows in (("mini_batch", rows), ("per_dp_rank", rows // dp))}


def _e2e(cfg, ps, actor, batch) -> dict:
    """One trainer step's training part per mode, through the trainer's own methods: old log-probs over the
    batch, then per mini-batch Trainer._token_selection + Actor.train_step (rollouts and sync left out)."""
    from megatron_entcov.trainer import Trainer

    out = {}
    for mode in ("old", "current", "old", "current"):
        c = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, selection_logprobs=mode))
        trainer = types.SimpleNamespace(cfg=c, ps=ps, actor=actor)
        t0 = time.perf_counter()
        batch.old_logprobs, batch.old_entropy = actor.logprobs(batch)
        sel_s = 0.0
        for index, mini in enumerate(batch.split(c.optim.num_mini_batches)):
            t1 = time.perf_counter()
            selection = Trainer._token_selection(trainer, mini, index)
            sel_s += time.perf_counter() - t1
            actor.train_step(mini, Trainer._policy_loss_fn(trainer, selection))
        out.setdefault(mode, []).append({"train_s": time.perf_counter() - t0, "selection_s": sel_s})
    res = {m: {"train_s": statistics.median(r["train_s"] for r in runs),
               "selection_s": statistics.median(r["selection_s"] for r in runs)} for m, runs in out.items()}
    res["current_over_old_minus_1"] = res["current"]["train_s"] / res["old"]["train_s"] - 1.0
    return res


# --------------------------------------------------------------------------------------------- report


def _ratios(parts: dict, qwen: dict, qwen_sel: dict, m: int) -> dict:
    t = {k: v["median_s"] for k, v in parts["times"].items()}
    fb, f = t["forward_backward"], t["forward"]
    r = {
        "selection_kl_cov_over_fwd_bwd": t["selection_kl_cov"] / fb,
        "selection_clip_cov_over_fwd_bwd": t["selection_clip_cov"] / fb,
        "forward_over_fwd_bwd": f / fb,
    }
    sel = max(t["selection_kl_cov"], t["selection_clip_cov"])
    # Per step: M selections + (M-1) extra forwards ('current'), over M forward+backwards (the measure)
    # and over the whole training compute (M forward+backwards + the old-log-prob forward = M mini-batch forwards).
    r["step_old_over_fwd_bwd"] = m * sel / (m * fb)
    r["step_current_over_fwd_bwd"] = (m * sel + (m - 1) * f) / (m * fb)
    r["step_old_over_train"] = m * sel / (m * fb + m * f)
    r["step_current_over_train"] = (m * sel + (m - 1) * f) / (m * fb + m * f)
    r["current_breakeven_train_share_of_step"] = GOAL / r["step_current_over_train"]
    fb7 = qwen["fwd_bwd_s"]
    for label, q in qwen_sel.items():
        for name in ("kl_cov", "clip_cov"):
            r[f"qwen_{label}_{name}_cpu_over_fwd_bwd"] = q["times"][name]["median_s"] / fb7
            r[f"qwen_{label}_{name}_gpu_estimate_over_fwd_bwd"] = q["trace"][name]["gpu_estimate_s"] / fb7
    r["qwen_current_extra_forward_step_over_fwd_bwd"] = (m - 1) * 2.0 / (m * 6.0)
    r["qwen_current_extra_forward_step_over_train"] = (m - 1) * 2.0 / (m * 6.0 + m * 2.0)
    return r


def _print_report(res: dict) -> None:
    s, r, parts, q = res["scaled_model"], res["ratios"], res["scaled_model"]["parts"], res["qwen"]
    mb = parts["mini_batch"]
    t = {k: v["median_s"] for k, v in parts["times"].items()}
    m = NUM_MINI
    print(f"\nScaled model (Actor, Megatron-Core GPT): {s['layers']} layers, hidden {s['hidden']}, ffn {s['ffn']}, "
          f"{s['heads']} heads / {s['groups']} kv group(s), vocab {s['vocab']} (lm head {s['lm_head_share']:.1%} of "
          f"matmul params; Qwen2.5-7B {q['lm_head_share']:.1%}), {s['params']/1e6:.2f}M params")
    print(f"Mini-batch: {mb['rows']} rows x {mb['seq']} = {mb['padded_tokens']} padded tokens ({mb['valid_tokens']} "
          f"valid); {m} mini-batches per step; micro-batch 1; {res['threads']} thread(s); "
          f"KL-Cov chose {mb['kl_cov_chosen']}, Clip-Cov {mb['clip_cov_chosen']} tokens")
    print("\n(1)+(2) one mini-batch of the scaled model (median of reps; seconds are context only)")
    print("| part | median s | min s | / forward+backward |")
    print("|---|---:|---:|---:|")
    for key, label in (("forward_backward", "Actor.train_step (fwd+bwd+optimizer)"),
                       ("forward", "Actor.logprobs (the extra 'current' forward)"),
                       ("selection_kl_cov", "compute_token_selection kl_cov"),
                       ("selection_clip_cov", "compute_token_selection clip_cov")):
        v = parts["times"][key]
        print(f"| {label} | {v['median_s']:.4f} | {v['min_s']:.4f} | {v['median_s'] / t['forward_backward']:.4f} |")
    print(f"\nPer step with M={m} mini-batches (selection = the slower of kl_cov/clip_cov):")
    print("| selection_logprobs | over M fwd+bwd | over training compute (M fwd+bwd + old-logprob forward) |")
    print("|---|---:|---:|")
    print(f"| old | {r['step_old_over_fwd_bwd']:.3%} | {r['step_old_over_train']:.3%} |")
    print(f"| current | {r['step_current_over_fwd_bwd']:.2%} | {r['step_current_over_train']:.2%} |")
    print(f"'current' stays under {GOAL:.0%} of the step time only if training is under "
          f"{r['current_breakeven_train_share_of_step']:.1%} of it (the rest rollouts and sync).")

    print(f"\n(3) Qwen2.5-7B: P = {q['matmul_params']/1e9:.3f}B matmul params ({q['total_params']/1e9:.3f}B total); "
          f"mini-batch {q['seqs_per_mini']} seqs x {q['mean_tokens']} tokens = {q['tokens_per_mini']:,} tokens; "
          f"6*P*tokens = {q['fwd_bwd_flop']:.3e} FLOP on {q['gpus']} GPUs x {q['gpu_tflops']:.0f} TFLOP/s "
          f"(assumed) = {q['fwd_bwd_s']:.2f} s per mini-batch (dp={q['dp']})")
    print("| selection on | rows x T | tokens | CPU s (median) | CPU / 7B fwd+bwd | GPU estimate s | "
          "GPU est. / 7B fwd+bwd | kernels | MB moved | all-reduces |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, sel in res["qwen_selection"].items():
        for name in ("kl_cov", "clip_cov"):
            tr = sel["trace"][name]
            print(f"| {name}, {label.replace('_', ' ')} | {sel['rows']}x{sel['seq']} | {sel['tokens']:,} | "
                  f"{sel['times'][name]['median_s']:.3f} | {r[f'qwen_{label}_{name}_cpu_over_fwd_bwd']:.2%} | "
                  f"{tr['gpu_estimate_s']:.4f} | {r[f'qwen_{label}_{name}_gpu_estimate_over_fwd_bwd']:.3%} | "
                  f"{tr['kernels']} | {tr['bytes'] / 1e6:.0f} | {tr['allreduces']} |")
    print(f"GPU estimate = kernels x {res['args']['gpu_launch_us']} us + bytes / {res['args']['gpu_hbm_tbps']} TB/s "
          f"+ all-reduces x {res['args']['gpu_allreduce_us']} us (assumed; eager launches, no fusion).")
    print(f"7B 'current' extra forward (2*P*tokens per mini-batch after the first): "
          f"{r['qwen_current_extra_forward_step_over_fwd_bwd']:.1%} of M fwd+bwd, "
          f"{r['qwen_current_extra_forward_step_over_train']:.1%} of the training compute.")
    if "e2e" in res:
        e = res["e2e"]
        print(f"\nEnd to end (trainer methods, one step's training part, median of 2 per mode): old "
              f"{e['old']['train_s']:.1f} s, current {e['current']['train_s']:.1f} s -> current/old - 1 = "
              f"{e['current_over_old_minus_1']:.1%} (predicted "
              f"{r['step_current_over_train'] - r['step_old_over_train']:.1%}); "
              f"Trainer._token_selection took {e['old']['selection_s'] / e['old']['train_s']:.2%} of the 'old' step's "
              f"training part")
    print(f"\nLoad average (1 min) before/after: {res['loadavg_before']:.2f} / {res['loadavg_after']:.2f}; "
          f"wall {res['wall_s']:.0f} s (model build {s['build_s']:.0f} s)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller model, batch and repeats (< 40 s on 2 cores)")
    ap.add_argument("--out", type=Path, help="also write the measurements as JSON here")
    ap.add_argument("--reps", type=int,
                    help="timed repeats per variant (default: 3, quick 2; the Qwen-scale selection: 5, quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see the docstring)")
    ap.add_argument("--e2e", action="store_true", help="also time the training part of real trainer steps, "
                    "'old' vs 'current' (2 steps each; slow)")
    ap.add_argument("--qwen-mean-tokens", type=int, default=2048,
                    help="assumed mean tokens per sequence (prompt + response) at Qwen scale (default 2048)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the Qwen2.5-7B run (default 8: tp 4 x dp 2)")
    ap.add_argument("--gpu-tflops", type=float, default=400.0,
                    help="assumed achieved bf16 TFLOP/s per GPU (default 400: H100 at ~40%% MFU)")
    ap.add_argument("--gpu-launch-us", type=float, default=20.0, help="assumed cost per eager kernel, us (20)")
    ap.add_argument("--gpu-hbm-tbps", type=float, default=1.6,
                    help="assumed achieved memory bandwidth, TB/s (1.6: half of H100 SXM's 3.35)")
    ap.add_argument("--gpu-allreduce-us", type=float, default=50.0, help="assumed latency per small all-reduce, us")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    scale = dict(SCALES["quick" if args.quick else "full"])
    if args.reps:
        scale["reps"] = scale["qwen_reps"] = args.reps
    start, load_before = time.monotonic(), os.getloadavg()[0]

    qwen_cfg = load_config(QWEN_BASE).resolve(args.gpus)
    kl_loss, clip_loss = load_config(QWEN_KL).loss, load_config(QWEN_CLIP).loss
    qp = _qwen_matmul_params(qwen_cfg.model)
    m = qwen_cfg.optim.num_mini_batches
    seqs = qwen_cfg.rollout.prompts_per_step * qwen_cfg.rollout.n_samples_per_prompt // m
    tokens = seqs * args.qwen_mean_tokens
    fb_flop = 6.0 * qp["matmul"] * tokens
    qwen = {"total_params": qp["total"], "matmul_params": qp["matmul"], "lm_head_share": qp["lm_head_share"],
            "num_mini_batches": m, "seqs_per_mini": seqs, "mean_tokens": args.qwen_mean_tokens,
            "tokens_per_mini": tokens, "fwd_bwd_flop": fb_flop, "gpus": args.gpus, "gpu_tflops": args.gpu_tflops,
            "dp": qwen_cfg.parallel.data_parallel_size, "fwd_bwd_s": fb_flop / (args.gpus * args.gpu_tflops * 1e12)}
    if m != NUM_MINI:
        raise SystemExit(f"the Qwen config has {m} mini-batches; this script models {NUM_MINI}")

    from megatron_entcov.distributed.parallel import destroy_parallel

    with tempfile.TemporaryDirectory(prefix="selection_overhead_") as tmp:
        t_build = time.monotonic()
        cfg, ps, actor = _build(scale, kl_loss, tmp)
        build_s = time.monotonic() - t_build
        try:
            batch = _rollout_batch(scale, seed=cfg.seed)
            sp = _qwen_matmul_params(cfg.model)
            params = sum(p.numel() for c in actor.chunks for p in c.parameters())
            parts = _scaled_model_parts(scale, cfg, ps, actor, clip_loss, batch)
            qwen_sel = _qwen_selection(scale, kl_loss, clip_loss, ps, seqs, args.qwen_mean_tokens, qwen["dp"],
                                       args)
            e2e = _e2e(cfg, ps, actor, batch) if args.e2e else None
        finally:
            destroy_parallel()

    res = {
        "mode": "quick" if args.quick else "full",
        "scaled_model": {**{k: scale[k] for k in ("layers", "hidden", "ffn", "heads", "groups", "vocab", "seq")},
                         "params": params, "lm_head_share": sp["lm_head_share"], "build_s": build_s,
                         "parts": parts},
        "qwen": qwen,
        "qwen_selection": qwen_sel,
        "threads": args.threads,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if e2e is not None:
        res["e2e"] = e2e
    res["ratios"] = _ratios(parts, qwen, qwen_sel, NUM_MINI)
    res["loadavg_before"], res["loadavg_after"] = load_before, os.getloadavg()[0]
    res["wall_s"] = time.monotonic() - start
    res["machine"] = {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                      "torch": torch.__version__}
    _print_report(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, sort_keys=True))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
