"""The planner's parameter counts per tensor-parallel rank for the shipped Qwen2.5 shapes, against counts
written out by hand from the architecture (no builder involved)."""

from __future__ import annotations

from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.plan.states import rank_states


def _qwen(**fields) -> ModelConfig:
    return ModelConfig(add_qkv_bias=True, tie_word_embeddings=False, params_dtype="bfloat16", vocab_size=152064,
                       **fields)


def test_qwen25_7b_at_tp4():
    """hidden 3584, ffn 18944, 28 heads, 4 kv groups of 128, vocab 152064 (a multiple of 128 x 4: no padding)."""
    m = _qwen(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4)
    embedding = 152064 // 4 * 3584                       # 136,249,344 rows of this rank x hidden
    layer = (2 * 3584                                    # input and pre-MLP RMSNorm (replicated)
             + (28 + 2 * 4) * 128 // 4 * 3584            # fused QKV, this rank's 1152 rows
             + (28 + 2 * 4) * 128 // 4                   # its bias
             + 3584 * (3584 // 4)                        # attention output projection
             + 2 * 18944 // 4 * 3584                     # SwiGLU gate + up
             + 3584 * (18944 // 4))                      # down projection
    expected = 28 * layer + 2 * embedding + 3584         # untied output layer, final norm
    (state,) = rank_states(m, ParallelConfig(tensor_model_parallel_size=4), world_size=8)
    assert state.params == expected == 1_904_057_344
    norms = (2 * 28 + 1) * 3584                          # the local spec's RMSNorm weights stay fp32
    assert state.weights_bytes == 2 * (expected - norms) + 4 * norms
    assert state.grads_bytes == 4 * expected             # fp32 gradient buffers
    # Adam without sharding: an fp32 master of each bf16 element, 2 fp32 moments per element, a 4-byte step per
    # tensor (7 per layer, embedding, output layer, final norm).
    assert state.optimizer_bytes == 4 * (expected - norms) + 8 * expected + 4 * (28 * 7 + 3)


def test_qwen25_32b_at_tp8_pp2():
    """hidden 5120, ffn 27648, 40 heads, 8 kv groups; vocab padded to a multiple of 128 x 8 = 152576."""
    m = _qwen(num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40, num_query_groups=8)
    embedding = 152576 // 8 * 5120                       # 97,648,640
    layer = (2 * 5120 + (40 + 16) * 128 // 8 * 5120 + (40 + 16) * 128 // 8 + 5120 * (5120 // 8)
             + 2 * 27648 // 8 * 5120 + 5120 * (27648 // 8))
    first, last = rank_states(m, ParallelConfig(tensor_model_parallel_size=8, pipeline_model_parallel_size=2),
                              world_size=32)
    assert first.params == 32 * layer + embedding == 2_048_356_352
    assert last.params == 32 * layer + 5120 + embedding == 2_048_361_472
    assert (first.layers, first.has_embedding, first.has_output_layer) == (32, True, False)
    assert (last.layers, last.has_embedding, last.has_output_layer) == (32, False, True)


def test_distributed_optimizer_shards_the_state_over_data_parallel_ranks():
    """Qwen2.5-7B at tp4 x dp2 with the distributed optimizer: each dp rank keeps about half of the state, the
    two halves cover every element once (12 bytes each, 8 for the fp32 norms) plus a 4-byte step per piece of a
    tensor in a shard (a tensor cut by a shard boundary has a piece, and a step, on each side)."""
    m = _qwen(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4)
    parallel = ParallelConfig(tensor_model_parallel_size=4, use_distributed_optimizer=True)
    (state,) = rank_states(m, parallel, world_size=8)
    a, b = state.optimizer_bytes_by_dp_rank
    norms = (2 * 28 + 1) * 3584                          # fp32 already: no master copy
    tensors = 28 * 7 + 3
    steps = a + b - 12 * state.params + 4 * norms
    assert steps % 4 == 0 and tensors * 4 <= steps <= (tensors + 2) * 4   # at most two tensors straddle shards
    assert abs(a - b) < 12 * 2**16
