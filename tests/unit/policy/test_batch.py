"""rows_from_samples and TrainBatch: label shift, loss mask, advantage and log-prob placement, padding, token keys,
row splitting, and the ValueErrors, against hand-written expected tensors."""

import dataclasses

import pytest
import torch

from megatron_entcov.policy.batch import TrainBatch, rows_from_samples
from megatron_entcov.rollout.types import Sample

PAD = 3  # not 0, so padding is told apart from zeros


def _sample(prompt, response, logprobs, index):
    return Sample(prompt_ids=list(prompt), response_ids=list(response), rollout_logprobs=list(logprobs),
                  finish_reason="stop", weight_version=0, index=index)


def _samples():
    # Row lengths 6, 4, 5; prompt lengths 3, 2, 1.
    return [
        _sample([5, 6, 7], [8, 9, 1], [-0.1, -0.2, -0.3], 0),
        _sample([4, 5], [6, 1], [-0.4, -0.5], 1),
        _sample([7], [9, 10, 11, 1], [-0.6, -0.7, -0.8, -0.9], 2),
    ]


ADV = torch.tensor([1.5, -0.5, 2.0])

# Hand-written expectations for T = 6 (the longest row), pad id 3.
INPUT_IDS = [[5, 6, 7, 8, 9, 1],
             [4, 5, 6, 1, 3, 3],
             [7, 9, 10, 11, 1, 3]]
LABELS = [[6, 7, 8, 9, 1, 3],
          [5, 6, 1, 3, 3, 3],
          [9, 10, 11, 1, 3, 3]]
# Positions whose label is a response token: p-1 .. p-1+r-1.
LOSS_MASK = [[0, 0, 1, 1, 1, 0],
             [0, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 0, 0]]
ADVANTAGES = [[0, 0, 1.5, 1.5, 1.5, 0],
              [0, -0.5, -0.5, 0, 0, 0],
              [2.0, 2.0, 2.0, 2.0, 0, 0]]
ROLLOUT_LP = [[0, 0, -0.1, -0.2, -0.3, 0],
              [0, -0.4, -0.5, 0, 0, 0],
              [-0.6, -0.7, -0.8, -0.9, 0, 0]]


def test_pack_exact_layout():
    b = rows_from_samples(_samples(), ADV, pad_id=PAD, sample_ids=[10, 11, 12], key_stride=6, device="cpu")
    assert b.num_rows == 3
    assert b.input_ids.dtype == b.labels.dtype == b.position_ids.dtype == b.token_keys.dtype == torch.int64
    assert b.advantages.dtype == b.rollout_logprobs.dtype == torch.float32
    assert b.loss_mask.dtype == torch.bool
    assert b.input_ids.tolist() == INPUT_IDS
    assert b.labels.tolist() == LABELS
    assert b.loss_mask.int().tolist() == LOSS_MASK
    torch.testing.assert_close(b.advantages, torch.tensor(ADVANTAGES), rtol=0, atol=0)
    torch.testing.assert_close(b.rollout_logprobs, torch.tensor(ROLLOUT_LP), rtol=0, atol=0)
    assert b.position_ids.tolist() == [list(range(6))] * 3
    # labels[p] = tokens[p + 1]: the shift holds everywhere inside the row.
    assert torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])
    # The masked labels are exactly the response tokens, in order.
    for i, s in enumerate(_samples()):
        assert b.labels[i][b.loss_mask[i]].tolist() == s.response_ids
    # token key = sample id * key_stride + position
    assert b.token_keys.tolist() == [[sid * 6 + p for p in range(6)] for sid in (10, 11, 12)]
    assert b.old_logprobs is None and b.old_entropy is None


@pytest.mark.parametrize("multiple_of, expected_t", [(1, 6), (2, 6), (4, 8), (5, 10), (7, 7)])
def test_multiple_of_pads_t(multiple_of, expected_t):
    b = rows_from_samples(_samples(), ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=16, multiple_of=multiple_of,
                          device="cpu")
    extra = expected_t - 6
    assert b.input_ids.shape == b.labels.shape == b.loss_mask.shape == (3, expected_t)
    assert b.input_ids.tolist() == [row + [PAD] * extra for row in INPUT_IDS]
    assert b.labels.tolist() == [row + [PAD] * extra for row in LABELS]
    assert b.loss_mask.int().tolist() == [row + [0] * extra for row in LOSS_MASK]
    assert b.advantages.tolist() == [row + [0.0] * extra for row in ADVANTAGES]
    assert b.position_ids.tolist() == [list(range(expected_t))] * 3
    assert b.token_keys.tolist() == [[sid * 16 + p for p in range(expected_t)] for sid in (0, 1, 2)]


def test_token_keys_unique_across_ranks_and_independent_of_packing():
    samples = _samples()
    stride = 6  # the step's global longest row
    # Two "ranks": rank 0 packs samples 0 and 1 (T=6), rank 1 packs sample 2 alone (T=5).
    r0 = rows_from_samples(samples[:2], ADV[:2], pad_id=PAD, sample_ids=[0, 1], key_stride=stride, device="cpu")
    r1 = rows_from_samples(samples[2:], ADV[2:], pad_id=PAD, sample_ids=[2], key_stride=stride, device="cpu")
    assert r1.input_ids.shape == (1, 5)
    keys = torch.cat([r0.token_keys.flatten(), r1.token_keys.flatten()])
    assert keys.unique().numel() == keys.numel() == 2 * 6 + 5
    # Sample 2's keys on rank 1 equal its keys when packed together with the others (same positions).
    together = rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=stride, device="cpu")
    assert torch.equal(r1.token_keys[0], together.token_keys[2, :5])
    assert torch.equal(r0.token_keys, together.token_keys[:2])
    assert r1.token_keys[0].tolist() == [12, 13, 14, 15, 16]
    # Same tensors too, apart from the shorter padding.
    assert torch.equal(r1.loss_mask[0], together.loss_mask[2, :5])
    assert torch.equal(r1.rollout_logprobs[0], together.rollout_logprobs[2, :5])


def test_split_and_rows_slice_every_field():
    samples = _samples() + [_sample([6], [7, 1], [-1.0, -1.1], 3)]
    adv = torch.tensor([1.5, -0.5, 2.0, 0.25])
    b = rows_from_samples(samples, adv, pad_id=PAD, sample_ids=[0, 1, 2, 3], key_stride=6, device="cpu")
    b.old_logprobs = torch.arange(24, dtype=torch.float32).view(4, 6)
    names = ["input_ids", "position_ids", "labels", "loss_mask", "advantages", "rollout_logprobs",
             "token_keys", "seq_lengths", "old_logprobs", "old_entropy"]
    assert b.routed_experts is None          # no sample carries routing (tests/unit/rollout/test_routed_experts.py)
    names.insert(-1, "routed_experts")
    b.routed_experts = torch.arange(4 * 6 * 2 * 1, dtype=torch.int16).view(4, 6, 2, 1)
    assert b.seq_lengths.tolist() == [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    for parts, size in ((1, 4), (2, 2), (4, 1)):
        pieces = b.split(parts)
        assert len(pieces) == parts
        for k, piece in enumerate(pieces):
            assert isinstance(piece, TrainBatch) and piece.num_rows == size
            d = {f.name: getattr(piece, f.name) for f in dataclasses.fields(piece)}
            assert sorted(d) == sorted(names)
            assert d["old_entropy"] is None
            for name in names[:-1]:
                assert torch.equal(d[name], getattr(b, name)[k * size:(k + 1) * size]), (parts, k, name)
        # The pieces put back together are the batch.
        for name in names[:-1]:
            assert torch.equal(torch.cat([getattr(p, name) for p in pieces]), getattr(b, name))
    middle = b.rows(slice(1, 3))
    assert middle.input_ids.tolist() == INPUT_IDS[1:3]
    assert middle.old_logprobs.tolist() == [list(range(6, 12)), list(range(12, 18))]
    for bad in (3, 0, 5, -1):
        with pytest.raises(ValueError, match="cannot split 4 rows"):
            b.split(bad)


def test_pack_errors():
    samples = _samples()
    with pytest.raises(ValueError, match="3 samples, 2 advantages, 3 ids"):
        rows_from_samples(samples, ADV[:2], pad_id=PAD, sample_ids=[0, 1, 2], key_stride=6, device="cpu")
    with pytest.raises(ValueError, match="3 samples, 3 advantages, 2 ids"):
        rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1], key_stride=6, device="cpu")
    with pytest.raises(ValueError, match="key_stride=5 is shorter than the longest sample 6"):
        rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=5, device="cpu")


def test_valid_token_keys_do_not_depend_on_the_tensor_parallel_padding():
    """Padding to a multiple of tp lengthens rows, not the key stride: the keys of the tokens Clip-Cov and
    KL-Cov choose among (and the histogram sample) are the same at tp1 and tp4, so are the choices."""
    samples = _samples()
    plain = rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=6, device="cpu")
    padded = rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=6, multiple_of=4,
                               device="cpu")
    assert padded.input_ids.shape == (3, 8)
    assert torch.equal(padded.loss_mask[:, :6], plain.loss_mask) and not padded.loss_mask[:, 6:].any()
    assert torch.equal(padded.token_keys[padded.loss_mask], plain.token_keys[plain.loss_mask])
    valid = plain.token_keys[plain.loss_mask]
    assert valid.unique().numel() == valid.numel()
    assert rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=8,
                             multiple_of=4, device="cpu").input_ids.shape == (3, 8)
    # Sample validates its own lengths; a later mutation is caught by rows_from_samples.
    samples[1].rollout_logprobs = [-0.4]
    with pytest.raises(ValueError, match="sample 1: 2 response tokens but 1 log-probs"):
        rows_from_samples(samples, ADV, pad_id=PAD, sample_ids=[0, 1, 2], key_stride=6, device="cpu")


@pytest.mark.parametrize("response", [[5], [5, 6]])
def test_pack_rejects_an_empty_prompt(response):
    # The first response token is scored from the last prompt token's logits: without a prompt token it would
    # silently get no loss-mask position (one token) or fail inside torch (two).
    samples = [_sample([], response, [-0.1] * len(response), 0)]
    with pytest.raises(ValueError, match="sample 0 has an empty prompt"):
        rows_from_samples(samples, torch.zeros(1), pad_id=PAD, sample_ids=[0], key_stride=8, device="cpu")
