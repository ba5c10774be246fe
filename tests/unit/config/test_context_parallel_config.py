"""parallel.context_parallel_size: accepted with tp, pp, dp and packing; what it does not combine with is refused
naming the field, the value and the fix; the packed budget and the world size are checked against cp."""

from __future__ import annotations

import pytest

from megatron_entcov.config import load_config

CP2 = ["parallel.context_parallel_size=2"]
TP4 = ["parallel.tensor_model_parallel_size=4", "model.num_query_groups=4"]


def test_context_parallelism_is_accepted_and_splits_the_world():
    cfg = load_config(None, CP2 + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                   "parallel.pipeline_model_parallel_size=2"]).resolve(16)
    assert cfg.parallel.data_parallel_size == 2                   # 16 / (tp 2 x pp 2 x cp 2)
    assert cfg.parallel.row_multiple == 4                         # lcm(2 cp, cp x tp): 4 chunks, halves of even length
    assert load_config(None, CP2 + TP4).parallel.row_multiple == 8
    assert load_config(None, CP2).parallel.row_multiple == 4
    assert load_config(None, TP4).parallel.row_multiple == 4       # cp 1: tp


def test_a_world_that_cp_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"context_parallel_size=4 is invalid: must divide the world size 6"):
        load_config(None, CP2 + ["parallel.tensor_model_parallel_size=2"]).resolve(6)


@pytest.mark.parametrize("settings,field,fix", [
    (["model.num_experts=4", "model.moe_router_topk=2", "model.moe_aux_loss_coeff=0.01"],
     r"model\.moe_aux_loss_coeff=0\.01", "set it to 0 with context parallelism"),
    (["parallel.context_parallel_comm_type=a2a", "model.num_attention_heads=3", "model.num_query_groups=1",
      "model.hidden_size=48"], r"parallel\.context_parallel_comm_type='a2a'", "use 'p2p' or 'all_gather'"),
])
def test_what_cp_does_not_combine_with_is_refused_with_the_fix(settings, field, fix):
    with pytest.raises(ValueError, match=field + ".* is invalid: .*" + fix):
        load_config(None, CP2 + settings)


def test_seq_mean_token_mean_and_the_interleaved_schedule_are_accepted_with_cp():
    # the per-sequence token counts come from the row layout (TokenSelection.seq_token_counts)
    assert load_config(None, CP2 + ["loss.agg=seq-mean-token-mean"]).loss.agg == "seq-mean-token-mean"
    vpp = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
           "model.num_layers=4"]
    assert load_config(None, CP2 + vpp).parallel.virtual_pipeline_model_parallel_size == 2
    assert load_config(None, CP2 + ["model.num_experts=4", "model.moe_router_topk=2"]).model.is_moe
    ep2 = ["model.num_experts=4", "model.moe_router_topk=2", "parallel.expert_model_parallel_size=2"]
    assert load_config(None, CP2 + ep2).resolve(2).parallel.expert_model_parallel_size == 2   # ep over cp ranks


def test_the_packed_budget_must_hold_the_padded_longest_sample_and_split_into_the_row_multiple():
    lengths = ["rollout.max_prompt_len=9", "sampling.max_new_tokens=8"]         # 17 tokens, padded to 20 at cp 2
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch=18 is invalid: .*padded to a multiple of "
                                         r"2 \* context_parallel_size: 20\); set it to >= 20"):
        load_config(None, CP2 + lengths + ["optim.max_tokens_per_micro_batch=18"])
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch=36 is invalid: must be a multiple of 8: .*"
                                         r"use 40"):
        load_config(None, CP2 + lengths + TP4 + ["optim.max_tokens_per_micro_batch=36"])
    cfg = load_config(None, CP2 + lengths + TP4 + ["optim.max_tokens_per_micro_batch=40"])
    assert cfg.optim.max_tokens_per_micro_batch == 40


def test_launched_servers_may_use_every_gpu_of_a_context_parallel_replica():
    servers = ["rollout.engine=sglang", "rollout.sglang.server_device=cuda", "rollout.sglang.num_servers=4",
               "rollout.sglang.sync_method=tensor"]
    load_config(None, CP2 + servers + ["parallel.tensor_model_parallel_size=2"])        # 4 GPUs: tp 2 x cp 2
    with pytest.raises(ValueError, match=r"context_parallel_size = 2; launch fewer"):
        load_config(None, CP2 + servers)
