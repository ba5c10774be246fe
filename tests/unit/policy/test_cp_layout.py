"""cp_shard_index against the layout written out by hand, and the ranks' shards tile each sequence once."""

import pytest
import torch

from megatron_entcov.policy.cp_layout import cp_shard_index


def test_two_ranks_one_sequence():
    assert cp_shard_index([8], 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_shard_index([8], 2, 1).tolist() == [2, 3, 4, 5]


def test_packed_row_applies_the_layout_per_sequence():
    assert cp_shard_index([4, 8], 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert cp_shard_index([4, 8], 2, 1).tolist() == [1, 2, 6, 7, 8, 9]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_shards_tile_the_row(cp):
    lengths = [2 * cp * k for k in (1, 3, 2)]
    shards = [cp_shard_index(lengths, cp, r) for r in range(cp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(sum(lengths)))
    assert len({len(s) for s in shards}) == 1


def test_bad_lengths_and_ranks_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        cp_shard_index([6], 2, 0)
    with pytest.raises(ValueError, match="outside a group of 2"):
        cp_shard_index([8], 2, 2)
