"""losses/policy.py with loss.tis_cap > 0: truncated importance sampling of the rollout/trainer mismatch.

The weight w_t = stop_grad(min(exp(old_t - rollout_t), C)) multiplies the policy-gradient surrogate only. The
references below are written from that formula in float64, independently of the code under test.
"""

import math

import pytest
import torch

from megatron_entcov.config import LossConfig
from megatron_entcov.losses.policy import compute_token_selection, policy_loss

TIS_KEYS = ("train/is_ratio_mean", "train/tis_weight_mean", "train/tis_clip_frac")


def test_tis_ppo_by_hand():
    """Three valid tokens + one padding token, PPO, C = 2, no PPO clip active.

    t0: A=+1, ratio 1.1, IS ratio 1.5 -> w 1.5, L = -1.1 * 1.5 = -1.65
    t1: A=+1, ratio 0.9, IS ratio 3.0 -> w 2.0 (truncated), L = -0.9 * 2 = -1.8
    t2: A=-1, ratio 1.0, IS ratio 0.5 -> w 0.5, L = 1.0 * 0.5 = 0.5
    pad: logp -inf, rollout nan (must not leak)
    """
    old = torch.full((1, 4), -1.0)
    logp = old + torch.log(torch.tensor([[1.1, 0.9, 1.0, 1.0]]))
    logp[0, 3] = -float("inf")
    logp.requires_grad_(True)
    rollout = old - torch.log(torch.tensor([[1.5, 3.0, 0.5, 1.0]]))
    rollout[0, 3] = float("nan")
    adv = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = policy_loss(LossConfig(name="ppo", tis_cap=2.0), logp, old, adv, mask, rollout_logprobs=rollout)
    assert loss.item() == pytest.approx((-1.65 - 1.8 + 0.5) / 3, abs=1e-6)
    loss.backward()
    # d/dlogp of -A w ratio is -A w ratio (w a constant).
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.65 / 3, -1.8 / 3, 0.5 / 3, 0.0]]), atol=1e-6, rtol=0)
    assert metrics["train/is_ratio_mean"].item() == pytest.approx((1.5 + 3.0 + 0.5) / 3, abs=1e-6)
    assert metrics["train/tis_weight_mean"].item() == pytest.approx((1.5 + 2.0 + 0.5) / 3, abs=1e-6)
    assert metrics["train/tis_clip_frac"].item() == pytest.approx(1 / 3)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def _batch(seed=0, rows=10, cols=16):
    """float64 inputs; rollout log-probs differ from old by N(0, 0.5) so that some weights exceed the cap."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.3
    rollout = old + torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).clone()
    lengths = torch.randint(cols // 3, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols) < lengths.unsqueeze(1)
    rollout = torch.where(mask, rollout, torch.tensor(float("nan"), dtype=torch.float64))  # padding: garbage
    return logp, old, rollout, adv, mask


def _reference_aggregate(values, mask, agg):
    """Global (here: whole batch) aggregation, written out per mode."""
    m = mask.double()
    if agg == "token-mean":
        return (values * m).sum() / m.sum()
    n_seqs = (m.sum(1) > 0).sum()
    if agg == "seq-mean-token-sum":
        return (values * m).sum() / n_seqs
    return ((values * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seqs


def _reference_ppo(logp, old, adv, eps_low, eps_high, c):
    ratio = torch.exp(logp - old)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    return torch.where(adv < 0, torch.minimum(clipped, -adv * c), clipped)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_tis_ppo_matches_float64_reference(agg):
    cap = 1.2
    logp, old, rollout, adv, mask = _batch(seed=1)
    cfg = LossConfig(name="ppo", agg=agg, tis_cap=cap)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(cfg, lp, old, adv, mask, rollout_logprobs=rollout)
    loss.backward()

    ref_lp = logp.clone().requires_grad_(True)
    is_ratio = torch.where(mask, torch.exp(old - torch.nan_to_num(rollout)), 1.0)
    w = is_ratio.clamp(max=cap)                                   # built from no-grad inputs: a constant
    surrogate = _reference_ppo(torch.where(mask, ref_lp, old), old, adv, cfg.clip_ratio_low, cfg.clip_ratio_high,
                               cfg.clip_ratio_c)
    ref = _reference_aggregate(w * surrogate, mask, agg)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lp.grad, ref_lp.grad, atol=1e-12, rtol=1e-12)

    n = mask.sum().double()
    truncated = (is_ratio > cap) & mask
    assert 0 < int(truncated.sum()) < int(mask.sum())        # the cap is active on some tokens, not all
    assert metrics["train/is_ratio_mean"].item() == pytest.approx((is_ratio * mask).sum().item() / n.item(), rel=1e-6)
    assert metrics["train/tis_weight_mean"].item() == pytest.approx((w * mask).sum().item() / n.item(), rel=1e-6)
    assert metrics["train/tis_clip_frac"].item() == pytest.approx(int(truncated.sum()) / n.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ppo", "clip_cov", "kl_cov"])
def test_tis_off_is_bit_identical(name):
    logp, old, rollout, adv, mask = _batch(seed=2)
    cfg = LossConfig(name=name, kl_cov_ratio=0.2, clip_cov_ratio=0.2, clip_cov_lb=0.0, tis_cap=0.0)
    sel = compute_token_selection(cfg, logp, old, adv, mask, seed=5)
    runs = []
    for kwargs in ({}, {"rollout_logprobs": rollout}):
        lp = logp.clone().requires_grad_(True)
        loss, metrics = policy_loss(cfg, lp, old, adv, mask, selection=sel, **kwargs)
        loss.backward()
        runs.append((loss.detach(), lp.grad, metrics))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2].keys() == runs[1][2].keys() and not set(TIS_KEYS) & runs[1][2].keys()


def test_tis_reweights_only_the_surrogate_not_kl_cov_penalty_or_entropy_bonus():
    """KL-Cov + entropy bonus: loss(on) - loss(off) == agg((w - 1) * (-A ratio)) exactly, and the same for the
    gradient; the penalty beta |log-ratio| on the chosen tokens and the bonus are unchanged."""
    cap = 1.5
    logp, old, rollout, adv, mask = _batch(seed=3)
    entropy_base = torch.rand(logp.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(name="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=0.7, entropy_coef=0.01)
    # One token selection for both runs (keys decide KL-Cov's ties, not the order tests run in).
    keys = torch.arange(logp.numel()).view(logp.shape)
    sel = compute_token_selection(LossConfig(**kw), logp, old, adv, mask, token_keys=keys, seed=0)
    out = {}
    for on in (False, True):
        lp = logp.clone().requires_grad_(True)
        ent = entropy_base.clone().requires_grad_(True)
        cfg = LossConfig(**kw, tis_cap=cap if on else 0.0)
        loss, metrics = policy_loss(cfg, lp, old, adv, mask, entropy=ent, rollout_logprobs=rollout, selection=sel)
        loss.backward()
        out[on] = (loss.detach(), lp.grad, ent.grad, metrics)
    assert out[False][3]["train/kl_cov_frac"].item() > 0.25      # the penalty is on ~30% of the tokens

    ref_lp = logp.clone().requires_grad_(True)
    w = torch.where(mask, torch.exp(old - torch.nan_to_num(rollout)), 1.0).clamp(max=cap)
    surrogate = -adv * torch.exp(torch.where(mask, ref_lp, old) - old)
    diff = _reference_aggregate((w - 1) * surrogate, mask, "token-mean")
    diff.backward()
    torch.testing.assert_close(out[True][0] - out[False][0], diff.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[True][1] - out[False][1], ref_lp.grad, atol=1e-12, rtol=0)
    assert torch.equal(out[True][2], out[False][2])               # entropy gradient untouched
    assert torch.equal(out[True][3]["train/entropy_bonus"], out[False][3]["train/entropy_bonus"])
    assert torch.equal(out[True][3]["train/kl_cov_frac"], out[False][3]["train/kl_cov_frac"])


def test_tis_micro_batch_slices_sum_to_full_batch():
    """The weight is per token: micro-batch losses, gradients and metric shares sum to the full-batch values."""
    logp, old, rollout, adv, mask = _batch(seed=6)
    cfg = LossConfig(name="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=0.0, tis_cap=1.3)
    keys = torch.arange(logp.numel()).view(logp.shape)
    sel = compute_token_selection(cfg, logp, old, adv, mask, token_keys=keys, seed=2)
    full_lp = logp.clone().requires_grad_(True)
    full, full_metrics = policy_loss(cfg, full_lp, old, adv, mask, selection=sel, rollout_logprobs=rollout)
    full.backward()
    lp = logp.clone().requires_grad_(True)
    total, sums = 0.0, {}
    for rows in (slice(0, 3), slice(3, 7), slice(7, 10)):
        loss, metrics = policy_loss(cfg, lp[rows], old[rows], adv[rows], mask[rows], selection=sel.rows(rows),
                                    rollout_logprobs=rollout[rows])
        loss.backward()
        total = total + loss.detach()
        for k in TIS_KEYS:
            sums[k] = sums.get(k, 0.0) + metrics[k].double()
    torch.testing.assert_close(total, full.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(lp.grad, full_lp.grad, atol=1e-12, rtol=0)
    for k in TIS_KEYS:
        assert sums[k].item() == pytest.approx(full_metrics[k].item(), rel=1e-6)


def test_tis_needs_rollout_logprobs_of_the_right_shape():
    logp, old, rollout, adv, mask = _batch(seed=7)
    cfg = LossConfig(tis_cap=2.0)
    with pytest.raises(ValueError, match=r"loss.tis_cap=2.0 > 0 needs the rollout engine's log-probs"):
        policy_loss(cfg, logp, old, adv, mask)
    with pytest.raises(ValueError, match=r"rollout_logprobs has shape \(10, 3\)"):
        policy_loss(cfg, logp, old, adv, mask, rollout_logprobs=rollout[:, :3])


@pytest.mark.parametrize("cap", [-0.5, math.nan, math.inf])
def test_bad_tis_cap_raises(cap):
    with pytest.raises(ValueError, match=r"loss.tis_cap=.* is invalid: must be a finite number >= 0"):
        LossConfig(tis_cap=cap)


def test_tis_adds_no_host_sync(monkeypatch):
    """The weight and its metrics stay on the device: reading a tensor on the host in the loss path raises."""
    logp, old, rollout, adv, mask = _batch(seed=8)
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=0.2, tis_cap=1.5)
    keys = torch.arange(logp.numel()).view(logp.shape)
    sel = compute_token_selection(cfg, logp, old, adv, mask, token_keys=keys)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the loss path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    lp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(cfg, lp[1:6], old[1:6], adv[1:6], mask[1:6], selection=sel.rows(slice(1, 6)),
                                rollout_logprobs=rollout[1:6])
    loss.backward()
    monkeypatch.undo()
    assert lp.grad.abs().sum() > 0 and set(TIS_KEYS) <= metrics.keys()
