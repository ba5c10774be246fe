"""Routing replay from the rollout (model.moe_routing_source=rollout): the old-log-prob forward and the training
forwards route every token by the experts the rollout engine chose for it.

Samples of a tiny Qwen3-MoE (every layer MoE, untied: what SGLang serves) come from SGLangEngine talking to a
stand-in SGLang server (tests/sglang_stand_in.py: /generate with ``meta_info.routed_experts`` in SGLang's own
encoding; SGLang cannot serve Qwen3-MoE on CPU). Three runs of old log-probs + one training step per mini-batch:

- 'own': the old_logprob source on those samples (their routing is not used);
- 'same': the rollout source, the stand-in answering each prompt with the routing 'own' recorded for its tokens
  (mapped back to positions here by Megatron's s-major order) -> the same log-probs and updated weights, bit for bit;
- 'forced': the rollout source, the stand-in's routing drawn at random (mostly unlike the router's own) -> the
  log-probs equal a float64 transformers forward of the same weights whose routers are forced to those experts
  (the last token of each sample, which has no rollout row, routed by its own top-k), and not its unforced forward.

In every run the first mini-batch's training forward gives exactly the old log-probs (it replays what the
old-log-prob forward routed by). 'forced' also runs packed, and (slow) at tp2 with sequence parallelism (each
rank's router sees half of each packed row: log-probs equal to one process) and at pp2 (each stage holds one of
the layers: log-probs and updated weights equal to one process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_utils import run_workers, tiny_model

pytestmark = pytest.mark.distributed

MODEL = tiny_model(qk_layernorm=True, kv_channels=16, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                   tie_word_embeddings=False)
BASE = MODEL + ["rollout.engine=sglang", "model.moe_routing_replay=true", "rollout.prompts_per_step=4",
                "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=8", "sampling.max_new_tokens=6",
                "optim.micro_batch_size=2", "optim.num_mini_batches=2", "optim.lr=0.2", "optim.clip_grad=0",
                "optim.optimizer=sgd"]
ROLLOUT = ["model.moe_routing_source=rollout"]
PACKED = ["optim.max_tokens_per_micro_batch=16"]
PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(1, 32, size=3 + i % 6)] for i in range(8)]
LAYERS, TOPK, EXPERTS = 2, 2, 4


def _answer_tokens(prompt):
    rng = np.random.default_rng(1000 + sum(prompt) * 7 + len(prompt))
    return [int(t) for t in rng.integers(1, 32, size=2 + sum(prompt) % 5)]


def _random_routing(prompt, out):
    rng = np.random.default_rng(2000 + sum(prompt))
    rows = (len(prompt) + len(out) - 1) * LAYERS
    return np.stack([rng.permutation(EXPERTS)[:TOPK] for _ in range(rows)]).reshape(-1, LAYERS, TOPK).astype(np.int32)


def _samples(cfg, table=None):
    """The engine's samples from a stand-in server: random routing, or ``table[prompt]``."""
    from script_modules import load_script
    from sglang_stand_in import FAKE_SERVER_PATH, StandInGenerate

    from megatron_entcov.config import SGLangConfig
    from megatron_entcov.rollout import SamplingParams
    from megatron_entcov.rollout.sglang.engine import SGLangEngine

    def answer(prompt):
        out = _answer_tokens(prompt)
        return out, (_random_routing(prompt, out) if table is None else table[tuple(prompt)])

    server = load_script("rollout_fake_server", FAKE_SERVER_PATH).FakeServer(routes={"/generate": StandInGenerate(answer)})
    engine = SGLangEngine(cfg.model, SGLangConfig(server_urls=[server.url]), max_retries=0)
    try:
        return engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    finally:
        engine.close()
        server.stop()


def _positions(recorded, samples, micro_batch_size):
    """Per sample, the routing ``recorded`` (per router, per padded micro-batch [T * b, k]) gave each of its
    tokens but the last, [tokens - 1, layers, k]: router token s * b + j is row j's position s."""
    out = []
    for i, s in enumerate(samples):
        mb, j = divmod(i, micro_batch_size)
        n = len(s.prompt_ids) + len(s.response_ids) - 1
        per_layer = [layer[mb].reshape(-1, micro_batch_size, TOPK)[:n, j] for layer in recorded]
        out.append(np.stack(per_layer, axis=1).astype(np.int32))
    return out


def _run(cfg, ps, hf_dir, samples):
    """Old log-probs (recording the routing), then one training step per mini-batch."""
    from megatron_entcov.policy.actor import Actor
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.policy.model import check_loaded
    from megatron_entcov.weights.shards import iter_hf_weights, load_hf_weights

    actor = Actor(cfg, ps, temperature=1.0, load_weights=True)
    load_hf_weights(actor.chunks, cfg.model, hf_dir, ps)
    check_loaded(actor.chunks, "the test's weights")
    actor.optimizer.reload_model_params()
    advantages = torch.tensor([(-1.0) ** i for i in range(len(samples))])
    batch = rows_from_samples(samples, advantages, pad_id=0, sample_ids=list(range(len(samples))), key_stride=16,
                              multiple_of=ps.tp_size, device=ps.device)
    batch.old_logprobs, _ = actor.logprobs(batch, parts=2, record_routing=True)
    replay = actor.routing_replay
    tokens = float(batch.loss_mask.sum())

    def loss_fn(mb, logprobs, entropy):
        gap = ((logprobs - mb.old_logprobs).abs() * mb.loss_mask).sum().detach()
        return -(mb.advantages * logprobs * mb.loss_mask).sum() / tokens, {"gap": gap}

    gaps = []
    for part, mini in enumerate(batch.split(2)):
        actor.use_recorded_routing(part)
        gaps.append(actor.train_step(mini, loss_fn).metrics.get("gap"))
    actor.use_recorded_routing(None)
    weights = {n: t.detach().double().numpy().copy() for bucket in iter_hf_weights(actor.chunks, cfg.model, ps)
               for n, t in bucket}
    lp = None if batch.old_logprobs is None else batch.old_logprobs.numpy().copy()
    return {"logprobs": lp, "mask": batch.loss_mask.numpy().copy(), "gaps": gaps, "weights": weights,
            "recorded": [[t.numpy().copy() for t in layer.recorded] for layer in replay.layers],
            "rollout_share": float(replay.rollout_changed) / max(float(replay.rollout_routed), 1.0)}


def _worker(rank, world_size, layouts, hf_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel

    out, ps = {}, None
    for name, overrides in layouts.items():
        cfg = load_config(None, BASE + overrides + [f"model.hf_dir={hf_dir}"]).resolve(world_size)
        ps = ps or init_parallel(cfg.parallel, seed=cfg.seed)
        if name == "same":                   # the rollout's routing = what 'own' routed each token by
            own = _samples(cfg)
            table = {tuple(s.prompt_ids): r for s, r in zip(own, _positions(out["own"]["recorded"], own, 2))}
            samples = _samples(cfg, table)
        else:
            samples = _samples(cfg)
        out[name] = _run(cfg, ps, hf_dir, samples)
        out[name]["samples"] = [s.to_dict() for s in samples]
    return out


def _hf_logprobs(hf_dir, samples, forced: bool):
    """float64 transformers log-probs of each sample's response tokens, the routers forced to the samples'
    routing (the last token: its own top-k) or left alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    model.set_experts_implementation("eager")      # torch's grouped_mm refuses float64
    current = [None]

    def gate_forward(hidden, gate, layer):
        logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
        probs = logits.softmax(-1)
        indices = probs.topk(gate.top_k, dim=-1).indices
        if current[0] is not None:
            rows = torch.from_numpy(current[0][:, layer]).long()
            indices = torch.cat([rows, indices[len(rows):]])
        top = probs.gather(1, indices)
        return logits, top / top.sum(-1, keepdim=True), indices

    for i, block in enumerate(model.model.layers):
        block.mlp.gate.forward = lambda h, g=block.mlp.gate, i=i: gate_forward(h, g, i)
    out = []
    with torch.no_grad():
        for s in samples:
            current[0] = s.routed_experts if forced else None
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logp = model(ids).logits[0].log_softmax(-1)
            p = len(s.prompt_ids)
            out.append(logp[p - 1:-1].gather(1, ids[0, p:, None])[:, 0].numpy())
    return out


def _response_logprobs(run, samples):
    return [run["logprobs"][i][run["mask"][i]] for i in range(len(samples))]


ONE_PROCESS = {"own": [], "same": ROLLOUT, "forced": ROLLOUT, "forced_packed": ROLLOUT + PACKED}
TWO_PROCESSES = {"tp2": {"forced": ROLLOUT + PACKED + ["parallel.tensor_model_parallel_size=2",
                                                      "parallel.sequence_parallel=true"]},
                 "pp2": {"forced": ROLLOUT + ["parallel.pipeline_model_parallel_size=2"]}}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config import load_config
    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.tasks.tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("rollout_routing") / "hf"
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(to_hf_config(load_config(None, BASE).model))
    with torch.no_grad():                # routers far from uniform: the experts chosen matter
        for block in model.model.layers:
            block.mlp.gate.weight.mul_(20.0)
    model.save_pretrained(path)
    build_char_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def runs(hf_dir):
    return run_workers(_worker, 1, args=(ONE_PROCESS, hf_dir), timeout=400)[0]


def _samples_of(run):
    from megatron_entcov.rollout.types import Sample

    return [Sample.from_dict(d) for d in run["samples"]]


def test_the_rollout_source_with_the_policys_own_routing_is_the_old_logprob_source_bit_for_bit(runs):
    own, same = runs["own"], runs["same"]
    assert same["rollout_share"] == 0.0          # every rollout row agreed with the router's own choice
    np.testing.assert_array_equal(same["logprobs"], own["logprobs"])
    for a, b in zip(same["recorded"], own["recorded"]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    for name, expected in own["weights"].items():
        np.testing.assert_array_equal(same["weights"][name], expected, err_msg=name)


@pytest.fixture(scope="module")
def reference(runs, hf_dir):
    """transformers' log-probs of the 'forced' runs' samples (the same in both: the stand-in's answers), with the
    routers forced to the rollout's experts and left alone."""
    samples = _samples_of(runs["forced"])
    return _hf_logprobs(hf_dir, samples, True), _hf_logprobs(hf_dir, samples, False)


@pytest.mark.parametrize("name", ["forced", "forced_packed"])
def test_the_old_logprobs_route_by_the_rollouts_experts(runs, reference, name):
    run = runs[name]
    samples = _samples_of(run)
    assert all(s.routed_experts is not None for s in samples)
    assert run["samples"] == runs["forced"]["samples"]
    assert run["rollout_share"] > 0.5            # the stand-in's routing is mostly unlike the router's own
    got = _response_logprobs(run, samples)
    forced, free = reference
    for i, (g, f, u) in enumerate(zip(got, forced, free)):
        np.testing.assert_allclose(g, f, atol=5e-5, rtol=0, err_msg=f"{name}: sample {i}")
    assert max(np.abs(g - u).max() for g, u in zip(got, free)) > 1e-3      # the routing made a difference (20x)


@pytest.mark.parametrize("name", list(ONE_PROCESS))
def test_the_first_training_forward_replays_exactly_what_the_old_logprobs_routed_by(runs, name):
    assert runs[name]["gaps"][0] == 0.0, runs[name]["gaps"]
    assert runs[name]["gaps"][1] > 0.0           # the second mini-batch sees the first update


def test_the_samples_carry_the_stand_ins_routing(runs):
    for s in _samples_of(runs["forced"]):
        np.testing.assert_array_equal(s.routed_experts, _random_routing(s.prompt_ids, s.response_ids))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TWO_PROCESSES))
def test_tensor_and_pipeline_parallel_layouts_route_as_one_process(runs, hf_dir, layout):
    results = run_workers(_worker, 2, args=(TWO_PROCESSES[layout], hf_dir), timeout=400)
    got = next(r["forced"] for r in results if r["forced"]["logprobs"] is not None and
               (layout != "pp2" or r["forced"]["recorded"]))
    ref = runs["forced_packed" if layout == "tp2" else "forced"]
    assert got["gaps"][0] == 0.0
    mask = ref["mask"]
    np.testing.assert_allclose(got["logprobs"][:, :mask.shape[1]][mask], ref["logprobs"][mask], atol=2e-5, rtol=0)
    weights = results[0]["forced"]["weights"]
    for name, expected in ref["weights"].items():
        np.testing.assert_allclose(weights[name], expected, atol=2e-5, rtol=1e-4, err_msg=f"{layout}: {name}")
