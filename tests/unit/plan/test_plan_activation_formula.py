"""plan/activations.py against bytes computed by hand (every product written out), so any change to the
activation formulas shows here exactly. The measured validation: tests/distributed/test_plan_activations.py."""

from __future__ import annotations

import pytest

from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.plan.activations import estimate_activations


def _model(**changes) -> ModelConfig:
    fields = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  vocab_size=128, make_vocab_size_divisible_by=128)
    return ModelConfig(**{**fields, **changes})


def test_local_spec_fp32_tp1_padded_no_recompute_by_hand():
    """h=64, ffn=128, 4 heads / 2 groups (head dim 16), 2 layers, V=128, fp32 on CPU; 2 rows of 32 tokens."""
    act = estimate_activations(_model(), ParallelConfig(), micro_batch_tokens=64, max_seq_len=32, packed=False,
                               attention="local", stage=0, device="cpu")
    norms = 2 * 64 * (2 * 64 * 4 + 4 + 64 * 4)      # fp32 x and x*rstd, rstd, output: 98,816
    rope = 4 * 32 * 16 * 4                           # cos/sin of q and k, [s, d]: 8,192
    qkv = 64 * (64 + 64 + 64) * 4                    # q, k and v repeated to 4 heads x 16: 49,152
    softmax = 4 * 64 * 32 * 4                        # heads x rows x s^2, fp32: 32,768
    mask = 32 * 32                                   # bool [s, s]: 1,024
    proj = 64 * 64 * 4                               # linear_proj input: 16,384
    mlp = 64 * 5 * 128 * 4                           # fc1 out (2 ffn), silu, copy, fc2 in: 163,840
    layer = norms + rope + qkv + softmax + mask + proj + mlp
    assert layer == 370_176
    assert act.layer_bytes == layer
    kept = 64 * (2 * 64 * 4 + 4 + 64 * 4) + 64 * 128 * 4 + 64 * (25 + 32)    # final norm, logits, op + loss
    working = 64 * 128 * 4 + 2 * 64 * 128 * 4       # second logits copy, two fp32 chunks of 64 rows
    assert (act.logits_kept_bytes, act.logits_working_bytes) == (kept, working) == (85_824, 98_304)
    assert (act.layers, act.in_flight, act.embedding_bytes, act.recompute_bytes) == (2, 1, 0, 0)
    assert act.saved_bytes == 2 * layer + kept == 826_176
    assert act.train_bytes == 2 * layer + kept + working == 924_480
    # Forward only: residual stream + the MLP transient (fc1 out, silu, copy, product + norm output).
    assert act.forward_bytes == 2 * 64 * 64 * 4 + 64 * (64 + 5 * 128) * 4 == 212_992


def test_fused_bf16_tp2_sp_pp2_full_recompute_packed_by_hand():
    """Same widths, 4 layers, bf16 on GPU with Transformer Engine, tp2 + SP, pp2 stage 0, full recompute,
    packed micro-batches of 256 tokens with samples <= 128."""
    model = _model(num_layers=4, params_dtype="bfloat16", recompute="full")
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True)
    act = estimate_activations(model, parallel, micro_batch_tokens=256, max_seq_len=128, packed=True,
                               attention="fused", stage=0)
    kept_input = 128 * 64 * 2                        # n/sp x h x 2: 16,384
    norms = 2 * 128 * (2 * 64 * 2 + 4)              # x, ln_out, fp32 rstd over n/sp: 66,560
    rope = 4 * 256 * 16 * 2                          # THD: per token: 32,768
    attn = 256 * (32 + 16 + 64 + 32) * 2            # q, k, QKV output (v), attention output: 73,728
    lse = 256 * 2 * 4                                # fp32 log-sum-exp, 2 heads per rank: 2,048
    mlp = 256 * 3 * 64 * 2                           # fused SwiGLU: fc1 out + fc2 in: 98,304
    recompute = norms + rope + attn + lse + mlp - kept_input
    assert recompute == 257_024
    assert (act.layer_bytes, act.recompute_bytes, act.in_flight, act.in_flight_layers) == (kept_input, recompute,
                                                                                          2, 4)
    embedding = 256 * 9                              # tp2: masked ids + mask
    table = 128 * 16 * 4                             # fp32 rotary table kept per micro-batch
    stack = 4 * kept_input + 2 * (embedding + table)
    assert act.saved_bytes == stack + recompute == 343_552
    assert act.pipeline_bytes == 2 * kept_input
    assert act.train_bytes == 343_552 + 32_768 == 376_320
    gathered = 256 * 64 * 2                          # SP all-gathers the MLP input
    assert act.forward_bytes == 2 * 128 * 64 * 2 + 256 * (64 + 3 * 64) * 2 + gathered == 196_608


@pytest.mark.parametrize("stage,passes,layers,in_flight", [(0, 5, 10, 3), (1, 3, 6, 2)])
def test_interleaved_in_flight_is_megatrons_warm_up_plus_one(stage, passes, layers, in_flight):
    """pp2 x vpp2, 8 layers (4 per stage, 2 per chunk): warm-up (pp - stage - 1) x 2 + (vpp - 1) x pp."""
    parallel = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    act = estimate_activations(_model(num_layers=8), parallel, micro_batch_tokens=64, max_seq_len=32,
                               packed=False, attention="local", stage=stage, device="cpu")
    assert passes == (2 - stage - 1) * 2 + (2 - 1) * 2 + 1
    assert (act.in_flight_layers, act.in_flight) == (layers, in_flight)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention='flash'"):
        estimate_activations(_model(), ParallelConfig(), micro_batch_tokens=64, max_seq_len=32, packed=False,
                             attention="flash", stage=0)
    with pytest.raises(ValueError, match="stage=1"):
        estimate_activations(_model(), ParallelConfig(), micro_batch_tokens=64, max_seq_len=32, packed=False,
                             attention="local", stage=1)
    with pytest.raises(ValueError, match="micro_batch_tokens=70"):
        estimate_activations(_model(), ParallelConfig(), micro_batch_tokens=70, max_seq_len=32, packed=False,
                             attention="local", stage=0)
