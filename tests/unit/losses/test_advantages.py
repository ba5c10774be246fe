"""losses/advantages.py: GRPO, Dr.GRPO, RLOO by hand; degenerate groups; explicit group ids; broadcast."""

import math

import pytest
import torch

from megatron_entcov.losses.advantages import broadcast_to_tokens, compute_group_advantages

# Two prompts x 4 responses: group 0 has rewards 1, 0, 0, 1 (mean 0.5); group 1 is all 1 (no signal).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_grpo_with_std_by_hand():
    out = compute_group_advantages(REWARDS, group_size=4, estimator="grpo", eps=1e-6)
    # unbiased std of (1, 0, 0, 1): sqrt(4 * 0.25 / 3) = sqrt(1/3); A = +-0.5 / (sqrt(1/3) + 1e-6)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(out.advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert out.degenerate.tolist() == [False, True]
    assert int(out.num_degenerate) == 1
    assert out.sample_in_degenerate.tolist() == [False] * 4 + [True] * 4


def test_grpo_without_std_and_dr_grpo_by_hand():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    out = compute_group_advantages(REWARDS, group_size=4, estimator="grpo", normalize_std=False)
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(compute_group_advantages(REWARDS, group_size=4, estimator="dr_grpo").advantages,
                               expected)


def test_rloo_by_hand():
    out = compute_group_advantages(REWARDS, group_size=4, estimator="rloo")
    # r=1: 1 - (0 + 0 + 1)/3 = 2/3;  r=0: 0 - (1 + 0 + 1)/3 = -2/3
    torch.testing.assert_close(out.advantages, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))


def test_explicit_group_ids_any_order_and_size():
    # Group 7: rewards 3 and 1 (mean 2); group 2: rewards 0, 0, 3 (mean 1); group 5: a single response.
    rewards = torch.tensor([3.0, 0.0, 1.0, 0.0, 9.0, 3.0])
    ids = torch.tensor([7, 2, 7, 2, 5, 2])
    out = compute_group_advantages(rewards, group_ids=ids, estimator="dr_grpo")
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, -1.0, -1.0, -1.0, 0.0, 2.0]))
    assert out.group_index.tolist() == [0, 1, 0, 1, 2, 1]  # order of first appearance
    assert out.degenerate.tolist() == [False, False, True]  # a single response has no baseline
    rloo = compute_group_advantages(rewards, group_ids=ids, estimator="rloo")
    # group 2, r=3: 3 - (0 + 0)/2 = 3;  r=0: 0 - (0 + 3)/2 = -1.5
    torch.testing.assert_close(rloo.advantages, torch.tensor([2.0, -1.5, -2.0, -1.5, 0.0, 3.0]))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask)
    assert out.tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="estimator"):
        compute_group_advantages(REWARDS, group_size=4, estimator="ppo")
    with pytest.raises(ValueError, match="group_size"):
        compute_group_advantages(REWARDS, group_size=3)
    with pytest.raises(ValueError, match="exactly one"):
        compute_group_advantages(REWARDS)
    with pytest.raises(ValueError, match="broadcast"):
        broadcast_to_tokens(torch.zeros(3), torch.ones(2, 4))
