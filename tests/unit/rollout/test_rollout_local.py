"""rollout/local.py: the embedded engine against a no-cache full-sequence recomputation on a tiny random model.

Tolerances: rollout log-probs vs the recomputation, 1e-5 absolute (float32; the batched, left-padded, cached
decode and the unpadded full forward differ only by summation order).
"""

import threading

import pytest
import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.rollout import LocalEngine, RolloutEngine, SamplingParams
from megatron_entcov.rollout.local import sample_tokens, truncate_logits

VOCAB = 96
QWEN = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                   vocab_size=VOCAB, max_position_embeddings=128, add_qkv_bias=True, tie_word_embeddings=True)
LLAMA = ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=4,
                    vocab_size=VOCAB, max_position_embeddings=128, add_qkv_bias=False, tie_word_embeddings=False)
PEAK = 15.0
# Different lengths in one batch: exercises left padding, position ids from the mask and the cache.
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24, 25]]


def make_engine(cfg=None, seed=0, peaked=None, **kw):
    """A random engine; `peaked` scales the final norm so that the logits have a std of about 2 (the random init
    at std 0.02 gives near-uniform logits, which would make the sampling checks vacuous)."""
    cfg = cfg or LLAMA
    # Not with tied embeddings: there the random model mostly copies its input token, and a sharper softmax
    # would make that certain.
    peaked = not cfg.tie_word_embeddings if peaked is None else peaked
    engine = LocalEngine(cfg, seed=seed, **kw)
    if peaked:
        with torch.no_grad():
            engine.model.model.norm.weight.mul_(PEAK)
    return engine


def recompute_logprobs(engine, sample, temperature):
    """log_softmax(logits / T) at the response tokens from one unpadded, uncached forward."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float() / temperature
    n_prompt = len(sample.prompt_ids)
    logits = logits[n_prompt - 1:-1]                # logits predicting each response token
    response = torch.tensor(sample.response_ids)
    return torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1), logits


def assert_logprobs_match(engine, samples, temperature):
    for s in samples:
        ref, _ = recompute_logprobs(engine, s, temperature)
        torch.testing.assert_close(torch.tensor(s.rollout_logprobs), ref, atol=1e-5, rtol=0,
                                   msg=lambda m: f"sample {s.index}: {m}")


def hf_state(engine):
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def test_protocol_and_fresh_state():
    engine = make_engine(peaked=False)
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 0
    health = engine.health()
    assert health["ok"] and health["weight_version"] == 0 and not health["weights_complete"]
    engine.close()
    assert not engine.health()["ok"]
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([[1]], SamplingParams())


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2-tied", "llama-untied"])
def test_logprobs_equal_full_recomputation(cfg):
    engine = make_engine(cfg)
    params = SamplingParams(temperature=0.8, max_new_tokens=12)
    samples = engine.generate(PROMPTS, params)
    assert [s.index for s in samples] == list(range(len(PROMPTS)))
    assert [s.prompt_ids for s in samples] == PROMPTS
    assert all(s.finish_reason == "length" and s.num_response_tokens == 12 for s in samples)
    assert_logprobs_match(engine, samples, 0.8)


def test_batches_split_and_stop_tokens_keep_logprobs_exact():
    # Several batches (max_batch_size=3), and common stop tokens so that rows leave the batch at different steps
    # (the cache rows are dropped): every remaining row must still match the recomputation.
    engine = make_engine(max_batch_size=3)
    params = SamplingParams(temperature=1.5, max_new_tokens=16, stop_token_ids=tuple(range(0, VOCAB, 7)))
    samples = engine.generate(PROMPTS * 2, params)
    assert_logprobs_match(engine, samples, 1.5)
    reasons = {s.finish_reason for s in samples}
    assert "stop" in reasons, reasons
    for s in samples:
        stops = [t for t in s.response_ids if t in params.stop_token_ids]
        if s.finish_reason == "stop":
            assert stops == [s.response_ids[-1]], s        # included, and only at the end
        else:
            assert not stops and s.num_response_tokens == 16


def test_greedy_is_argmax_of_recomputation():
    engine = make_engine()
    samples = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=10, temperature=0.5))
    for s in samples:
        _, logits = recompute_logprobs(engine, s, 0.5)
        assert logits.argmax(-1).tolist() == s.response_ids
    assert_logprobs_match(engine, samples, 0.5)


def test_stop_token_ends_one_sequence_others_run_to_length():
    engine = make_engine()
    greedy = SamplingParams(top_k=1, max_new_tokens=10)
    free = engine.generate(PROMPTS, greedy)
    # A token of prompt 0's greedy response that no other greedy response contains.
    others = {t for s in free[1:] for t in s.response_ids}
    k, stop = next((k, t) for k, t in enumerate(free[0].response_ids) if t not in others)
    stopped = engine.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=10, stop_token_ids=(stop,)))
    first = free[0].response_ids.index(stop)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].response_ids == free[0].response_ids[:first + 1]          # the stop token is included
    assert stopped[0].rollout_logprobs == pytest.approx(free[0].rollout_logprobs[:first + 1], abs=1e-6)
    for a, b in zip(stopped[1:], free[1:]):
        assert a.finish_reason == "length" and a.response_ids == b.response_ids
    assert k == first


def test_same_seed_same_samples_different_seed_different():
    params = SamplingParams(max_new_tokens=8, seed=7)
    a, b, c = make_engine(seed=3), make_engine(seed=3), make_engine(seed=3)
    first = a.generate(PROMPTS, params)
    assert first == b.generate(PROMPTS, params)
    # An explicit seed makes a call a pure function of (seed, weights, prompts): a resumed run repeats it.
    assert a.generate(PROMPTS, params) == first == b.generate(PROMPTS, params)
    # Without a seed the call counter advances: successive calls give fresh samples, identically on both.
    unseeded = SamplingParams(max_new_tokens=8)
    a1, b1 = a.generate(PROMPTS, unseeded), b.generate(PROMPTS, unseeded)
    a2, b2 = a.generate(PROMPTS, unseeded), b.generate(PROMPTS, unseeded)
    assert a1 == b1 and a2 == b2
    assert [s.response_ids for s in a1] != [s.response_ids for s in a2]
    other_seed = c.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=8))
    assert [s.response_ids for s in other_seed] != [s.response_ids for s in first]


def test_update_weights_matches_engine_built_with_those_weights():
    params = SamplingParams(max_new_tokens=8, seed=1)
    target = make_engine(seed=11)                    # the "trained" weights
    engine = make_engine(seed=0)
    before = engine.generate(PROMPTS, params)
    state = hf_state(target)
    names = list(state)
    buckets = [[(n, state[n].double()) for n in names[i:i + 5]] for i in range(0, len(names), 5)]
    target.update_weights(iter(state.items()), version=3)                        # pairs, lazily
    engine.update_weights((b for b in buckets), version=3)                       # buckets, lazily
    target.update_weights(state, version=3)                                      # a mapping
    assert engine.weight_version == target.weight_version == 3
    target.generate(PROMPTS, params)                                             # align call counters
    after, expected = engine.generate(PROMPTS, params), target.generate(PROMPTS, params)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    assert [s.weight_version for s in after] == [3] * len(PROMPTS)
    assert after == expected                        # same weights, seed and call history: bitwise equal
    assert engine.health()["weights_complete"]


def test_update_weights_checks_names_shapes_and_completeness():
    engine = make_engine(QWEN)
    state = hf_state(engine)
    with pytest.raises(ValueError, match="unknown tensor 'model.layers.9.mlp.up_proj.weight'"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(2))], version=1)
    bad = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(3, 64\)"):
        engine.update_weights([("model.layers.0.self_attn.q_proj.weight", bad)], version=1)
    # The rest of the iterable is still consumed (a producer running collectives on other ranks must finish),
    # but nothing after the bad tensor is loaded.
    consumed = []

    def producer():
        yield [("bogus", torch.zeros(1))]
        yield [("model.norm.weight", torch.full((64,), 7.0))]
        consumed.append(True)

    with pytest.raises(ValueError, match=r"unknown tensor 'bogus'.*1 more tensors"):
        engine.update_weights(producer(), version=1)
    assert consumed and not (engine.model.model.norm.weight == 7.0).any()
    with pytest.raises(ValueError, match="UNPADDED"):
        engine.update_weights([("model.embed_tokens.weight", torch.zeros(128, 64))], version=1)
    # A first sync that leaves parameters out is refused (and the version is unchanged) ...
    partial = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"never been set.*model\.norm\.weight"):
        engine.update_weights(partial, version=1)
    assert engine.weight_version == 0
    # ... a complete one (tied lm_head.weight is accepted and ignored) is not; later partial syncs are fine.
    engine.update_weights({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, version=1)
    engine.update_weights([("model.norm.weight", torch.ones(64))], version=2)
    assert engine.weight_version == 2
    with pytest.raises(ValueError, match="version"):
        engine.update_weights([], version=-1)
    with pytest.raises(TypeError, match="item 0"):
        engine.update_weights(["model.norm.weight"], version=3)


def test_untied_lm_head_is_a_parameter():
    engine = make_engine(LLAMA, peaked=False)
    state = hf_state(engine)
    assert "lm_head.weight" in state and "lm_head.weight" not in hf_state(make_engine(QWEN))
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    engine.update_weights(state, version=1)
    s = engine.generate([[1, 2]], SamplingParams(max_new_tokens=3))[0]
    assert s.rollout_logprobs == pytest.approx([-torch.log(torch.tensor(float(VOCAB))).item()] * 3, abs=1e-6)


def test_truncation_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    probs = torch.softmax(logits, -1)[0]             # order: 4 (.64), 0 (.24), 1 (.09), 2, 3
    keep = lambda out: (out[0] > float("-inf")).nonzero().squeeze(1).tolist()
    assert keep(truncate_logits(logits, top_k=2)) == [0, 4]
    assert keep(truncate_logits(logits, top_p=0.5)) == [4]
    assert keep(truncate_logits(logits, top_p=float(probs[4] + 0.01))) == [0, 4]
    assert keep(truncate_logits(logits, top_k=2, top_p=0.99)) == [0, 4]
    assert truncate_logits(logits) is logits
    torch.testing.assert_close(truncate_logits(logits, top_k=2)[0, [0, 4]], logits[0, [0, 4]])


def test_top_k_top_p_restrict_sampled_tokens():
    # Sampling from constructed logits: only kept tokens appear, with the renormalised frequencies, and the
    # reported log-probs are those of the untruncated temperature-scaled distribution.
    torch.manual_seed(0)
    logits = torch.randn(1, 20).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
    tokens, logprobs = sample_tokens(logits, params, gen)
    allowed = set((truncate_logits(logits[:1] / 0.7, 5, 0.8)[0] > float("-inf")).nonzero().squeeze(1).tolist())
    assert set(tokens.tolist()) == allowed and len(allowed) < 5
    full = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(logprobs, full.gather(-1, tokens[:, None]).squeeze(-1))
    kept = torch.tensor(sorted(allowed))
    expected = torch.softmax(full[0, kept], -1)
    observed = torch.bincount(tokens, minlength=20)[kept].float() / len(tokens)
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)

    # Through the engine: every sampled token is among the top-k of the recomputed logits.
    engine = make_engine()
    samples = engine.generate(PROMPTS, SamplingParams(top_k=3, max_new_tokens=10, temperature=2.0))
    for s in samples:
        _, recomputed = recompute_logprobs(engine, s, 2.0)
        third = recomputed.topk(3, -1).values[:, -1]
        picked = recomputed.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
        assert (picked >= third - 1e-5).all(), s
    assert_logprobs_match(engine, samples, 2.0)


def test_pause_aborts_in_flight_and_blocks_new_calls():
    engine = make_engine()
    calls = 0
    forward = engine._forward

    def pausing_forward(*args):
        nonlocal calls
        calls += 1
        if calls == 4:                               # prefill + 3 decode steps, then pause() "from elsewhere"
            engine.pause()
        return forward(*args)

    engine._forward = pausing_forward
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    assert {s.finish_reason for s in samples} == {"abort"}
    assert {s.num_response_tokens for s in samples} == {3}   # tokens from prefill + 2 decode steps
    assert_logprobs_match(engine, samples, 1.0)
    with pytest.raises(RuntimeError, match="paused"):
        engine.generate(PROMPTS, SamplingParams())
    engine.resume()
    assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0].finish_reason == "length"


def test_generate_from_another_thread():
    engine = make_engine()
    out = {}
    worker = threading.Thread(target=lambda: out.update(s=engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))))
    worker.start()
    worker.join(timeout=60)
    assert len(out["s"]) == len(PROMPTS)


def test_bad_prompts_raise():
    engine = make_engine(peaked=False)
    params = SamplingParams(max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], params)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 96\)"):
        engine.generate([[1, VOCAB]], params)
    with pytest.raises(ValueError, match="prompt 0 has 121 tokens"):
        engine.generate([[1] * 121], params)
    with pytest.raises(ValueError, match="prompt 0 is not a sequence of integer token ids"):
        engine.generate([[1, 2.5]], params)
    assert engine.generate([torch.tensor([1, 2])], params)[0].prompt_ids == [1, 2]
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[1]], {"max_new_tokens": 3})
    assert engine.generate([], params) == []


def test_random_init_is_a_function_of_seed_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (hf_state(LocalEngine(QWEN, seed=s)) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
