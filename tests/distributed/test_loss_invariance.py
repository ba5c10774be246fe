"""Loss, gradient and Clip-Cov/KL-Cov selection are identical for dp in {1, 2} and micro-batch splits {1, 2, 4}.

One spawn of 2 gloo ranks (CPU) runs every case; the parent joins with a deadline and terminates the ranks on
failure, so a broken rank cannot hang the suite. Each rank compares against the single-process full-batch
reference it computes itself (group=None, one micro-batch):
  * chosen tokens (Clip-Cov and KL-Cov masks): exactly equal;
  * gradients w.r.t. log-probs and entropy: exactly equal (each token's gradient is its own term times the
    global 1/denominator, computed elementwise, so the split cannot change it);
  * loss and metrics, summed over micro-batches and ranks: equal up to float summation order (rtol 1e-5).
Log-probs are multiples of 0.25 and advantages are per-response, so many cov_t tie exactly and the
tie-breaking by token key is exercised. The token-entropy family (losses/token_entropy.py) runs in the same
spawn: high_entropy_tokens with entropy advantage shaping (its global threshold and kept tokens), archer with
the global and the per-response quantile, ce_gppo with the adaptive entropy coefficient; their token masks
must equal the single-process ones exactly.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_entcov.config import LossConfig
from megatron_entcov.losses.advantages import broadcast_to_tokens, compute_group_advantages
from megatron_entcov.losses.policy import compute_token_selection, policy_loss

WORLD = 2
DEADLINE_S = 120
ROWS, COLS = 16, 24
STEP, SEED = 3, 11
NAMES = ("ppo", "clip_cov", "kl_cov", "high_entropy_tokens", "archer", "archer_response", "ce_gppo")
EXTRA = {"high_entropy_tokens": {"entropy_advantage_coef": 0.4},
         "archer": {"archer_quantile_scope": "global", "archer_kl_coef": 0.1},
         "archer_response": {"name": "archer", "archer_kl_coef": 0.1},
         "ce_gppo": {"ce_gppo_beta1": 0.5, "entropy_coef": 0.0, "target_entropy": 2.0,
                     "target_entropy_coef_init": 0.05}}
"""Each token-entropy case's fields beside the shared ones."""
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logp = -torch.randint(1, 13, (ROWS, COLS), generator=g).float() * 0.25
    old = logp + torch.randn(ROWS, COLS, generator=g) * 0.25
    rewards = torch.randint(0, 2, (ROWS,), generator=g).float()
    adv_seq = compute_group_advantages(rewards, group_size=4).advantages
    lengths = torch.randint(COLS // 4, COLS + 1, (ROWS,), generator=g)
    lengths[5] = 0  # an empty response: counts in no denominator
    mask = torch.arange(COLS) < lengths.unsqueeze(1)
    logp = torch.where(mask, logp, -torch.inf)  # padding garbage must not leak
    keys = torch.arange(ROWS).unsqueeze(1) * COLS + torch.arange(COLS)
    return {"logp": logp, "old": old, "adv": broadcast_to_tokens(adv_seq, mask), "mask": mask, "keys": keys,
            "entropy": torch.rand(ROWS, COLS, generator=g) * 3}


def _cfg(name: str, agg: str) -> LossConfig:
    fields = dict(name=name, agg=agg, clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=5.0,
                  kl_cov_ratio=0.15, kl_cov_coef=1.0, entropy_coef=0.01)
    return LossConfig(**{**fields, **EXTRA.get(name, {})})


def _run(cfg: LossConfig, data: dict, rows: torch.Tensor, n_micro: int, group) -> dict[str, torch.Tensor]:
    """Selection over this rank's rows, then n_micro micro-batches; results scattered into global tensors."""
    local = {k: v[rows] for k, v in data.items()}
    logp = local["logp"].clone().requires_grad_(True)
    entropy = local["entropy"].clone().requires_grad_(True)
    sel = compute_token_selection(cfg, logp.detach(), local["old"], local["adv"], local["mask"],
                                  token_keys=local["keys"], group=group, step=STEP, seed=SEED,
                                  entropy=local["entropy"])
    loss_sum = torch.zeros(())
    metrics: dict[str, torch.Tensor] = {}
    for idx in torch.arange(rows.numel()).chunk(n_micro):
        s = slice(int(idx[0]), int(idx[-1]) + 1)
        loss, m = policy_loss(cfg, logp[s], local["old"][s], local["adv"][s], local["mask"][s], entropy=entropy[s],
                              step=STEP, selection=sel.rows(s))
        loss.backward()  # gradients accumulate (SUM) over micro-batches
        loss_sum += loss.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
    out = {"loss": loss_sum}
    out.update({f"metric:{k}": v for k, v in metrics.items()})
    for name, value in (("grad_logp", logp.grad), ("grad_entropy", entropy.grad),
                        ("clip_cov", sel.clip_cov_mask.float()), ("kl_cov", sel.kl_cov_mask.float()),
                        ("high_entropy", sel.high_entropy_mask.float()),
                        ("archer_high", torch.zeros_like(logp) if sel.archer_high_mask is None
                         else sel.archer_high_mask.float())):
        full = torch.zeros(ROWS, COLS)
        full[rows] = torch.nan_to_num(value)
        out[name] = full
    if group is not None:
        for v in out.values():
            dist.all_reduce(v, group=group)  # grads/masks: disjoint rows, so the SUM is a gather
    return out


def _compare(ref: dict, got: dict, where: str) -> None:
    for key in ("clip_cov", "kl_cov", "high_entropy", "archer_high", "grad_logp", "grad_entropy"):
        assert torch.equal(ref[key], got[key]), f"{where}: {key} differs: max |diff| = " \
                                                f"{(ref[key] - got[key]).abs().max().item()}"
    assert ref.keys() == got.keys(), where
    for key in ref:
        if key == "loss" or key.startswith("metric:"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=f"{where}: {key}")


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        group = dist.new_group(list(range(WORLD)))
        data = _global_batch()
        everything = torch.arange(ROWS)
        perm = torch.randperm(ROWS, generator=torch.Generator().manual_seed(1))
        layouts = {"contiguous": everything.chunk(WORLD)[rank], "permuted": perm[rank::WORLD]}
        checked = 0
        for name in NAMES:
            for agg in AGGS:
                cfg = _cfg(name, agg)
                ref = _run(cfg, data, everything, 1, None)
                chosen = int(ref["clip_cov"].sum() + ref["kl_cov"].sum() + ref["archer_high"].sum())
                if name == "high_entropy_tokens":
                    chosen = int(ref["high_entropy"].sum())
                assert name in ("ppo", "ce_gppo") or chosen >= 3, f"{name}: only {chosen} tokens chosen; too weak"
                if name == "ce_gppo":     # tokens outside the clip range keep a gradient: some must exist
                    clipped = ref["metric:train/clip_frac_low"] + ref["metric:train/clip_frac_high"]
                    assert clipped > 0 and ref["metric:coef/adaptive_entropy_coef"] > 0, name
                for n_micro in (2, 4):
                    _compare(ref, _run(cfg, data, everything, n_micro, None), f"{name}/{agg} dp=1 micro={n_micro}")
                    checked += 1
                for layout, rows in layouts.items():
                    for n_micro in (1, 2, 4):
                        _compare(ref, _run(cfg, data, rows, n_micro, group),
                                 f"{name}/{agg} dp=2 {layout} micro={n_micro}")
                        checked += 1
        Path(result_dir, f"rank{rank}.ok").write_text(str(checked))
        dist.destroy_process_group()
    except BaseException:
        Path(result_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def test_loss_grad_and_selection_invariant_to_dp_and_micro_batches(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "init"), str(tmp_path)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            errors = sorted(tmp_path.glob("rank*.err"))
            if errors:
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    errors = sorted(tmp_path.glob("rank*.err"))
    if errors:
        pytest.fail("\n".join(f"{e.name}:\n{e.read_text()}" for e in errors))
    for r, p in enumerate(procs):
        assert (tmp_path / f"rank{r}.ok").exists(), f"rank {r} did not finish (exit code {p.exitcode}; " \
                                                    f"timed out after {DEADLINE_S}s?)"
        assert int((tmp_path / f"rank{r}.ok").read_text()) == len(NAMES) * len(AGGS) * 8
