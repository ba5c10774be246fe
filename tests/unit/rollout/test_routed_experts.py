"""The rollout's routing (model.moe_routing_source=rollout): what the SGLang engine asks for and decodes, how it
travels (Sample.to_dict), how it becomes training rows (policy/batch.py) and each router's token layout
(policy/routing_replay.py rollout_routing).

The stand-in server (tests/sglang_stand_in.py on conftest.py's fake server) answers /generate with SGLang's own
encoding of ``meta_info.routed_experts`` (base64 of the int32 bytes of [prompt + output - 1, layers, top-k]); the
engine's samples must hold exactly the arrays it sent. The layouts are checked against loops written out here
(Megatron routes [s, b] flattened s-major; sequence parallelism gives each tensor-parallel rank a slice of s).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sglang_stand_in import StandInGenerate, encode_routed_experts

from megatron_entcov.config import ModelConfig, SGLangConfig, load_config
from megatron_entcov.policy.batch import rows_from_samples
from megatron_entcov.policy.packing import micro_batches
from megatron_entcov.policy.routing_replay import rollout_routing
from megatron_entcov.rollout import SamplingParams
from megatron_entcov.rollout.sglang.engine import SGLangEngine
from megatron_entcov.rollout.sglang.http import ServerError
from megatron_entcov.rollout.sglang.protocol import RoutingSpec, decode_routed_experts
from megatron_entcov.rollout.sglang.server import server_launch_args
from megatron_entcov.rollout.types import Sample

LAYERS, TOPK, EXPERTS = 3, 2, 6
MOE = ModelConfig(num_layers=LAYERS, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=40, max_position_embeddings=64, num_experts=EXPERTS, moe_router_topk=TOPK,
                  moe_routing_replay=True, moe_routing_source="rollout", tie_word_embeddings=False)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
PARAMS = SamplingParams(max_new_tokens=5)


def _answer(prompt):
    """Output tokens and a routing drawn from the prompt (different lengths; every expert id used)."""
    rng = np.random.default_rng(sum(prompt) * 31 + len(prompt))
    out = [int(t) for t in rng.integers(0, 40, size=1 + len(prompt) % 4)]
    routing = np.stack([rng.permutation(EXPERTS)[:TOPK] for _ in range((len(prompt) + len(out) - 1) * LAYERS)])
    return out, routing.reshape(len(prompt) + len(out) - 1, LAYERS, TOPK).astype(np.int32)


def _engine(fake_server, model_cfg=MOE, answer=_answer):
    route = StandInGenerate(answer)
    server = fake_server(routes={"/generate": route})
    return SGLangEngine(model_cfg, SGLangConfig(server_urls=[server.url], max_inflight=2), max_retries=0), server, route


def test_the_engine_asks_for_the_routing_and_decodes_it_bit_for_bit(fake_server):
    engine, server, route = _engine(fake_server)
    try:
        samples = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.close()
    assert all(body["return_routed_experts"] is True for body in server.bodies("/generate"))
    for prompt, s in zip(PROMPTS, samples):
        sent = route.sent[tuple(prompt)]
        assert s.routed_experts.dtype == np.int32 and s.routed_experts.shape == sent.shape
        assert s.routed_experts.shape == (len(prompt) + len(s.response_ids) - 1, LAYERS, TOPK)
        np.testing.assert_array_equal(s.routed_experts, sent)
        back = Sample.from_dict(s.to_dict())        # how samples travel between ranks
        np.testing.assert_array_equal(back.routed_experts, sent)
        assert back.routed_experts.dtype == np.int32 and back == s


def test_without_the_rollout_source_nothing_is_asked_and_samples_carry_none(fake_server):
    cfg = dataclasses.replace(MOE, moe_routing_source="old_logprob")
    engine, server, _ = _engine(fake_server, cfg)
    try:
        samples = engine.generate(PROMPTS, PARAMS)
    finally:
        engine.close()
    assert all("return_routed_experts" not in body for body in server.bodies("/generate"))
    assert all(s.routed_experts is None for s in samples)
    assert "routed_experts" not in samples[0].to_dict() and Sample.from_dict(samples[0].to_dict()) == samples[0]


def test_launched_servers_get_the_flag_only_for_the_rollout_source():
    flag = "--enable-return-routed-experts"
    assert flag in server_launch_args(SGLangConfig(), MOE, "cpu", python="py")["extra_args"]
    other = dataclasses.replace(MOE, moe_routing_source="old_logprob")
    assert flag not in server_launch_args(SGLangConfig(), other, "cpu", python="py")["extra_args"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r[:, :LAYERS - 1], r"not the int32 array \[\d+, 3, 2\].*model.num_layers"),
    (lambda r: np.where(r == 0, EXPERTS, r), r"outside \[0, model.num_experts=6\)"),
    (lambda r: None, "no meta_info.routed_experts.*--enable-return-routed-experts"),
])
def test_a_routing_that_does_not_fit_the_model_is_refused(fake_server, change, message):
    def answer(prompt):
        out, routing = _answer(prompt)
        return out, change(routing)

    engine, _, _ = _engine(fake_server, answer=answer)
    try:
        with pytest.raises(ServerError, match=message):
            engine.generate(PROMPTS[:1], PARAMS)
    finally:
        engine.close()


def test_decode_reads_sglangs_bytes():
    routing = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2) % 5
    got = decode_routed_experts(encode_routed_experts(routing), 2, RoutingSpec(3, 2, 5), where="x")
    np.testing.assert_array_equal(got, routing)
    with pytest.raises(ServerError, match="not base64"):
        decode_routed_experts("@@@", 2, RoutingSpec(3, 2, 5), where="x")


def test_the_config_names_what_the_rollout_source_needs():
    moe = ["model.num_experts=4", "model.tie_word_embeddings=false", "model.moe_routing_replay=true"]
    with pytest.raises(ValueError, match="model.moe_routing_source='rollout' is invalid.*moe_routing_replay=true"):
        load_config(None, ["model.num_experts=4", "model.moe_routing_source=rollout"])
    with pytest.raises(ValueError, match="model.moe_routing_source='rollout' is invalid.*rollout.engine='local'"):
        load_config(None, moe + ["model.moe_routing_source=rollout"])
    cfg = load_config(None, moe + ["model.moe_routing_source=rollout", "rollout.engine=sglang"])
    assert cfg.model.moe_routing_source == "rollout"
    assert load_config(None, moe).model.moe_routing_source == "old_logprob"


def _samples(with_routing=(True, True, False, True)):
    out = []
    for i, (prompt, routed) in enumerate(zip(PROMPTS, with_routing)):
        response, routing = _answer(prompt)
        out.append(Sample(prompt_ids=prompt, response_ids=response, rollout_logprobs=[0.0] * len(response),
                          finish_reason="length", weight_version=0, index=i, routed_experts=routing if routed else None))
    return out


def _batch(multiple_of=1):
    samples = _samples()
    return samples, rows_from_samples(samples, torch.ones(len(samples)), pad_id=0, sample_ids=list(range(4)),
                                      key_stride=16, device="cpu", multiple_of=multiple_of)


def test_training_rows_hold_each_tokens_rollout_experts_and_minus_one_elsewhere():
    samples, batch = _batch()
    routed = batch.routed_experts
    assert routed.dtype == torch.int16 and routed.shape == (4, batch.input_ids.shape[1], LAYERS, TOPK)
    for i, s in enumerate(samples):
        n = len(s.prompt_ids) + len(s.response_ids)
        if s.routed_experts is None:
            assert (routed[i] == -1).all()
            continue
        np.testing.assert_array_equal(routed[i, :n - 1].numpy(), s.routed_experts)
        assert (routed[i, n - 1:] == -1).all()           # the last token and the padding have no rollout row
    assert torch.equal(batch.split(2)[1].routed_experts, routed[2:])
    odd = dataclasses.replace(samples[0], routed_experts=samples[0].routed_experts[:, :, :1].copy())
    with pytest.raises(ValueError, match="different \\[layers, top-k\\]"):
        rows_from_samples([odd, samples[1]], torch.ones(2), pad_id=0, sample_ids=[0, 1], key_stride=16, device="cpu")


def test_a_sample_refuses_routing_of_the_wrong_length():
    s = _samples()[0]
    with pytest.raises(ValueError, match="routed_experts.*prompt \\+ response tokens - 1"):
        dataclasses.replace(s, routed_experts=s.routed_experts[1:])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_each_router_gets_its_tokens_in_megatrons_order(packed, tp):
    """Padded [b, T] rows: router token s * b + j is row j's position s; packed [1, L]: token s is the packed
    row's position s; sequence parallelism: rank r routes positions [r * s / tp, (r + 1) * s / tp)."""
    _, batch = _batch(multiple_of=tp)
    micro = micro_batches(batch, micro_batch_size=2, max_tokens=12 if packed else 0, multiple_of=tp)
    layer_numbers = [3, 1]                               # e.g. a stage's routers, not in model order
    routing = batch.routed_experts
    for rank in range(tp):
        got = rollout_routing(micro, routing, layer_numbers, tp_rank=rank, tp_size=tp, sequence_parallel=tp > 1)
        assert len(got) == len(micro)
        for mb, tokens in zip(micro, got):
            expected = []
            if mb.flat_index is None:
                rows = list(range(batch.num_rows))[mb.rows]
                t = batch.input_ids.shape[1]
                for s in range(rank * t // tp, (rank + 1) * t // tp):
                    for r in rows:
                        expected.append([routing[r, s, n - 1].tolist() for n in layer_numbers])
            else:
                length = len(mb.flat_index)
                for pos in mb.flat_index[rank * length // tp:(rank + 1) * length // tp].tolist():
                    r, s = divmod(pos, batch.input_ids.shape[1])
                    expected.append([routing[r, s, n - 1].tolist() if r < batch.num_rows else [-1] * TOPK
                                     for n in layer_numbers])
            assert tokens.tolist() == expected
