"""monitor/entropy_classes.py: every partition's shares add up to the total; each class's share against numpy."""

import numpy as np
import pytest
import torch

from megatron_entcov.config import LossConfig
from megatron_entcov.losses.policy import compute_token_selection
from megatron_entcov.monitor.entropy_classes import (
    PARTITIONS,
    chosen_tokens,
    entropy_change_by_class,
    predicted_by_class,
)


def _step(seed=0, rows=6, cols=7):
    g = np.random.default_rng(seed)
    valid = np.arange(cols)[None, :] < g.integers(2, cols + 1, size=(rows, 1))
    old_lp = -g.integers(1, 9, size=(rows, cols)) * 0.25
    new_lp = old_lp + g.normal(0, 0.3, size=(rows, cols))
    old_h = g.integers(0, 12, size=(rows, cols)) * 0.25            # ties
    new_h = old_h + g.normal(0, 0.1, size=(rows, cols))
    adv = np.repeat(g.choice([-1.0, 0.0, 1.5], size=(rows, 1)), cols, axis=1)
    return valid, old_lp, new_lp, old_h, new_h, adv


@pytest.mark.parametrize("name", ["ppo", "kl_cov", "high_entropy_tokens", "archer"])
def test_partitions_add_up_and_each_class_equals_numpy(name):
    valid, old_lp, new_lp, old_h, new_h, adv = _step()
    cfg = LossConfig(name=name, kl_cov_ratio=0.2)
    t = {k: torch.tensor(v) for k, v in dict(valid=valid, old_lp=old_lp, new_lp=new_lp, old_h=old_h, new_h=new_h,
                                              adv=adv).items()}
    sel = compute_token_selection(cfg, t["old_lp"], t["old_lp"], t["adv"], t["valid"], entropy=t["old_h"])
    chosen = chosen_tokens(cfg, sel)
    got = entropy_change_by_class(cfg, t["valid"], t["old_lp"], t["new_lp"], t["old_h"], t["new_h"], t["adv"],
                                  chosen)
    n = valid.sum()
    delta_total = ((new_h - old_h) * valid).sum() / n
    cov = (old_lp - old_lp[valid].mean()) * (adv - adv[valid].mean()) * valid
    assert got["entropy_class/cov_total"] == pytest.approx(cov.sum() / n, rel=1e-6, abs=1e-9)
    for classes in PARTITIONS.values():
        assert sum(got[f"entropy_class/frac_{c}"] for c in classes) == pytest.approx(1.0, rel=1e-12)
        assert sum(got[f"entropy_class/delta_{c}"] for c in classes) == pytest.approx(delta_total, rel=1e-9, abs=1e-12)
        assert sum(got[f"entropy_class/cov_{c}"] for c in classes) == pytest.approx(cov.sum() / n, rel=1e-6,
                                                                                     abs=1e-9)
    high = valid & (old_h >= np.quantile(old_h[valid], 0.8))
    ratio = np.exp(new_lp - old_lp)
    expected = {"high_entropy": high, "adv_neg": valid & (adv < 0),
                "clip_low": valid & (adv < 0) & (ratio < 0.8), "clip_high": valid & (adv > 0) & (ratio > 1.28),
                "selected": valid & chosen.numpy()}
    for c, mask in expected.items():
        assert got[f"entropy_class/frac_{c}"] == pytest.approx(mask.sum() / n, rel=1e-12)
        assert got[f"entropy_class/delta_{c}"] == pytest.approx(((new_h - old_h) * mask).sum() / n, rel=1e-9,
                                                                abs=1e-12)
    if name == "ppo":
        assert got["entropy_class/frac_selected"] == 0.0
    else:
        assert got["entropy_class/frac_selected"] > 0
    pred = predicted_by_class(got, 2.0)
    assert pred["entropy_class/pred_high_entropy"] == 2.0 * got["entropy_class/cov_high_entropy"]
    assert predicted_by_class(got, None) == {}
