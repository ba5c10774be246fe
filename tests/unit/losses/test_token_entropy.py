"""The token-entropy family (losses/token_entropy.py, losses/adaptive_entropy.py) against numpy float64 references.

Each reference is written here from the paper's equation (cited per test), not from the code under test: the
loss value, the tokens each method selects and d loss / d log pi per token, on hand-made batches with ties at
the threshold and empty selections. Tolerances: 1e-12 (float64 throughout; the thresholds compare float32
entropies, which the batches hold exactly).
"""

import json

import numpy as np
import pytest
import torch

from megatron_entcov.config import LossConfig, ScheduleConfig
from megatron_entcov.losses.adaptive_entropy import AdaptiveEntropyCoef
from megatron_entcov.losses.policy import compute_token_selection, policy_loss
from megatron_entcov.ops.covariance import global_quantiles

OLD = -1.0
TOL = dict(rtol=1e-12, atol=1e-12)


def _batch():
    """3 rows x 5 tokens, last row 2 padding tokens. Entropies hold ties at the 0.8 quantile and a tied row."""
    ratios = np.array([[1.5, 0.5, 0.7, 1.0, 1.2],
                       [4.0, 1.1, 0.9, 0.6, 1.4],
                       [1.0, 1.3, 0.75, 1.0, 1.0]])
    adv = np.array([[1.0, 1.0, -2.0, 0.5, 1.0],
                    [-1.0, -1.0, 1.0, -0.5, 2.0],
                    [0.0, -1.0, 1.5, 0.0, 0.0]])
    ent = np.array([[0.5, 2.0, 3.0, 0.25, 1.0],       # four tokens tie at the batch's 0.8-quantile (2.0)
                    [2.0, 0.125, 0.75, 2.0, 2.5],
                    [1.0, 1.0, 1.0, 3.0, 3.0]])       # row 2's valid tokens are all 1.0: no Archer high token
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=bool)
    return ratios, adv, ent, mask


def _tensors(ratios, adv, ent, mask):
    logp = torch.tensor(OLD + np.log(ratios), dtype=torch.float64, requires_grad=True)
    old = torch.full(ratios.shape, OLD, dtype=torch.float64)
    entropy = torch.tensor(ent, dtype=torch.float64, requires_grad=True)
    return logp, old, torch.tensor(adv, dtype=torch.float64), torch.tensor(mask), entropy


def _ppo_ref(r, a, eps_lo, eps_hi, c, dual=True):
    """Per-token PPO value and d value / d log pi (DAPO clip-higher + dual clip), numpy float64."""
    pg1, pg2 = -a * r, -a * np.clip(r, 1 - eps_lo, 1 + eps_hi)
    value = np.maximum(pg1, pg2)
    grad = np.where(pg2 > pg1, 0.0, -a * r)
    if dual:
        cap = -a * c
        dual_on = (a < 0) & (cap < value)
        value = np.where(dual_on, cap, value)
        grad = np.where(dual_on, 0.0, grad)
    return value, grad


def _loss_and_grad(cfg, ratios, adv, ent, mask, **kw):
    logp, old, a, m, entropy = _tensors(ratios, adv, ent, mask)
    loss, metrics = policy_loss(cfg, logp, old, a, m, entropy=entropy, **kw)
    loss.backward()
    return loss.item(), logp.grad.numpy(), entropy.grad, metrics


def test_high_entropy_tokens_keep_the_top_share_with_ties_as_the_paper():
    """arXiv 2506.01939: J = 1/sum|o| sum_t I[H_t >= tau_rho^B] min(r A, clip(r) A), tau the (1-rho)-quantile."""
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name="high_entropy_tokens", high_entropy_ratio=0.2, clip_ratio_c=3.0)
    tau = np.quantile(ent[mask], 0.8)                      # numpy's linear rule, as torch.quantile
    chosen = mask & (ent >= tau)
    assert tau == 2.0 and chosen.sum() == 5                # 4 tokens tie at 2.0: all kept (5 > 20% of 13)
    value, grad = _ppo_ref(ratios, adv, 0.2, 0.28, 3.0)
    n = mask.sum()
    loss, g, _, metrics = _loss_and_grad(cfg, ratios, adv, ent, mask)
    assert loss == pytest.approx((value * chosen).sum() / n, rel=1e-12)
    np.testing.assert_allclose(g, grad * chosen / n, **TOL)
    assert metrics["train/high_entropy_frac"].item() == pytest.approx(5 / 13, rel=1e-6)
    assert metrics["entropy/threshold"].item() == pytest.approx(2.0)


def test_high_entropy_threshold_without_ties_keeps_exactly_the_share():
    rng = np.random.default_rng(0)
    ent = rng.permutation(np.arange(1, 21)).reshape(4, 5) / 8.0          # distinct, exact in float32
    mask = np.ones((4, 5), dtype=bool)
    sel = compute_token_selection(LossConfig(name="high_entropy_tokens"), torch.zeros(4, 5), torch.zeros(4, 5),
                                  torch.zeros(4, 5), torch.tensor(mask), entropy=torch.tensor(ent))
    assert sel.high_entropy_mask.numpy().tolist() == (ent >= np.quantile(ent, 0.8)).tolist()
    assert int(sel.high_entropy_mask.sum()) == 4                          # 20% of 20


def test_high_entropy_tokens_with_no_valid_token_is_zero_and_finite():
    ratios, adv, ent, _ = _batch()
    mask = np.zeros_like(ratios, dtype=bool)
    loss, g, _, metrics = _loss_and_grad(LossConfig(name="high_entropy_tokens"), ratios, adv, ent, mask)
    assert loss == 0.0 and np.all(g == 0) and all(torch.isfinite(v) for v in metrics.values())


def test_entropy_advantage_shaping_adds_the_clipped_detached_term():
    """arXiv 2506.14758: A^shaped_t = A_t + min(alpha H_t^detach, |A_t| / kappa), alpha 0.4, kappa 2."""
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name="ppo", clip_ratio_c=3.0, entropy_advantage_coef=0.4, entropy_advantage_kappa=2.0)
    shaped = adv + np.minimum(0.4 * ent, np.abs(adv) / 2.0)
    value, grad = _ppo_ref(ratios, shaped, 0.2, 0.28, 3.0)
    n = mask.sum()
    loss, g, entropy_grad, metrics = _loss_and_grad(cfg, ratios, adv, ent, mask)
    assert loss == pytest.approx((value * mask).sum() / n, rel=1e-12)
    np.testing.assert_allclose(g, grad * mask / n, **TOL)
    assert entropy_grad is None or torch.all(entropy_grad == 0)          # detached: no gradient into H
    assert metrics["train/adv_shaping_mean"].item() == pytest.approx(((shaped - adv) * mask).sum() / n, rel=1e-6)
    bound = (np.minimum(0.4 * ent, np.abs(adv) / 2.0) >= np.abs(adv) / 2.0) & mask
    assert metrics["train/adv_shaping_bound_frac"].item() == pytest.approx(bound.sum() / n, rel=1e-6)


def test_entropy_advantage_shaping_composes_with_clip_cov_and_anneals_to_off():
    ratios, adv, ent, mask = _batch()
    sched = ScheduleConfig(kind="linear", end=0.0, steps=2)
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=0.2, entropy_advantage_coef=0.4,
                     entropy_advantage_coef_schedule=sched)
    base = LossConfig(name="kl_cov", kl_cov_ratio=0.2)
    annealed, g_annealed, _, metrics = _loss_and_grad(cfg, ratios, adv, ent, mask, step=2)
    plain, g_plain, _, _ = _loss_and_grad(base, ratios, adv, ent, mask, step=2)
    assert annealed == plain and np.array_equal(g_annealed, g_plain)
    assert metrics["coef/entropy_advantage_coef"].item() == 0.0
    half, _, _, _ = _loss_and_grad(cfg, ratios, adv, ent, mask, step=1)
    shaped = adv + np.minimum(0.2 * ent, np.abs(adv) / 2.0)        # alpha = 0.2 halfway
    n = mask.sum()
    # KL-Cov's surrogate is -A r everywhere (its penalty is 0 on this on-policy... not: ratios differ; compare pg)
    sel_mask = compute_token_selection(base, torch.tensor(OLD + np.log(ratios)), torch.full(ratios.shape, OLD),
                                       torch.tensor(adv), torch.tensor(mask), step=1).kl_cov_mask.numpy()
    penalty = np.where(sel_mask, np.abs(np.log(ratios)), 0.0)
    assert half == pytest.approx(((-shaped * ratios + penalty) * mask).sum() / n, rel=1e-12)


def _archer_ref(ratios, adv, ent, mask, q=0.8, eps_low=0.2, eps_high=0.5, kl=0.001, kl_high=0.0, c=3.0):
    """arXiv 2507.15778 (released settings): per-response entropy q-quantile, H > q -> high-entropy token."""
    high = np.zeros_like(mask)
    for i in range(len(mask)):
        if mask[i].any():
            high[i] = mask[i] & (ent[i] > np.quantile(ent[i][mask[i]], q))
    eps = np.where(high, eps_high, eps_low)
    value, grad = _ppo_ref(ratios, adv, eps, eps, c)
    d = np.log(ratios)
    w = np.where(high, kl * kl_high, kl)
    value = value + w * (np.exp(-d) + d - 1)
    grad = grad + w * (1 - np.exp(-d))
    return high, value, grad


@pytest.mark.parametrize("kl_high", [0.0, 0.5])
def test_archer_dual_token_clip_and_kl_by_response_quantile(kl_high):
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name="archer", clip_ratio_c=3.0, archer_kl_coef=0.01, archer_high_kl_scale=kl_high)
    high, value, grad = _archer_ref(ratios, adv, ent, mask, kl=0.01, kl_high=kl_high)
    assert high[0].sum() == high[1].sum() == 1 and not high[2].any()    # a tied row has no high token
    sel = compute_token_selection(cfg, torch.tensor(OLD + np.log(ratios)), torch.full(ratios.shape, OLD),
                                  torch.tensor(adv), torch.tensor(mask), entropy=torch.tensor(ent))
    assert sel.archer_high_mask.numpy().tolist() == high.tolist()
    n = mask.sum()
    loss, g, _, metrics = _loss_and_grad(cfg, ratios, adv, ent, mask)
    assert loss == pytest.approx((value * mask).sum() / n, rel=1e-12)
    np.testing.assert_allclose(g, grad * mask / n, **TOL)
    assert metrics["train/archer_high_frac"].item() == pytest.approx(high.sum() / n, rel=1e-6)


def test_archer_global_scope_uses_the_batch_quantile():
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name="archer", archer_quantile_scope="global")
    sel = compute_token_selection(cfg, torch.tensor(OLD + np.log(ratios)), torch.full(ratios.shape, OLD),
                                  torch.tensor(adv), torch.tensor(mask), entropy=torch.tensor(ent))
    expected = mask & (ent > np.quantile(ent[mask], 0.8))
    assert expected.sum() == 2                    # the 0.8-quantile 2.0 is tied: strict '>' keeps 2.5 and 3.0
    assert sel.archer_high_mask.numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("beta1, beta2", [(0.75, 1.0), (0.5, 1.0), (0.0, 0.0)])
def test_ce_gppo_keeps_bounded_gradients_of_clipped_tokens(beta1, beta2):
    """arXiv 2509.20712: value as PPO; d/d log pi = -beta1 (1-eps_l) A (A<0, r<1-eps_l), -beta2 (1+eps_h) A
    (A>0, r>1+eps_h), -A r inside; the dual clip (A<0, -A r > -A c) has none."""
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name="ce_gppo", clip_ratio_c=3.0, ce_gppo_beta1=beta1, ce_gppo_beta2=beta2)
    low = (adv < 0) & (ratios < 0.8)
    high = (adv > 0) & (ratios > 1.28)
    assert low.any() and high.any()
    value = np.where(low, -(1 - 0.2) * adv, np.where(high, -(1 + 0.28) * adv, -adv * ratios))
    value_b = np.where(low, beta1 * value, np.where(high, beta2 * value, value))
    grad = np.where(low, -beta1 * 0.8 * adv, np.where(high, -beta2 * 1.28 * adv, -adv * ratios))
    dual = (adv < 0) & (value_b > -adv * 3.0)
    value_b = np.where(dual, -adv * 3.0, value_b)
    grad = np.where(dual, 0.0, grad)
    assert dual.any()
    n = mask.sum()
    loss, g, _, metrics = _loss_and_grad(cfg, ratios, adv, ent, mask)
    assert loss == pytest.approx((value_b * mask).sum() / n, rel=1e-12)
    np.testing.assert_allclose(g, grad * mask / n, **TOL)
    assert metrics["train/clip_frac_low"].item() == pytest.approx((low & mask).sum() / n, rel=1e-6)
    assert metrics["train/clip_frac_high"].item() == pytest.approx((high & mask).sum() / n, rel=1e-6)


def test_ce_gppo_value_equals_ppo_when_betas_are_one():
    ratios, adv, ent, mask = _batch()
    ce, _, _, _ = _loss_and_grad(LossConfig(name="ce_gppo", clip_ratio_c=3.0, ce_gppo_beta1=1.0), ratios, adv, ent,
                                 mask)
    ppo, _, _, _ = _loss_and_grad(LossConfig(name="ppo", clip_ratio_c=3.0), ratios, adv, ent, mask)
    assert ce == pytest.approx(ppo, rel=1e-12)


@pytest.mark.parametrize("name", ["high_entropy_tokens", "archer", "ce_gppo", "ppo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_micro_batches_sum_to_the_full_batch(name, agg):
    """With one selection over the mini-batch, the per-row-slice losses and gradients add up (every agg)."""
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name=name, agg=agg, entropy_advantage_coef=0.4, target_entropy=1.5)
    full, g_full, _, _ = _loss_and_grad(cfg, ratios, adv, ent, mask)
    logp, old, a, m, entropy = _tensors(ratios, adv, ent, mask)
    sel = compute_token_selection(cfg, logp.detach(), old, a, m, entropy=entropy.detach())
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
        loss, _ = policy_loss(cfg, logp[rows], old[rows], a[rows], m[rows], entropy=entropy[rows],
                              selection=sel.rows(rows))
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full, rel=1e-12)
    np.testing.assert_allclose(logp.grad.numpy(), g_full, **TOL)


# ---------------------------------------------------------------- adaptive entropy coefficient (Skywork-OR1)
def _skywork_ref(entropies, target, delta, c0):
    """arXiv 2505.22312: alpha_k = c_k I[e_k <= tgt]; c_{k+1} = c_k +- Delta toward the target, >= 0."""
    c, alphas, coefs = c0, [], []
    for e in entropies:
        alphas.append(c if e <= target else 0.0)
        c = c + delta if e < target else (max(0.0, c - delta) if e > target else c)
        coefs.append(c)
    return alphas, coefs


def test_adaptive_entropy_coefficient_follows_the_rule_and_gates_the_bonus():
    ratios, adv, ent, mask = _batch()
    cfg = LossConfig(name="ppo", clip_ratio_c=3.0, target_entropy=1.5, target_entropy_delta=0.25,
                     target_entropy_coef_init=0.5)
    mean_h = (ent * mask).sum() / mask.sum()
    assert mean_h <= 1.5
    value, grad = _ppo_ref(ratios, adv, 0.2, 0.28, 3.0)
    n = mask.sum()
    loss, g, entropy_grad, metrics = _loss_and_grad(cfg, ratios, adv, ent, mask)
    assert loss == pytest.approx(((value - 0.5 * ent) * mask).sum() / n, rel=1e-12)   # alpha_0 = c_0 = 0.5
    np.testing.assert_allclose(entropy_grad.numpy(), -0.5 * mask / n, **TOL)
    assert metrics["coef/adaptive_entropy_coef"].item() == pytest.approx(0.5)
    above = LossConfig(name="ppo", clip_ratio_c=3.0, target_entropy=0.5, target_entropy_coef_init=0.5)
    loss, _, entropy_grad, _ = _loss_and_grad(above, ratios, adv, ent, mask)              # e_k > target: off
    assert loss == pytest.approx((value * mask).sum() / n, rel=1e-12) and torch.all(entropy_grad == 0)

    entropies = [0.3, 0.1, 0.25, 0.2, 0.05, 0.4, 0.5, 0.6, 0.1, 0.19]
    control = AdaptiveEntropyCoef(0.2, 0.005, 0.0)
    coefs = []
    for e in entropies:
        control.update(torch.tensor(e, dtype=torch.float64))
        coefs.append(control.coef)
    assert coefs == _skywork_ref(entropies, 0.2, 0.005, 0.0)[1]


def test_adaptive_entropy_coefficient_resumes_bit_exactly():
    rng = np.random.default_rng(3)
    entropies = list(rng.uniform(0.0, 0.4, size=40))
    straight = AdaptiveEntropyCoef(0.2, 0.005, 0.01)
    trajectory = []
    for e in entropies:
        straight.update(torch.tensor(e, dtype=torch.float64))
        trajectory.append(straight.coef)
    first = AdaptiveEntropyCoef(0.2, 0.005, 0.01)
    resumed_traj = []
    for e in entropies[:17]:
        first.update(torch.tensor(e, dtype=torch.float64))
        resumed_traj.append(first.coef)
    saved = json.loads(json.dumps({"entropy_control": first.state_dict()}))     # as trainer_state.json holds it
    second = AdaptiveEntropyCoef(0.2, 0.005, 0.01)
    second.load_state_dict(saved["entropy_control"])
    for e in entropies[17:]:
        second.update(torch.tensor(e, dtype=torch.float64))
        resumed_traj.append(second.coef)
    assert resumed_traj == trajectory                       # bit for bit (float ==)
    assert second.updates == len(entropies)


# ---------------------------------------------------------------- configs and the quantile op
def test_config_refuses_bad_token_entropy_fields():
    with pytest.raises(ValueError, match="loss.entropy_coef"):
        LossConfig(target_entropy=0.2, entropy_coef=0.01)
    with pytest.raises(ValueError, match="loss.high_entropy_ratio"):
        LossConfig(high_entropy_ratio=0.0)
    with pytest.raises(ValueError, match="loss.entropy_advantage_kappa"):
        LossConfig(entropy_advantage_kappa=1.0)
    with pytest.raises(ValueError, match="loss.archer_entropy_quantile"):
        LossConfig(archer_entropy_quantile=1.0)


def test_selection_needs_the_entropy_for_entropy_methods():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        compute_token_selection(LossConfig(name="archer"), z, z, z, torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("interpolation", ["lower", "higher", "linear"])
def test_global_quantiles_match_numpy(interpolation):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(41).astype(np.float32)
    x[5:9] = x[4]                                                      # ties
    mask = rng.uniform(size=41) > 0.2
    levels = (0.0, 0.1, 0.5, 0.8, 0.93, 1.0)
    got = global_quantiles(torch.tensor(x), torch.tensor(mask), levels, interpolation=interpolation).numpy()
    want = np.quantile(x[mask].astype(np.float64), levels, method=interpolation)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
