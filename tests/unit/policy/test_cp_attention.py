"""The pieces of the local context-parallel attention that need no process group: the global order of the gathered
keys, the causal mask by global position, the lengths read from packed_seq_params, and what the constructor and
the forward refuse (fake groups, as Megatron's own tests use). The attention's values across real gloo ranks are
in tests/distributed/test_cp_attention_ranks.py."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_entcov.policy import cp_attention
from megatron_entcov.policy.cp_attention import ContextParallelDotProductAttention
from megatron_entcov.policy.cp_layout import cp_shard_index
from megatron_entcov.policy.packing import HostPackedSeqParams


class _FakeGroup:
    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _config(cp: int, **changes) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, context_parallel_size=cp,
                  attention_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False,
                  apply_rope_fusion=False, gradient_accumulation_fusion=False)
    return TransformerConfig(**{**fields, **changes})


def _build(config, cp_group, mask=AttnMaskType.causal, layer_number=1):
    pgs = ProcessGroupCollection()
    pgs.tp = _FakeGroup(1)
    if cp_group is not None:
        pgs.cp = cp_group
    return ContextParallelDotProductAttention(config, layer_number=layer_number, attn_mask_type=mask,
                                              attention_type="self", pg_collection=pgs)


@pytest.mark.parametrize("lengths,cp", [((16,), 2), ((8, 4, 12), 2), ((24, 48), 3), ((8, 16, 8), 4), ((0, 8), 4)])
def test_the_gathered_tokens_of_every_rank_are_put_back_in_row_order(lengths, cp):
    row = torch.arange(100, 100 + sum(lengths))
    gathered = torch.cat([row[cp_shard_index(lengths, cp, r)] for r in range(cp)])   # what all_gather returns
    assert torch.equal(gathered[cp_attention._global_order(lengths, cp)], row)


@pytest.mark.parametrize("length,cp", [(8, 2), (16, 4), (12, 3)])
def test_the_masks_of_the_ranks_make_up_the_full_causal_mask(length, cp):
    full = torch.zeros(length, length, dtype=torch.bool)
    for r in range(cp):
        mask = cp_attention._causal_mask(length, cp, r, "cpu")
        assert mask.shape == (1, 1, length // cp, length)
        full[cp_shard_index([length], cp, r)] = mask[0, 0]
    assert torch.equal(full, torch.ones(length, length, dtype=torch.bool).triu(1))


def test_packed_lengths_come_from_seq_lengths_then_the_padded_then_the_real_cu_seqlens():
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    real = torch.tensor([0, 7, 17], dtype=torch.int32)
    host = HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, seq_lengths=(8, 12))
    assert cp_attention._global_lengths(host) == (8, 12)
    padded = PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_q_padded=cu)
    assert cp_attention._global_lengths(padded) == (8, 12)
    assert cp_attention._global_lengths(PackedSeqParams(qkv_format="thd", cu_seqlens_q=real)) == (7, 10)


def test_the_constructor_takes_the_cp_group_and_keeps_the_real_config():
    config = _config(2)
    module = _build(config, _FakeGroup(2, rank=1))
    assert (module.cp_size, module.cp_rank) == (2, 1)
    assert module.config is config and config.context_parallel_size == 2
    assert module.scale_mask_softmax.scaled_masked_softmax_fusion is False
    one = _build(_config(1, masked_softmax_fusion=True), _FakeGroup(1))
    assert one.cp_size == 1 and one.scale_mask_softmax.scaled_masked_softmax_fusion is True
    assert _build(_config(1), None).cp_size == 1


def test_the_constructor_refuses_a_group_of_another_size_and_what_it_does_not_implement():
    with pytest.raises(ValueError, match="group has 2 ranks but context_parallel_size is 4"):
        _build(_config(4), _FakeGroup(2))
    with pytest.raises(ValueError, match="attn_mask_type no_mask .* causal only"):
        _build(_config(2), _FakeGroup(2), mask=AttnMaskType.no_mask)
    with pytest.raises(ValueError, match="window_size=.*sliding-window"):
        _build(_config(2, window_size=(4, 0)), _FakeGroup(2))


def test_the_forward_refuses_an_explicit_mask_and_local_cu_seqlens():
    module = _build(_config(2), _FakeGroup(2))
    q, kv = torch.zeros(4, 1, 4, 8), torch.zeros(4, 1, 2, 8)
    with pytest.raises(ValueError, match="explicit attention_mask"):
        module(q, kv, kv, torch.zeros(1, 1, 4, 8, dtype=torch.bool))
    local = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="GLOBAL cu_seqlens"):
        module(q[:, 0], kv[:, 0], kv[:, 0], None, packed_seq_params=local)
    with pytest.raises(ValueError, match="'sbhd'"):
        module(q, kv, kv, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
