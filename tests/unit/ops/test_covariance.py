"""ops/covariance.py: global covariance, exact radix select, seeded random choice, quantiles (single process)."""

import random

import pytest
import torch

from megatron_entcov.ops.covariance import (
    _splitmix64_int,
    float_to_ordered_int,
    global_quantiles,
    global_random_choice_mask,
    global_topk_mask,
    masked_global_mean,
    ordered_int_to_float,
    radix_select_smallest,
    selection_salt,
    splitmix64,
    token_covariance,
)


def test_token_covariance_by_hand():
    # valid logp = [-1, -2, -3] (mean -2), A = [1, 1, -2] (mean 0); the 4th token is padding (inf ignored).
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -float("inf")]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    cov = token_covariance(logp, adv, mask)
    # (-1 + 2) * 1 = 1;  (-2 + 2) * 1 = 0;  (-3 + 2) * (-2) = 2;  padding 0
    assert torch.equal(cov, torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert cov.dtype == torch.float32


def test_token_covariance_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(8, 33, generator=g) * 5
    adv = torch.randn(8, 33, generator=g)
    mask = torch.rand(8, 33, generator=g) > 0.3
    cov = token_covariance(logp, adv, mask)
    lp, a = logp[mask].double(), adv[mask].double()
    ref = torch.zeros(8, 33, dtype=torch.float64)
    ref[mask] = (lp - lp.mean()) * (a - a.mean())
    torch.testing.assert_close(cov.double(), ref, atol=1e-6, rtol=1e-6)
    mean, count = masked_global_mean(logp, mask)
    assert count == mask.sum()
    assert abs(mean - lp.mean()) < 1e-7


def test_token_covariance_bitwise_row_permutation_invariant():
    g = torch.Generator().manual_seed(1)
    logp, adv = -torch.rand(16, 20, generator=g) * 4, torch.randn(16, 20, generator=g)
    mask = torch.rand(16, 20, generator=g) > 0.2
    perm = torch.randperm(16, generator=g)
    assert torch.equal(token_covariance(logp, adv, mask)[perm], token_covariance(logp[perm], adv[perm], mask[perm]))


def test_splitmix64_matches_python_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64)
    x[:3] = torch.tensor([0, -1, -(2**63)])
    ref = [_splitmix64_int(v & (2**64 - 1)) for v in x.tolist()]
    ref = [v - 2**64 if v >= 2**63 else v for v in ref]
    assert splitmix64(x).tolist() == ref
    assert selection_salt(1, 2) != selection_salt(1, 3) != selection_salt(2, 2)


def test_float_encoding_orders_and_round_trips():
    v = torch.cat([torch.randn(500) * 100, torch.tensor([0.0, float("inf"), -float("inf"), 1e-42, -1e-42, 3.0])])
    enc = float_to_ordered_int(v)
    assert ((enc >= 0) & (enc < 2**32)).all()
    assert torch.equal(v[torch.argsort(enc)], torch.sort(v).values)
    assert torch.equal(ordered_int_to_float(enc), v)
    desc = float_to_ordered_int(v, descending=True)
    assert torch.equal(v[torch.argsort(desc)], torch.sort(v, descending=True).values)


@pytest.mark.parametrize("seed", range(6))
def test_radix_select_equals_sorting(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_elem = rng.choice([1, 7, 300])
    # Few distinct values -> many ties in the first word, broken by the second (a permutation = unique).
    w0 = torch.randint(0, 4, (n_elem,), generator=g) * (2**30)  # < 2**32: a 32-bit word
    w1 = torch.randperm(n_elem, generator=g) * 977 - 5000          # negative values too (unsigned order)
    eligible = torch.rand(n_elem, generator=g) > 0.4
    ref = sorted((i for i in range(n_elem) if eligible[i]),
                 key=lambda i: (int(w0[i]), int(w1[i]) & (2**64 - 1)))
    for n in (0, 1, len(ref) // 2, len(ref), len(ref) + 3):
        sel, boundary = radix_select_smallest([(w0, 32), (w1, 64)], eligible, torch.tensor(n))
        assert sorted(torch.nonzero(sel).flatten().tolist()) == sorted(ref[:n])
        if 1 <= n <= len(ref):
            assert int(boundary[0]) == int(w0[ref[n - 1]])
            assert int(boundary[1]) == int(w1[ref[n - 1]])  # same 64-bit pattern


def test_topk_ties_go_to_smaller_key():
    values = torch.tensor([[1.0, 3.0, 3.0], [3.0, 2.0, 3.0]])
    keys = torch.tensor([[10, 50, 20], [40, 0, 30]])
    eligible = torch.ones(2, 3, dtype=torch.bool)
    m = global_topk_mask(values, keys, eligible, torch.tensor(2))
    # The four 3.0s have keys 50, 20, 40, 30: the two smallest keys (20, 30) win.
    assert m.tolist() == [[False, False, True], [False, False, True]]
    eligible[0, 2] = False
    m = global_topk_mask(values, keys, eligible, torch.tensor(2))
    assert m.tolist() == [[False, False, False], [True, False, True]]


def test_topk_matches_torch_topk_on_distinct_values():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(12, 40, generator=g)
    keys = torch.arange(480).view(12, 40)
    eligible = torch.rand(12, 40, generator=g) > 0.25
    k = 17
    masked = torch.where(eligible, values, -torch.inf).flatten()
    ref = torch.zeros(480, dtype=torch.bool)
    ref[torch.topk(masked, k).indices] = True
    assert torch.equal(global_topk_mask(values, keys, eligible, torch.tensor(k)).flatten(), ref)


def test_random_choice_is_a_function_of_keys_seed_and_step():
    keys = torch.arange(2000).view(40, 50) * 3 + 7
    eligible = (torch.arange(2000).view(40, 50) % 3) != 0
    n = torch.tensor(25)
    m = global_random_choice_mask(keys, eligible, n, seed=5, step=9)
    assert int(m.sum()) == 25 and not (m & ~eligible).any()
    perm = torch.randperm(40)
    assert torch.equal(global_random_choice_mask(keys[perm], eligible[perm], n, seed=5, step=9), m[perm])
    assert not torch.equal(global_random_choice_mask(keys, eligible, n, seed=5, step=10), m)
    assert not torch.equal(global_random_choice_mask(keys, eligible, n, seed=6, step=9), m)
    # Fewer candidates than n: all of them.
    few = eligible & (keys < 100)
    assert torch.equal(global_random_choice_mask(keys, few, n, seed=5, step=9), few)


def test_random_choice_is_roughly_uniform():
    # Each of 100 candidates should be picked ~ n/100 of the time over many steps (a uniform n-subset).
    keys = torch.arange(100)
    eligible = torch.ones(100, dtype=torch.bool)
    hits = torch.zeros(100)
    for step in range(400):
        hits += global_random_choice_mask(keys, eligible, torch.tensor(10), seed=0, step=step).float()
    assert hits.sum() == 4000
    # Binomial(400, 0.1): mean 40, std 6; 5 std bounds.
    assert hits.min() > 10 and hits.max() < 70


def test_quantiles_match_torch_lower_interpolation():
    g = torch.Generator().manual_seed(4)
    values = torch.randn(9, 31, generator=g).round(decimals=2)  # ties included
    mask = torch.rand(9, 31, generator=g) > 0.3
    levels = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    ref = torch.quantile(values[mask], torch.tensor(levels), interpolation="lower")
    assert torch.equal(global_quantiles(values, mask, levels), ref)
    empty = torch.zeros(9, 31, dtype=torch.bool)
    assert torch.equal(global_quantiles(values, empty, levels), torch.zeros(len(levels)))
