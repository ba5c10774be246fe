"""pass@k's unbiased estimator against brute force over k-subsets, and the eval section's checks."""

import itertools
import math

import pytest

from megatron_entcov.config import load_config
from megatron_entcov.evaluation import pass_at_k


def _brute_force(n, c, k):
    """Share of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_edges():
    assert pass_at_k(200, 0, 16) == 0.0
    assert pass_at_k(200, 200, 16) == 1.0
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    assert pass_at_k(200, 7, 10) == pytest.approx(1 - math.comb(193, 10) / math.comb(200, 10), rel=1e-12)
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


@pytest.mark.parametrize("setting, match", [
    (["eval.pass_k=[1, 16]", "eval.n_samples=8"], r"eval.pass_k.*\[1, eval.n_samples=8\]"),
    (["eval.pass_k=[]"], "eval.pass_k"),
    (["eval.source=file"], "eval.path"),
    (["eval.interval=-1"], "eval.interval"),
    (["metrics.law_reward=eval"], "metrics.law_reward.*eval.interval"),
    (["eval.interval=5", "data.source=file", "data.path=x.jsonl"], "data.held_out_rows"),
    (["data.held_out_share=1.0"], "data.held_out_share"),
])
def test_bad_eval_settings_name_the_field(setting, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, setting)
