"""Per-request seeds (``generate(prompts, params, seeds=[...])``): an entry's sample is a function of its prompt,
its seed and the weights only, whatever the batching, order or split between calls, engines and replicas.

LocalEngine on a tiny random model: the same prompts and seeds give the same samples in one call, in reversed
order, split over two calls or two engines, interleaved with other prompts, with max_batch_size 1, 3 or 64, and
in a two-replica data-parallel split; the noise of entry i at response position t is exactly
``torch.rand(V)`` of a generator seeded with ``mix_seed(seeds[i], weight_version, t)`` (checked by hand against
a full recomputation); seeds=None keeps the per-call generator. Tokens, finish reasons and versions are compared
exactly; log-probs exactly where the batch layout is the same, else to 1e-5 absolute: a row's logits computed
next to other, padded rows differ from its logits alone in the last float32 bits (~1e-6), as the cached decode
and the full recomputation do in test_rollout_local.py.

SGLangEngine: the per-request ``sampling_seed`` of the payloads (protocol.request_seeds / generate_payloads)
and, through the fake server of conftest.py, what the engine sends and returns for the same splits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_entcov.config import ModelConfig, SGLangConfig
from megatron_entcov.rollout import LocalEngine, SamplingParams
from megatron_entcov.rollout.engine import validate_seeds
from megatron_entcov.rollout.local import sample_tokens
from megatron_entcov.rollout.sglang.protocol import generate_payloads, request_seed, request_seeds
from megatron_entcov.rollout.types import mix_seed

VOCAB = 96
CFG = ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=4,
                  vocab_size=VOCAB, max_position_embeddings=128, add_qkv_bias=False, tie_word_embeddings=False)
PEAK = 15.0
# Different lengths (left padding, the length sort) and repeats (the same prompt with different seeds).
BASE = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24, 25]]
PROMPTS = BASE * 2
SEEDS = [mix_seed(2024, i) for i in range(len(PROMPTS))]
# Common stop tokens: rows leave the batch at different steps, so the active rows' seeds must stay aligned.
PARAMS = SamplingParams(temperature=1.2, max_new_tokens=14, stop_token_ids=tuple(range(0, VOCAB, 9)))
ATOL = 1e-5


def make_engine(seed=0, **kw):
    """The random model with its final norm scaled so that logits have a std of about 2 (not near-uniform)."""
    engine = LocalEngine(CFG, seed=seed, **kw)
    with torch.no_grad():
        engine.model.model.norm.weight.mul_(PEAK)
    return engine


def copy_weights(src, dst, version=0):
    dst.update_weights({n: p.detach().clone() for n, p in src.model.named_parameters()}, version=version)


def assert_same(got, want, *, exact=False):
    """Same prompt, tokens, finish reason and version; log-probs bitwise (exact) or to ATOL."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.prompt_ids, g.response_ids, g.finish_reason, g.weight_version) == \
            (w.prompt_ids, w.response_ids, w.finish_reason, w.weight_version), (g, w)
        if exact:
            assert g.rollout_logprobs == w.rollout_logprobs, (g, w)
        else:
            np.testing.assert_allclose(g.rollout_logprobs, w.rollout_logprobs, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def engine():
    return make_engine()


@pytest.fixture(scope="module")
def reference(engine):
    return engine.generate(PROMPTS, PARAMS, seeds=SEEDS)


def test_reference_is_not_trivial(reference):
    # Rows stop at different steps, others run to the length limit; repeated prompts with their own seeds differ.
    lengths = [s.num_response_tokens for s in reference]
    assert {s.finish_reason for s in reference} == {"stop", "length"}
    assert len(set(lengths)) >= 4, lengths
    for a, b in zip(reference[:len(BASE)], reference[len(BASE):]):
        assert a.prompt_ids == b.prompt_ids and a.response_ids != b.response_ids
    assert [s.index for s in reference] == list(range(len(PROMPTS)))


def test_same_call_again_and_on_another_engine_is_bitwise_equal(engine, reference):
    assert_same(engine.generate(PROMPTS, PARAMS, seeds=SEEDS), reference, exact=True)
    # Another engine with the same weights (loaded by update_weights, as a replica gets them; its own random
    # init and call history differ) and the same version: bitwise the same.
    other = make_engine(seed=9)
    other.generate(PROMPTS[:2], PARAMS)                              # a different call counter
    copy_weights(engine, other)
    assert_same(other.generate(PROMPTS, PARAMS, seeds=SEEDS), reference, exact=True)
    # params.seed is not used when seeds are given.
    assert_same(engine.generate(PROMPTS, dataclasses.replace(PARAMS, seed=77), seeds=SEEDS), reference,
                exact=True)


def test_reversed_order(engine, reference):
    out = engine.generate(PROMPTS[::-1], PARAMS, seeds=SEEDS[::-1])
    assert [s.index for s in out] == list(range(len(PROMPTS)))          # indices are positions in this call
    assert_same(out[::-1], reference)


def test_split_over_calls_and_engines_and_replicas(engine, reference):
    half = len(PROMPTS) // 2
    first = engine.generate(PROMPTS[:half], PARAMS, seeds=SEEDS[:half])
    second_engine = make_engine(seed=5)
    copy_weights(engine, second_engine)
    second = second_engine.generate(PROMPTS[half:], PARAMS, seeds=SEEDS[half:])
    assert_same(first + second, reference)
    # Data-parallel layout: replica r generates entries r::2 on its own engine; together they give the same.
    replicas = [engine, second_engine]
    shares = [replicas[r].generate(PROMPTS[r::2], PARAMS, seeds=SEEDS[r::2]) for r in range(2)]
    merged = [None] * len(PROMPTS)
    merged[0::2], merged[1::2] = shares[0], shares[1]
    assert_same(merged, reference)
    # One entry at a time, and each entry next to unrelated prompts with their own seeds.
    assert_same([engine.generate([p], PARAMS, seeds=[s])[0] for p, s in zip(PROMPTS, SEEDS)], reference)
    noise = [[40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [60, 61], [70, 71, 72, 73]]
    for i in (0, 3, 6):
        out = engine.generate(noise + [PROMPTS[i]] + noise, PARAMS, seeds=[1, 2, 3, SEEDS[i], 4, 5, 6])
        assert_same([out[3]], [reference[i]])


@pytest.mark.parametrize("max_batch_size", [1, 3, 64])
def test_max_batch_size_does_not_matter(engine, reference, max_batch_size):
    other = make_engine(max_batch_size=max_batch_size)
    copy_weights(engine, other)
    assert_same(other.generate(PROMPTS, PARAMS, seeds=SEEDS), reference, exact=max_batch_size == 64)


def _hand_sample(engine, sample, seed, version, params):
    """The token at each response position from the full recomputation's logits and the documented noise:
    torch.rand(V) of a generator seeded with mix_seed(seed, version, t)."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float() / params.temperature
    logits = logits[len(sample.prompt_ids) - 1:-1]
    tokens = []
    for t in range(len(sample.response_ids)):
        u = torch.rand(VOCAB, generator=torch.Generator().manual_seed(mix_seed(seed, version, t)))
        u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
        tokens.append(int((logits[t] - torch.log(-torch.log(u))).argmax()))
    ref_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)
    return tokens, ref_lp


def test_noise_is_a_function_of_seed_version_and_position(reference):
    params = SamplingParams(temperature=1.2, max_new_tokens=10)         # no stops: every position checked
    eng = make_engine()
    for version in (0, 3):
        copy_weights(eng, eng, version=version)                          # same weights, new version
        samples = eng.generate(PROMPTS, params, seeds=SEEDS)
        for s, seed in zip(samples, SEEDS):
            tokens, ref_lp = _hand_sample(eng, s, seed, version, params)
            assert s.response_ids == tokens, (version, s.index)
            np.testing.assert_allclose(s.rollout_logprobs, ref_lp.numpy(), atol=ATOL, rtol=0)
        if version == 0:
            at_v0 = samples
    # The version is part of the seed: the same weights under another version sample differently.
    assert [s.response_ids for s in samples] != [s.response_ids for s in at_v0]


def test_different_seeds_differ_same_seed_repeats():
    eng = make_engine()
    params = SamplingParams(max_new_tokens=8)
    out = eng.generate([BASE[3]] * 8, params, seeds=list(range(8)))
    assert len({tuple(s.response_ids) for s in out}) == 8
    again = eng.generate([BASE[3]] * 3, params, seeds=[5, 5, 5])
    assert all(s.response_ids == out[5].response_ids for s in again)
    shifted = eng.generate([BASE[3]] * 8, params, seeds=list(range(1, 9)))
    assert [s.response_ids for s in shifted[:7]] == [s.response_ids for s in out[1:]]


def test_greedy_ignores_seeds(engine):
    greedy = SamplingParams(top_k=1, max_new_tokens=8)
    assert_same(engine.generate(PROMPTS, greedy, seeds=SEEDS), engine.generate(PROMPTS, greedy), exact=True)


def test_top_k_top_p_with_seeds_stay_batch_independent(engine):
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=10)
    ref = engine.generate(PROMPTS, params, seeds=SEEDS)
    assert_same(engine.generate(PROMPTS[::-1], params, seeds=SEEDS[::-1])[::-1], ref)
    assert_same([engine.generate([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, SEEDS)], ref)


def test_without_seeds_one_generator_per_call_as_before():
    """seeds=None: one generator seeded mix_seed(params.seed, version) (else (engine seed, version, call)) draws
    the [B, V] noise of the batch (sorted by length) at each step; checked by hand on two equal-length prompts."""
    eng = make_engine(seed=4)
    params = SamplingParams(temperature=1.2, max_new_tokens=6, seed=11)
    prompts = [[5, 6, 7], [8, 9, 10]]

    def by_hand(samples, generator_seed):
        gen = torch.Generator().manual_seed(generator_seed)
        logits = []
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            with torch.no_grad():
                logits.append(eng.model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1].float() / 1.2)
        out = [[], []]
        for t in range(6):
            u = torch.rand((2, VOCAB), generator=gen)
            u.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - torch.finfo(torch.float32).eps)
            for r in range(2):
                out[r].append(int((logits[r][t] - torch.log(-torch.log(u[r]))).argmax()))
        return out

    seeded = eng.generate(prompts, params)
    assert [s.response_ids for s in seeded] == by_hand(seeded, mix_seed(11, 0))
    unseeded = eng.generate(prompts, SamplingParams(temperature=1.2, max_new_tokens=6))
    assert [s.response_ids for s in unseeded] == by_hand(unseeded, mix_seed(4, 0, 1))    # second call: counter 1
    assert eng.health()["num_calls"] == 2
    # And per-entry seeds differ from it (they do not reuse the call's generator).
    assert [s.response_ids for s in eng.generate(prompts, params, seeds=[11, 11])] != \
        [s.response_ids for s in seeded]


def test_sample_tokens_row_seeds():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB) * 2
    params = SamplingParams()
    seeds = [mix_seed(1, r) for r in range(4)]
    tokens, logprobs = sample_tokens(logits, params, row_seeds=seeds)
    for r in range(4):                       # each row alone, and next to other rows in another order
        t, lp = sample_tokens(logits[r:r + 1], params, row_seeds=[seeds[r]])
        assert int(t) == int(tokens[r]) and float(lp) == float(logprobs[r])
    perm = [2, 0, 3, 1]
    t, _ = sample_tokens(logits[perm], params, torch.Generator(), row_seeds=[seeds[r] for r in perm])
    assert t.tolist() == tokens[perm].tolist()
    u = torch.rand(VOCAB, generator=torch.Generator().manual_seed(seeds[2]))
    assert int(tokens[2]) == int((logits[2] - torch.log(-torch.log(u))).argmax())
    with pytest.raises(ValueError, match="3 row_seeds for 4 rows"):
        sample_tokens(logits, params, row_seeds=seeds[:3])


def test_bad_seeds_raise(engine):
    p = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"seeds has 1 entries for 2 prompt entries; pass exactly one seed per"):
        engine.generate([[1], [2]], p, seeds=[3])
    with pytest.raises(ValueError, match=r"seeds\[1\]=-1 is invalid: every seed must be an integer >= 0"):
        engine.generate([[1], [2]], p, seeds=[3, -1])
    for bad in (2.0, True, "7", None):
        with pytest.raises(ValueError, match=r"seeds\[0\]=.* is invalid"):
            engine.generate([[1]], p, seeds=[bad])
    with pytest.raises(ValueError, match=r"seeds is a str; pass a sequence of integers"):
        engine.generate([[1]], p, seeds="1")
    with pytest.raises(ValueError, match=r"seeds has 1 entries for 0 prompt entries"):
        engine.generate([], p, seeds=[1])
    assert engine.generate([], p, seeds=[]) == []
    # numpy and torch integers are fine, and give the same as Python ints.
    a = engine.generate([[1, 2], [3]], p, seeds=np.array([7, 8]))
    b = engine.generate([[1, 2], [3]], p, seeds=torch.tensor([7, 8]))
    c = engine.generate([[1, 2], [3]], p, seeds=(7, 8))
    assert_same(a, c, exact=True)
    assert_same(b, c, exact=True)
    assert validate_seeds(None, 3) is None and validate_seeds(range(2), 2) == [0, 1]


# ---------------------------------------------------------------------------------------------------- SGLang


def test_sglang_payload_seeds():
    params = SamplingParams(max_new_tokens=4, seed=3)
    # With seeds: request_seed(seeds[i]), whatever the position, the call's base or the split.
    payloads = generate_payloads(PROMPTS, params, base=123, seeds=SEEDS)
    assert [q["sampling_params"]["sampling_seed"] for q in payloads] == [request_seed(s) for s in SEEDS]
    assert [q["input_ids"] for q in payloads] == PROMPTS
    assert generate_payloads(PROMPTS[::-1], params, base=5, seeds=SEEDS[::-1]) == payloads[::-1]
    assert generate_payloads(PROMPTS[3:], params, base=9, seeds=SEEDS[3:]) == payloads[3:]
    assert all(0 <= s < 2 ** 31 for s in request_seeds(len(SEEDS), base=0, seeds=SEEDS))
    # Repeated prompts get different seeds; without seeds, mixed from the base and the index, as before.
    assert payloads[0]["sampling_params"]["sampling_seed"] != payloads[len(BASE)]["sampling_params"]["sampling_seed"]
    assert request_seeds(3, base=123) == [request_seed(123, i) for i in range(3)]
    assert [q["sampling_params"]["sampling_seed"] for q in generate_payloads(PROMPTS, params, base=123)] == \
        [request_seed(123, i) for i in range(len(PROMPTS))]
    with pytest.raises(ValueError, match="seeds has 2 entries for 3 prompt entries"):
        request_seeds(3, base=0, seeds=[1, 2])


def _fake_generate(body):
    """A deterministic stand-in for a server's sampler: the output is a function of the prompt and the seed."""
    seed, ids = body["sampling_params"]["sampling_seed"], body["input_ids"]
    out = [(seed + 7 * k + sum(ids)) % VOCAB for k in range(body["sampling_params"]["max_new_tokens"])]
    return {"output_ids": out, "meta_info": {"output_token_logprobs": [[-(seed % 1000) / 1000, t, None] for t in out],
                                             "finish_reason": {"type": "length"}, "weight_version": "0"}}


def test_sglang_engine_sends_request_seeds(fake_server):
    from megatron_entcov.rollout.sglang import SGLangEngine

    servers = [fake_server(routes={"/generate": _fake_generate}) for _ in range(2)]
    one = SGLangEngine(CFG, SGLangConfig(server_urls=[servers[0].url], max_inflight=4), seed=1)
    two = SGLangEngine(CFG, SGLangConfig(server_urls=[servers[1].url], max_inflight=4), seed=2)
    try:
        params = SamplingParams(max_new_tokens=3)
        ref = one.generate(PROMPTS, params, seeds=SEEDS)
        sent = {tuple(b["input_ids"]) + (b["sampling_params"]["sampling_seed"],) for b in servers[0].bodies("/generate")}
        assert sent == {tuple(p) + (request_seed(s),) for p, s in zip(PROMPTS, SEEDS)}
        assert [s.index for s in ref] == list(range(len(PROMPTS)))
        # Reversed, and split between two engines (two replicas with their own servers, seeds and call counts).
        assert_same(one.generate(PROMPTS[::-1], params, seeds=SEEDS[::-1])[::-1], ref, exact=True)
        shares = [e.generate(PROMPTS[r::2], params, seeds=SEEDS[r::2]) for r, e in enumerate((one, two))]
        merged = [None] * len(PROMPTS)
        merged[0::2], merged[1::2] = shares
        assert_same(merged, ref, exact=True)
        # Without seeds: request_seed(params.seed, i), as before.
        servers[0].requests.clear()
        one.generate(PROMPTS[:3], SamplingParams(max_new_tokens=3, seed=42))
        assert sorted(b["sampling_params"]["sampling_seed"] for b in servers[0].bodies("/generate")) == \
            sorted(request_seed(42, i) for i in range(3))
        # Bad seeds raise before anything is sent.
        servers[0].requests.clear()
        with pytest.raises(ValueError, match=r"seeds\[2\]=-5 is invalid"):
            one.generate(PROMPTS[:3], params, seeds=[1, 2, -5])
        assert servers[0].bodies("/generate") == []
    finally:
        one.close()
        two.close()
