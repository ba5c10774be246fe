"""Token-budget micro-batches: the bin plan, the packed layout and its way back, per-sample aggregation, config."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megatron_entcov.config import load_config
from megatron_entcov.losses.aggregation import aggregate
from megatron_entcov.policy.batch import rows_from_samples
from megatron_entcov.policy.packing import micro_batches, plan_bins, scatter_rows
from megatron_entcov.rollout.types import Sample


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


@pytest.mark.parametrize("seed", range(20))
def test_plan_covers_every_sample_once_within_budget_and_is_balanced(seed):
    rnd = random.Random(seed)
    lengths = [max(1, min(200, int(rnd.lognormvariate(3, 1)))) for _ in range(rnd.randint(1, 60))]
    budget, multiple = 256, rnd.choice([1, 2, 4])
    bins = plan_bins(lengths, budget, multiple_of=multiple)
    assert sorted(itertools.chain(*bins)) == list(range(len(lengths)))
    assert all(b and b == sorted(b) for b in bins)
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(_pad(load, multiple) <= budget for load in loads)
    # Never more than one micro-batch beyond the lower bound, for these long-tailed lengths.
    assert len(bins) <= -(-sum(lengths) // budget) + 1
    assert plan_bins(lengths, budget, multiple_of=multiple) == bins          # deterministic


def test_plan_grows_the_count_when_first_fit_needs_it_and_honours_count_multiple():
    # 18 tokens make 2 budgets of 9 by sum, but no two samples of 6 share one: 3 micro-batches.
    assert plan_bins([6, 6, 6], 9) == [[0], [1], [2]]
    # Longest first into the least-loaded bin (ties to the lower index): 7 -> 0, 7 -> 1, 5 -> 0.
    assert plan_bins([7, 5, 7], 12) == [[0, 1], [2]]
    assert len(plan_bins([3, 3, 3, 3], 100, count_multiple=2)) == 2
    assert len(plan_bins([3, 3, 3, 3, 3], 6, count_multiple=2)) == 4        # 3 bins by size, rounded to 4
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=8"):
        plan_bins([9], 8)
    with pytest.raises(ValueError, match="cannot fill 2 micro-batches"):
        plan_bins([3], 8, count_multiple=2)
    assert plan_bins([], 8) == []


def _batch(lengths_prompt_response, seed=0, multiple_of=1):
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(prompt_ids=torch.randint(0, 50, (p,), generator=g).tolist(),
                      response_ids=torch.randint(0, 50, (r,), generator=g).tolist(),
                      rollout_logprobs=(-torch.rand(r, generator=g)).tolist(), finish_reason="stop",
                      weight_version=0, index=i)
               for i, (p, r) in enumerate(lengths_prompt_response)]
    n = len(samples)
    longest = max(p + r for p, r in lengths_prompt_response)
    return rows_from_samples(samples, torch.randn(n, generator=g), pad_id=0, sample_ids=list(range(n)),
                             key_stride=longest, device="cpu", multiple_of=multiple_of)


def test_packed_rows_hold_each_sample_with_its_own_positions_and_values():
    batch = _batch([(3, 2), (5, 6), (2, 1), (4, 4)], multiple_of=2)
    batch.old_logprobs = -torch.rand(batch.input_ids.shape, generator=torch.Generator().manual_seed(1))
    micro = micro_batches(batch, micro_batch_size=2, max_tokens=12, multiple_of=2)
    seen = []
    for mb in micro:
        seq = mb.packed_seq_params
        lengths = list(seq.seq_lengths)
        assert mb.input_ids.shape == (1, sum(lengths)) and sum(lengths) % 2 == 0 and sum(lengths) <= 12
        assert seq.cu_seqlens_q.tolist() == [0, *itertools.accumulate(lengths)]
        assert seq.max_seqlen_q == max(lengths)
        pos = 0
        for s, row in enumerate(mb.rows):
            n = int(batch.seq_lengths[row])
            sl = slice(pos, pos + n)
            assert torch.equal(mb.input_ids[0, sl], batch.input_ids[row, :n])
            assert torch.equal(mb.labels[0, sl], batch.labels[row, :n])
            assert torch.equal(mb.position_ids[0, sl], torch.arange(n))         # restart per sample
            assert torch.equal(mb.loss_mask[0, sl], batch.loss_mask[row, :n])
            assert torch.equal(mb.advantages[0, sl], batch.advantages[row, :n])
            assert torch.equal(mb.rollout_logprobs[0, sl], batch.rollout_logprobs[row, :n])
            assert torch.equal(mb.old_logprobs[0, sl], batch.old_logprobs[row, :n])
            assert torch.equal(mb.view(batch.token_keys)[0, sl], batch.token_keys[row, :n])
            assert (mb.segment_ids[0, sl] == s).all()
            pos += n
            seen.append(row)
        assert not mb.loss_mask[0, pos:].any()                                 # padding is never scored
        assert mb.view(batch.rollout_logprobs).shape == (1, mb.input_ids.shape[1])
    assert sorted(seen) == list(range(4))
    # Outputs computed per packed token go back to the row layout, 0 at padding.
    values = [mb.view(batch.token_keys).float() for mb in micro]
    back = scatter_rows(batch, micro, values)
    valid = torch.arange(batch.input_ids.shape[1])[None, :] < batch.seq_lengths[:, None]
    assert torch.equal(back[valid], batch.token_keys.float()[valid])
    assert (back[~valid] == 0).all()


def test_parts_pack_each_mini_batch_on_its_own():
    batch = _batch([(2, 1)] * 4 + [(2, 1)] * 4)
    micro = micro_batches(batch, micro_batch_size=2, max_tokens=100, parts=2)
    assert [mb.rows for mb in micro] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    uniform = micro_batches(batch, micro_batch_size=2, max_tokens=100, parts=2, uniform=True)
    assert {mb.input_ids.shape[1] for mb in uniform} == {100}


def test_row_micro_batches_are_slices_as_before():
    batch = _batch([(2, 3)] * 4)
    micro = micro_batches(batch, micro_batch_size=2)
    assert [mb.rows for mb in micro] == [slice(0, 2), slice(2, 4)]
    assert torch.equal(micro[1].view(batch.advantages), batch.advantages[2:4])
    assert micro[0].packed_seq_params is None and micro[0].segment_ids is None and micro[0].flat_index is None
    assert torch.equal(micro[1].labels, batch.labels[2:4]) and torch.equal(micro[1].loss_mask, batch.loss_mask[2:4])
    assert micro[1].old_logprobs is None                       # not computed yet


def test_seq_mean_token_mean_averages_per_sample_inside_a_packed_row():
    values = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0, 99.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 2]])
    got = aggregate(values, mask, "seq-mean-token-mean", num_valid=torch.tensor(5), num_seqs=torch.tensor(2),
                    segment_ids=segments)
    assert float(got) == pytest.approx(((1 + 2 + 3) / 3 + (10 + 20) / 2) / 2)
    rows = aggregate(torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                     "seq-mean-token-mean", num_valid=torch.tensor(5), num_seqs=torch.tensor(2))
    assert float(got) == pytest.approx(float(rows))


@pytest.mark.parametrize("overrides, field, hint", [
    (["optim.max_tokens_per_micro_batch=20", "rollout.max_prompt_len=16", "sampling.max_new_tokens=8"],
     "optim.max_tokens_per_micro_batch", ">= 24"),
    (["optim.max_tokens_per_micro_batch=-1"], "optim.max_tokens_per_micro_batch", ""),
    (["optim.max_tokens_per_micro_batch=4097", "parallel.tensor_model_parallel_size=2"],
     "optim.max_tokens_per_micro_batch", "use 4098"),
])
def test_a_bad_token_budget_names_the_field_and_the_fix(overrides, field, hint):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert field in str(err.value) and hint in str(err.value)
