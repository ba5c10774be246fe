"""Context-parallel micro-batches (policy/packing.py with cp_size > 1): every sequence padded to a multiple of
2 * cp, each rank's tokens those cp_shard_index names, labels the next token by GLOBAL position, packed rows with
global boundaries, and cp_gather putting the ranks' outputs back (a fake group: each rank's part given)."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_entcov.policy import packing
from megatron_entcov.policy.batch import rows_from_samples
from megatron_entcov.policy.packing import cp_gather, cp_row_multiple, micro_batches, scatter_rows
from megatron_entcov.rollout.types import Sample


def _batch(seed: int, n: int = 6, tp: int = 1):
    rnd = random.Random(seed)
    samples = []
    for i in range(n):
        prompt = [rnd.randrange(3, 50) for _ in range(rnd.randint(1, 7))]
        response = [rnd.randrange(3, 50) for _ in range(rnd.randint(1, 9))]
        samples.append(Sample(prompt_ids=prompt, response_ids=response,
                              rollout_logprobs=[-rnd.random() for _ in response], finish_reason="stop",
                              weight_version=0, index=i))
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    return rows_from_samples(samples, torch.randn(n), pad_id=0, sample_ids=list(range(n)), key_stride=longest + tp,
                             multiple_of=tp, device="cpu")


@pytest.mark.parametrize("cp,tp", [(2, 1), (2, 2), (4, 1), (3, 2)])
def test_row_multiple_splits_into_2cp_chunks_whose_share_divides_by_tp(cp, tp):
    m = cp_row_multiple(tp, cp)
    assert m % (2 * cp) == 0 and (m // cp) % tp == 0
    assert all(k % (2 * cp) or (k // cp) % tp for k in range(1, m))        # the least such length
    assert cp_row_multiple(tp, 1) == tp


def _full(batch, mbs, max_tokens, tp, cp):
    """Each rank's micro-batches, and the same plan's full micro-batches rebuilt from the ranks' parts."""
    per_rank = [micro_batches(batch, micro_batch_size=mbs, max_tokens=max_tokens, multiple_of=tp, cp_size=cp,
                              cp_rank=r) for r in range(cp)]
    return per_rank


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cp,tp", [(2, 1), (2, 2), (4, 1)])
def test_each_rank_holds_its_chunks_of_every_sequence_with_global_labels(packed, cp, tp):
    batch = _batch(seed=cp * 10 + tp, tp=tp)
    per_rank = _full(batch, 2, 40 if packed else 0, tp, cp)
    plain = micro_batches(batch, micro_batch_size=2, max_tokens=40 if packed else 0, multiple_of=tp)
    n, t = batch.input_ids.shape
    for i, mbs in enumerate(zip(*per_rank)):
        lengths = mbs[0].cp_lengths
        assert all(length % (2 * cp) == 0 for length in lengths)
        assert sum(lengths) % cp_row_multiple(tp, cp) == 0
        # The ranks' tokens, put at their global positions, rebuild the row; every local token carries the
        # row's values there, the label included (the next token by global position, shifted before the split).
        for field in ("input_ids", "labels", "loss_mask", "advantages", "rollout_logprobs"):
            full = cp_gather_fake([getattr(mb, field) for mb in mbs], mbs[0], cp)
            assert torch.equal(full, _expected(batch, field, mbs[0], plain[i] if not packed else None)), (field, i)
        if packed:
            params = mbs[0].packed_seq_params
            assert params.seq_lengths == lengths                   # global boundaries, each a multiple of 2cp
            assert params.cu_seqlens_q.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
            # a sample's own padding belongs to its segment; the tail padding is the last segment
            assert mbs[0].segment_ids.shape == mbs[0].input_ids.shape
        for r, mb in enumerate(mbs):
            assert mb.input_ids.shape[1] == sum(lengths) // cp
            assert torch.equal(mb.view(batch.token_keys), cp_gather_fake(
                [m.view(batch.token_keys) for m in mbs], mb, cp)[:, packing.cp_shard_index(lengths, cp, r)])
    assert n == batch.num_rows and t == batch.input_ids.shape[1]


def _expected(batch, field, mb, plain):
    """The full micro-batch's ``field`` built from the batch rows independently of the views: padded rows are the
    plain micro-batch's, then zeros; a packed row holds each sample's own tokens at the start of its segment (its
    length rounded up to 2 * cp), zeros after them and in the tail."""
    lengths = mb.cp_lengths
    if plain is not None:
        reference = getattr(plain, field)
        pad = torch.zeros((reference.shape[0], sum(lengths) - reference.shape[1]), dtype=reference.dtype)
        return torch.cat([reference, pad], dim=1)
    rows = getattr(batch, field)
    out = torch.zeros((1, sum(lengths)), dtype=rows.dtype)
    start = 0
    for r, length in zip(mb.rows, lengths):
        n = int(batch.seq_lengths[r])
        out[0, start:start + n] = rows[r, :n]
        start += length
    return out


def cp_gather_fake(parts, mb, cp):
    """cp_gather with a fake all-gather that hands back the given parts of every rank."""
    real = packing.all_gather

    def fake_all_gather(out, t, group=None):
        for o, p in zip(out, parts):
            o.copy_(p)
        return out

    packing.all_gather = fake_all_gather
    try:
        return cp_gather(mb, parts[0], cp, group=object())
    finally:
        packing.all_gather = real


@pytest.mark.parametrize("packed", [False, True])
def test_gathered_outputs_scatter_back_to_the_row_layout(packed):
    batch, cp = _batch(seed=3), 2
    per_rank = _full(batch, 3, 40 if packed else 0, 1, cp)
    # A per-token "output": the row-layout token keys as each rank sees them (float, like a log-prob).
    values = [cp_gather_fake([mb.view(batch.token_keys.double()) for mb in mbs], mbs[0], cp)
              for mbs in zip(*per_rank)]
    rows = scatter_rows(batch, per_rank[0], values)
    valid = torch.arange(batch.input_ids.shape[1])[None, :] < batch.seq_lengths[:, None]
    expected = batch.token_keys.double()
    assert rows.shape == expected.shape
    assert torch.equal(rows[valid], expected[valid])


def test_packed_plan_counts_each_sample_padded_to_2cp():
    batch = _batch(seed=5, n=8)
    longest = int(batch.seq_lengths.max())
    budget = -(-longest // 4) * 4
    for mbs in zip(*_full(batch, 1, budget, 1, 2)):
        assert sum(mbs[0].cp_lengths) <= budget
        assert sorted(mbs[0].rows) == list(mbs[0].rows)
