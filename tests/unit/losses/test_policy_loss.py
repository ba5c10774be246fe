"""losses/policy.py: hand-computed cases for every loss and aggregation, Clip-Cov/KL-Cov semantics, errors.

Expected numbers are written out as arithmetic from the formulas in the module docstring (arXiv 2505.22617),
not computed with the code under test.
"""

import logging
import math

import pytest
import torch

from megatron_entcov.config import LossConfig, ScheduleConfig, config_from_dict
from megatron_entcov.losses.policy import (
    _warn_kl_cov_inert_once,
    compute_token_selection,
    policy_loss,
    warn_if_kl_cov_inert,
)

OLD = -1.0  # old log-prob of every token; logp = OLD + log(ratio)


def _ppo_batch():
    """Two rows; row 0: t0..t2, row 1: t3, t4 + one padding token.

    t0: A=+1, ratio 1.5 -> clip-high active   t1: A=+1, ratio 0.5 -> unclipped
    t2: A=-2, ratio 0.5 -> clip-low active    t3: A=-1, ratio 4.0 -> dual clip active (c=3)
    t4: A=-1, ratio 1.1 -> unclipped          pad: logp = -inf (must not leak)
    """
    ratios = torch.tensor([[1.5, 0.5, 0.5], [4.0, 1.1, 1.0]])
    logp = (OLD + torch.log(ratios))
    logp[1, 2] = -float("inf")
    logp.requires_grad_(True)
    old = torch.full((2, 3), OLD)
    adv = torch.tensor([[1.0, 1.0, -2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


def _ppo_cfg(**kw):
    return LossConfig(name="ppo", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, **kw)


# Per-token PPO losses of _ppo_batch, by hand:
#   t0: max(-1*1.5, -1*1.28) = -1.28
#   t1: max(-1*0.5, -1*0.8)  = -0.5
#   t2: max(2*0.5, 2*0.8)    = 1.6;  dual: min(1.6, 2*3) = 1.6
#   t3: max(1*4.0, 1*1.28)   = 4.0;  dual: min(4.0, 1*3) = 3.0
#   t4: max(1.1, 1.1)        = 1.1
ROW0 = -1.28 - 0.5 + 1.6   # = -0.18
ROW1 = 3.0 + 1.1           # = 4.1


@pytest.mark.parametrize("agg, expected", [
    ("token-mean", (ROW0 + ROW1) / 5),                    # 3.92 / 5 = 0.784
    ("seq-mean-token-sum", (ROW0 + ROW1) / 2),            # 1.96
    ("seq-mean-token-mean", (ROW0 / 3 + ROW1 / 2) / 2),   # (-0.06 + 2.05) / 2 = 0.995
])
def test_ppo_clip_higher_dual_clip_by_hand(agg, expected):
    logp, old, adv, mask = _ppo_batch()
    loss, metrics = policy_loss(_ppo_cfg(agg=agg), logp, old, adv, mask)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dlogp of -A*ratio is -A*ratio; clipped (t0, t2) and dual-capped (t3) tokens have zero gradient.
    if agg == "token-mean":
        expected_grad = [[0.0, -0.5 / 5, 0.0], [0.0, 1.1 / 5, 0.0]]
    elif agg == "seq-mean-token-sum":
        expected_grad = [[0.0, -0.5 / 2, 0.0], [0.0, 1.1 / 2, 0.0]]
    else:
        expected_grad = [[0.0, -0.5 / 3 / 2, 0.0], [0.0, 1.1 / 2 / 2, 0.0]]
    torch.testing.assert_close(logp.grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)
    assert metrics["train/clip_frac_low"].item() == pytest.approx(1 / 5)
    assert metrics["train/clip_frac_high"].item() == pytest.approx(1 / 5)
    assert metrics["train/clip_frac_dual"].item() == pytest.approx(1 / 5)
    # ppo_kl = mean(old - logp) = -mean(log ratio) = -log(1.5 * 0.5 * 0.5 * 4.0 * 1.1) / 5
    assert metrics["train/ppo_kl"].item() == pytest.approx(-math.log(1.65) / 5, abs=1e-6)
    assert metrics["train/clip_cov_frac"].item() == 0 and metrics["train/kl_cov_frac"].item() == 0
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("agg, bonus", [
    ("token-mean", (0.5 + 1.0 + 1.5 + 2.0 + 1.0) / 5),              # 1.2
    ("seq-mean-token-sum", ((0.5 + 1.0 + 1.5) + (2.0 + 1.0)) / 2),  # 3.0
    ("seq-mean-token-mean", (3.0 / 3 + 3.0 / 2) / 2),                # 1.25
])
def test_entropy_bonus_by_hand(agg, bonus):
    logp, old, adv, mask = _ppo_batch()
    entropy = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 99.0]], requires_grad=True)
    cfg = _ppo_cfg(agg=agg, entropy_coef=0.1)
    loss, metrics = policy_loss(cfg, logp, old, adv, mask, entropy=entropy)
    ppo_only, _ = policy_loss(_ppo_cfg(agg=agg), logp, old, adv, mask)
    assert loss.item() == pytest.approx(ppo_only.item() - 0.1 * bonus, abs=1e-6)
    assert "entropy/mean" not in metrics      # the trainer logs the step's entropy once (from the old forward)
    assert metrics["train/entropy_bonus"].item() == pytest.approx(0.1 * bonus)
    assert metrics["coef/entropy_coef"].item() == pytest.approx(0.1)
    loss.backward()
    if agg == "token-mean":
        assert entropy.grad[0, 0].item() == pytest.approx(-0.1 / 5)
    assert entropy.grad[1, 2].item() == 0.0  # padding


def test_entropy_bonus_needs_entropy():
    logp, old, adv, mask = _ppo_batch()
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(_ppo_cfg(entropy_coef=0.01), logp, old, adv, mask)


def _cov_batch():
    """One row of 4 tokens with hand-computable covariance.

    logp = [-0.5, -2.5, -0.5, -2.5] (mean -1.5);  A = [2, 2, -2, -2] (mean 0)
    cov  = [(1)(2), (-1)(2), (1)(-2), (-1)(-2)] = [2, -2, -2, 2]
    """
    logp = torch.tensor([[-0.5, -2.5, -0.5, -2.5]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0, -2.0, -2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    return logp, adv, mask


def test_clip_cov_by_hand():
    logp, adv, mask = _cov_batch()
    # Token 3 is PPO-clipped: A = -2 and ratio = 0.5 < 1 - 0.2 (old = logp + log 2). Candidates with
    # 1 < cov < 5 and not clipped: token 0 only. n = max(int(0.25 * 4), 1) = 1 -> token 0 chosen.
    old = logp.detach() + torch.tensor([[0.0, 0.0, 0.0, math.log(2.0)]])
    cfg = LossConfig(name="clip_cov", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.25,
                     clip_cov_lb=1.0, clip_cov_ub=5.0)
    sel = compute_token_selection(cfg, logp, old, adv, mask)
    assert sel.covariance.tolist() == [[2.0, -2.0, -2.0, 2.0]]
    assert sel.clip_cov_mask.tolist() == [[True, False, False, False]]
    loss, metrics = policy_loss(cfg, logp, old, adv, mask)
    # Losses: t0 -2 (detached, still counted), t1 -2, t2 +2, t3 max(2*0.5, 2*0.8) = 1.6 -> (-0.4) / 4
    assert loss.item() == pytest.approx((-2 - 2 + 2 + 1.6) / 4)
    loss.backward()
    # Gradients -A*ratio/4: t0 chosen -> exactly 0; t1 -2/4; t2 +2/4; t3 clipped -> 0.
    assert logp.grad.tolist() == [[0.0, -0.5, 0.5, 0.0]]
    assert metrics["train/clip_cov_frac"].item() == pytest.approx(1 / 4)
    assert metrics["train/clip_frac_low"].item() == pytest.approx(1 / 4)
    assert metrics["cov/mean"].item() == pytest.approx(0.0)
    assert metrics["coef/clip_cov_ratio"].item() == pytest.approx(0.25)


def test_kl_cov_by_hand():
    logp = torch.tensor([[-0.5, -2.5, -0.5, -2.5]], requires_grad=True)
    # A = [2, 2, -2, -1], mean 0.25; logp mean -1.5:
    # cov = [(1)(1.75), (-1)(1.75), (1)(-2.25), (-1)(-1.25)] = [1.75, -1.75, -2.25, 1.25]
    adv = torch.tensor([[2.0, 2.0, -2.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    lr = [0.1, -0.2, 0.3, -0.4]                          # log ratio = logp - old
    old = logp.detach() - torch.tensor([lr])
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=0.5, kl_cov_coef=2.0)  # k = max(int(0.5*4), 1) = 2
    sel = compute_token_selection(cfg, logp, old, adv, mask)
    assert sel.kl_cov_mask.tolist() == [[True, False, False, True]]   # the two largest: 1.75, 1.25
    loss, metrics = policy_loss(cfg, logp, old, adv, mask)
    # No clipping (ratio e^0.3 = 1.35 would be clipped by PPO); penalty 2*|log ratio| on tokens 0 and 3.
    expected = (-2 * math.exp(0.1) + 2 * 0.1 - 2 * math.exp(-0.2) + 2 * math.exp(0.3)
                + 1 * math.exp(-0.4) + 2 * 0.4) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dlogp: -A*ratio + beta*sign(log ratio) on chosen tokens, / 4
    expected_grad = [(-2 * math.exp(0.1) + 2) / 4, -2 * math.exp(-0.2) / 4, 2 * math.exp(0.3) / 4,
                     (math.exp(-0.4) - 2) / 4]
    torch.testing.assert_close(logp.grad, torch.tensor([expected_grad]), atol=1e-6, rtol=0)
    assert metrics["train/kl_cov_frac"].item() == pytest.approx(0.5)
    assert metrics["train/clip_frac_high"].item() == 0.0


def _random_batch(seed=0, rows=12, cols=24):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, cols, generator=g) * 3
    old = logp + torch.randn(rows, cols, generator=g) * 0.3
    adv = torch.randn(rows, 1, generator=g).expand(rows, cols).clone()
    lengths = torch.randint(cols // 3, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols) < lengths.unsqueeze(1)
    return logp, old, adv, mask


def test_clip_cov_chosen_tokens_have_exactly_zero_gradient():
    logp, old, adv, mask = _random_batch()
    cfg = LossConfig(name="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.1, clip_cov_ub=5.0)
    sel = compute_token_selection(cfg, logp, old, adv, mask, seed=3)
    chosen = sel.clip_cov_mask
    assert int(chosen.sum()) == max(int(0.1 * int(mask.sum())), 1) > 3
    lp = logp.clone().requires_grad_(True)
    policy_loss(cfg, lp, old, adv, mask, selection=sel)[0].backward()
    lp_ppo = logp.clone().requires_grad_(True)
    policy_loss(LossConfig(name="ppo", **{k: getattr(cfg, k) for k in ("clip_ratio_low", "clip_ratio_high")}),
                lp_ppo, old, adv, mask)[0].backward()
    assert (lp.grad[chosen] == 0).all()
    assert (lp_ppo.grad[chosen] != 0).all()          # they were not clipped by PPO
    assert torch.equal(lp.grad[~chosen], lp_ppo.grad[~chosen])
    # Chosen tokens are candidates: valid, lb < cov < ub.
    cov = sel.covariance[chosen]
    assert mask[chosen].all() and (cov > 0.1).all() and (cov < 5.0).all()


def test_kl_cov_equals_unclipped_plus_penalty_on_top_k():
    logp, old, adv, mask = _random_batch(seed=1)
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7)
    loss, _ = policy_loss(cfg, logp, old, adv, mask)
    sel = compute_token_selection(cfg, logp, old, adv, mask)
    n_valid = int(mask.sum())
    k = max(int(0.1 * n_valid), 1)
    masked_cov = torch.where(mask, sel.covariance, -torch.inf).flatten()
    top = torch.zeros(mask.numel(), dtype=torch.bool)
    top[torch.topk(masked_cov, k).indices] = True
    assert torch.equal(sel.kl_cov_mask.flatten(), top)
    per_token = -adv * torch.exp(logp - old) + 0.7 * (logp - old).abs() * sel.kl_cov_mask
    assert loss.item() == pytest.approx((per_token * mask).sum().item() / n_valid, rel=1e-6)


def test_annealed_to_zero_chooses_nothing_and_equals_ppo():
    logp, old, adv, mask = _random_batch(seed=2)
    sched = ScheduleConfig(kind="linear", end=0.0, steps=10)
    cfg = LossConfig(name="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=5.0,
                     clip_cov_ratio_schedule=sched)
    ppo = LossConfig(name="ppo")
    assert compute_token_selection(cfg, logp, old, adv, mask, step=5).clip_cov_mask.any()
    sel = compute_token_selection(cfg, logp, old, adv, mask, step=10)
    assert not sel.clip_cov_mask.any()
    assert policy_loss(cfg, logp, old, adv, mask, step=10)[0] == policy_loss(ppo, logp, old, adv, mask)[0]
    kl = LossConfig(name="kl_cov", kl_cov_ratio=0.2, kl_cov_ratio_schedule=sched)
    assert not compute_token_selection(kl, logp, old, adv, mask, step=12).kl_cov_mask.any()


def test_released_floor_chooses_one_token():
    logp, old, adv, mask = _random_batch(seed=3)
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=2e-3)   # int(2e-3 * ~200) = 0 -> floor of 1
    assert int(compute_token_selection(cfg, logp, old, adv, mask).kl_cov_mask.sum()) == 1


def test_micro_batch_slices_sum_to_full_batch():
    logp, old, adv, mask = _random_batch(seed=4, rows=8)
    entropy = torch.rand(8, 24)
    for name in ("ppo", "clip_cov", "kl_cov"):
        for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            cfg = LossConfig(name=name, agg=agg, clip_cov_ratio=0.2, clip_cov_lb=0.0, kl_cov_ratio=0.2,
                             entropy_coef=0.01)
            sel = compute_token_selection(cfg, logp, old, adv, mask, step=1, seed=9)
            full, full_metrics = policy_loss(cfg, logp, old, adv, mask, entropy=entropy, step=1, selection=sel)
            total, metrics = 0.0, {}
            for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
                part, m = policy_loss(cfg, logp[rows], old[rows], adv[rows], mask[rows], entropy=entropy[rows],
                                      step=1, selection=sel.rows(rows))
                total += part
                for key, v in m.items():
                    metrics[key] = metrics.get(key, 0.0) + v
            assert total.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-7)
            assert metrics.keys() == full_metrics.keys()
            for key in metrics:
                assert metrics[key].item() == pytest.approx(full_metrics[key].item(), rel=1e-5, abs=1e-7), key


def test_selection_invariant_to_row_permutation():
    logp, old, adv, mask = _random_batch(seed=5)
    keys = torch.arange(logp.numel()).view(logp.shape) * 11
    perm = torch.randperm(logp.shape[0])
    for cfg in (LossConfig(name="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.0),
                LossConfig(name="kl_cov", kl_cov_ratio=0.1)):
        a = compute_token_selection(cfg, logp, old, adv, mask, token_keys=keys, seed=1, step=4)
        b = compute_token_selection(cfg, logp[perm], old[perm], adv[perm], mask[perm], token_keys=keys[perm],
                                    seed=1, step=4)
        assert torch.equal(a.clip_cov_mask[perm], b.clip_cov_mask)
        assert torch.equal(a.kl_cov_mask[perm], b.kl_cov_mask)
        assert torch.equal(a.cov_quantiles, b.cov_quantiles)


def test_the_seed_drives_the_choice_without_consuming_random_numbers():
    """The Clip-Cov choice is a function of (seed, step, token keys): torch's random state neither changes it nor
    is advanced by it, and the gradient given the selection follows the seed (the chosen tokens' terms are
    detached: the loss value is the same whichever tokens are chosen)."""
    logp, old, adv, mask = _random_batch(seed=6)
    cfg = LossConfig(name="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.0)
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    sel = compute_token_selection(cfg, logp, old, adv, mask, seed=42)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(2)
    again = compute_token_selection(cfg, logp, old, adv, mask, seed=42)
    other = compute_token_selection(cfg, logp, old, adv, mask, seed=43)
    assert torch.equal(sel.clip_cov_mask, again.clip_cov_mask)
    assert int(sel.clip_cov_mask.sum()) == int(other.clip_cov_mask.sum()) == max(int(0.1 * int(mask.sum())), 1)
    assert not torch.equal(sel.clip_cov_mask, other.clip_cov_mask)
    grads = []
    for selection in (sel, again, other):
        lp = logp.clone().requires_grad_(True)
        policy_loss(cfg, lp, old, adv, mask, selection=selection)[0].backward()
        grads.append(lp.grad)
    assert torch.equal(grads[0], grads[1])
    assert (grads[0][sel.clip_cov_mask] == 0).all() and (grads[2][other.clip_cov_mask] == 0).all()
    assert not torch.equal(grads[0], grads[2])


def test_selection_slice_and_step_are_checked():
    logp, old, adv, mask = _random_batch(seed=7)
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=0.1)
    sel = compute_token_selection(cfg, logp, old, adv, mask, step=3)
    with pytest.raises(ValueError, match="rows"):
        policy_loss(cfg, logp[:2], old[:2], adv[:2], mask[:2], step=3, selection=sel)
    with pytest.raises(ValueError, match="step"):
        policy_loss(cfg, logp, old, adv, mask, step=4, selection=sel)


@pytest.mark.parametrize("loss, match", [
    ({"clip_cov_ratio": 0.0}, "loss.clip_cov_ratio"),
    ({"clip_cov_ratio": 1.5}, "loss.clip_cov_ratio"),
    ({"kl_cov_ratio": -0.1}, "loss.kl_cov_ratio"),
    ({"kl_cov_ratio": 2.0}, "loss.kl_cov_ratio"),
    ({"clip_cov_lb": 5.0, "clip_cov_ub": 5.0}, "loss.clip_cov_lb"),
    ({"clip_cov_lb": 6.0, "clip_cov_ub": 1.0}, "loss.clip_cov_lb"),
    ({"name": "grpo"}, "loss.name"),
    ({"agg": "mean"}, "loss.agg"),
])
def test_bad_config_values_raise(loss, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({"loss": loss})
    with pytest.raises(ValueError, match=match):
        LossConfig(**loss)


def test_shape_mismatch_and_missing_keys_raise():
    logp, old, adv, mask = _random_batch(seed=8)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(LossConfig(), logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="token_keys"):
        compute_token_selection(LossConfig(name="kl_cov"), logp, old, adv, mask, group=object())


def test_warn_if_kl_cov_inert_warns_once(caplog):
    cfg = LossConfig(name="kl_cov")
    _warn_kl_cov_inert_once.cache_clear()  # other tests may have warned already in this process
    with caplog.at_level(logging.WARNING, logger="megatron_entcov.losses.policy"):
        assert warn_if_kl_cov_inert(cfg, 1)
        assert warn_if_kl_cov_inert(cfg, 1)
        assert not warn_if_kl_cov_inert(cfg, 8)
        assert not warn_if_kl_cov_inert(LossConfig(name="ppo"), 1)
    assert sum("inert" in r.message for r in caplog.records) == 1


def test_no_host_sync_in_selection_and_loss(monkeypatch):
    """Reading a tensor value on the host (.item(), bool(), int(), float(), .tolist(), .cpu(), .numpy()) would
    be a device synchronisation on GPU; the whole selection + loss path must not do it."""
    logp, old, adv, mask = _random_batch(seed=9)
    entropy = torch.rand_like(logp)
    keys = torch.arange(logp.numel()).view(logp.shape)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the loss path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for loss_name in ("ppo", "clip_cov", "kl_cov"):
        for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            cfg = LossConfig(name=loss_name, agg=agg, clip_cov_ratio=0.1, clip_cov_lb=0.0, kl_cov_ratio=0.1,
                             entropy_coef=0.01)
            sel = compute_token_selection(cfg, logp, old, adv, mask, token_keys=keys, step=2, seed=1)
            lp = logp.clone().requires_grad_(True)
            loss, _ = policy_loss(cfg, lp[2:7], old[2:7], adv[2:7], mask[2:7], entropy=entropy[2:7], step=2,
                                  selection=sel.rows(slice(2, 7)))
            loss.backward()
    monkeypatch.undo()
    assert lp.grad.abs().sum() > 0


@pytest.mark.parametrize("name, dual", [("ppo", False), ("clip_cov", False), ("clip_cov", True)])
def test_dual_clip_is_ppo_only_unless_clip_cov_opts_in(name, dual):
    """t3 (A=-1, ratio 4 > c=3): PPO caps its loss at 3 (no gradient); Clip-Cov as released does not (loss 4,
    gradient d(-A ratio)/dlogp = 4); loss.clip_cov_dual_clip=true caps it as PPO does."""
    logp, old, adv, mask = _ppo_batch()
    cfg = LossConfig(name=name, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                     clip_cov_dual_clip=dual, clip_cov_ratio=1e-6, clip_cov_lb=100.0, clip_cov_ub=200.0)
    loss, metrics = policy_loss(cfg, logp, old, adv, mask)
    loss.backward()
    capped = name == "ppo" or dual
    t3 = 3.0 if capped else 4.0
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.6 + t3 + 1.1) / 5, abs=1e-6)
    assert logp.grad[1, 0].item() == pytest.approx(0.0 if capped else 4.0 / 5, abs=1e-6)
    assert metrics["train/clip_frac_dual"].item() == pytest.approx(1 / 5 if capped else 0.0)
    assert metrics["train/clip_cov_frac"].item() == 0.0     # bounds (100, 200): no candidate
