"""Qwen3 (dense, per-head q/k RMSNorm, explicit head_dim) and Qwen3-MoE (experts, top-k with norm_topk_prob, a dense
layer from mlp_only_layers) on CPU with gloo: tiny random models made with transformers, saved, converted, loaded
by the trainer's builders at several layouts.

One spawn of 4 ranks runs every layout (a spawn costs ~10 s of imports): HF -> Megatron (the converter), load at
the layout, the trainer's log-probs and entropies (ops.vocab_parallel over the pipeline schedule) against a
float64 transformers forward, re-save at that layout; the weight sync's tensors (iter_hf_weights, 'all' and
'generator') against the HF state dict. The parent exports each re-saved checkpoint to HF, compares every tensor
with torch.equal, and loads one export with transformers.

Tolerance: float32 Megatron vs float64 transformers: 2e-5 absolute on log-probs and entropies (observed ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import read_safetensors, run_workers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

B, T, VOCAB = 2, 12, 96
TOL = 2e-5
DENSE_LAYOUTS = [dict(tp=1), dict(tp=2), dict(tp=2, pp=2)]
MOE_LAYOUTS = [dict(ep=1), dict(ep=2), dict(tp=2, ep=2), dict(ep=2, pp=2)]


def _name(layout: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(layout.items()))


def _make_hf_model(kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    if kind == "dense":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, tie_word_embeddings=True))
    else:
        cfg = transformers.Qwen3MoeConfig(**common, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[1])
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights near 1 (as trained ones are) but not equal to it, so a missed norm shows.
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.08)
    return model.eval()


def _reference(model, ids):
    """Float64 log-probs of the next token and entropies, [B, T-1] each."""
    import copy

    m64 = copy.deepcopy(model).double()
    if hasattr(m64.config, "num_experts"):
        m64.set_experts_implementation("eager")      # torch's grouped_mm refuses float64
    with torch.no_grad():
        logits = m64(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1)
    labels = ids[:, 1:]
    return logp.gather(-1, labels[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen3")
    models = {}
    for kind in ("dense", "moe"):
        model = _make_hf_model(kind)
        hf_dir = tmp / f"{kind}_hf"
        model.save_pretrained(hf_dir)
        (hf_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        ids = torch.randint(0, VOCAB, (2 * B, T), generator=torch.Generator().manual_seed(1))
        logp, ent = _reference(model, ids)
        models[kind] = dict(hf_dir=str(hf_dir), ids=ids, logp=logp, ent=ent)
    results = run_workers(_worker, 4, args=(str(tmp), models), timeout=600)
    return tmp, models, results


def _logprobs_entropy(chunks, model_cfg, ps, ids):
    """Log-probs and entropies of the next token through the pipeline schedule (two micro-batches) and the
    trainer's token statistics (PolicyForward: padded vocabulary excluded), broadcast from the last stage: every
    rank returns ([2B, T-1], [2B, T-1])."""
    import torch.distributed as dist

    from megatron_entcov.policy.forward import PolicyForward
    from megatron_entcov.policy.pipeline import ModelInput, run_microbatches

    stats = PolicyForward(chunks, model_cfg, ps)

    pos = torch.arange(T).expand(2 * B, T).contiguous()
    mbs = [ModelInput(input_ids=ids[i * B:(i + 1) * B], position_ids=pos[i * B:(i + 1) * B]) for i in range(2)]

    def loss_fn(batch, logits):
        labels = batch.input_ids[:, 1:]
        logp, ent = stats.token_stats(logits[:, :-1].contiguous(), labels)
        return logits.sum() * 0.0, {"logp": logp.detach(), "ent": ent.detach()}

    outs = run_microbatches(chunks, mbs, loss_fn, ps=ps, forward_only=True)
    both = torch.zeros(2, 2 * B, T - 1)
    if ps.is_last_stage:
        both = torch.stack([torch.cat([o["logp"] for o in outs]), torch.cat([o["ent"] for o in outs])])
    if ps.pp_size > 1:
        dist.broadcast(both, src=dist.get_global_rank(ps.pp_group, ps.pp_size - 1), group=ps.pp_group)
    return both[0], both[1]


def _worker(rank, world_size, tmp, models):
    import yaml

    from megatron_entcov.config import ModelConfig, ParallelConfig
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model, check_loaded
    from megatron_entcov.run.checkpoint import load_model, save_model
    from megatron_entcov.weights.shards import iter_hf_weights
    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    res = {}
    for kind, m in models.items():
        convert_hf_to_megatron(m["hf_dir"], f"{tmp}/{kind}_mcore", tp=2, ep=2 if kind == "moe" else 1,
                               progress=False)
        cfg_file = Path(tmp) / f"{kind}_mcore" / "step_000000" / "model_config.yaml"
        model_cfg = ModelConfig(**yaml.safe_load(cfg_file.read_text())["model"])
        for layout in DENSE_LAYOUTS if kind == "dense" else MOE_LAYOUTS:
            parallel = ParallelConfig(tensor_model_parallel_size=layout.get("tp", 1),
                                      pipeline_model_parallel_size=layout.get("pp", 1),
                                      expert_model_parallel_size=layout.get("ep", 1),
                                      sequence_parallel=kind == "moe" and layout.get("tp", 1) > 1)
            ps = init_parallel(parallel, seed=3)
            chunks = build_model(model_cfg, parallel, ps, load_weights=True)
            load_model(chunks, f"{tmp}/{kind}_mcore/step_000000/model")
            check_loaded(chunks, "the converted checkpoint")
            with torch.no_grad():
                logp, ent = _logprobs_entropy(chunks, model_cfg, ps, m["ids"])
            key = f"{kind}_{_name(layout)}"
            res[key] = ((logp.double() - m["logp"]).abs().max().item(), (ent.double() - m["ent"]).abs().max().item())
            save_model(chunks, f"{tmp}/{key}")
            if layout.get("ep", 1) > 1 or layout.get("pp", 1) > 1:
                for dst in ("all", "generator"):
                    got = {}
                    for bucket in iter_hf_weights(chunks, model_cfg, ps, bucket_bytes=20_000, dst=dst):
                        for hf_name, tensor in bucket:
                            assert hf_name not in got, f"{hf_name} yielded twice"
                            got[hf_name] = tensor.numpy().copy()   # numpy: a tensor would die with the rank
                    res[f"{key}_iter_{dst}"] = got
                res[f"{key}_is_generator"] = ps.is_generator
    return res


@pytest.mark.parametrize("kind,layout", [("dense", x) for x in DENSE_LAYOUTS] + [("moe", x) for x in MOE_LAYOUTS],
                         ids=lambda x: _name(x) if isinstance(x, dict) else x)
def test_logprobs_and_entropies_match_float64_transformers(setup, kind, layout):
    _, _, results = setup
    for rank, res in enumerate(results):
        dlogp, dent = res[f"{kind}_{_name(layout)}"]
        assert dlogp < TOL and dent < TOL, f"rank {rank}: {kind} {layout}: |logp diff| {dlogp:.3g}, |H diff| {dent:.3g}"


@pytest.mark.parametrize("kind,layout", [("dense", dict(tp=2, pp=2)), ("moe", dict(ep=2)), ("moe", dict(tp=2, ep=2)),
                                         ("moe", dict(ep=2, pp=2))], ids=lambda x: _name(x) if isinstance(x, dict) else x)
def test_round_trip_is_bitwise_equal(setup, kind, layout):
    """HF -> Megatron -> (load and re-save at the layout) -> HF gives back every tensor exactly."""
    from megatron_entcov.weights.to_hf import convert_megatron_to_hf

    tmp, models, _ = setup
    want = read_safetensors(Path(models[kind]["hf_dir"]))
    out = tmp / f"{kind}_{_name(layout)}_hf"
    convert_megatron_to_hf(tmp / f"{kind}_{_name(layout)}", out, max_shard_size="40KB", progress=False,
                           model_config=tmp / f"{kind}_mcore" / "step_000000" / "model_config.yaml",
                           hf_config_dir=models[kind]["hf_dir"])
    got = read_safetensors(out)
    assert sorted(got) == sorted(want)
    different = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert different == [], f"tensors differ after the round trip: {different}"


def test_dist_checkpoint_is_the_same_at_ep1_and_ep2(setup):
    """Experts are keyed by global index: the checkpoints re-saved at ep1 and ep2 hold the same keys, shapes and
    values."""
    from megatron_entcov.weights.to_hf import _DistCheckpointReader

    tmp, _, _ = setup
    a, b = _DistCheckpointReader(tmp / "moe_ep1"), _DistCheckpointReader(tmp / "moe_ep2")
    def tensor_keys(reader):
        return sorted(k for k, md in reader.metadata.state_dict_metadata.items() if hasattr(md, "size"))

    tensors = tensor_keys(a)
    assert tensors == tensor_keys(b)
    assert any(".experts." in k for k in tensors)
    for k in tensors:
        assert a.shape(k) == b.shape(k), k
        assert torch.equal(a.read(k), b.read(k)), k


def test_exported_qwen3_models_load_in_transformers(setup):
    """The HF output of the round trip is a model transformers loads, with the source model's logits."""
    import transformers

    tmp, models, _ = setup
    for kind, layout in (("dense", dict(tp=2, pp=2)), ("moe", dict(tp=2, ep=2))):
        out = tmp / f"{kind}_{_name(layout)}_hf"
        if not out.exists():
            pytest.skip("the round-trip test did not run first")
        got = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        want = transformers.AutoModelForCausalLM.from_pretrained(models[kind]["hf_dir"]).eval()
        assert type(got).__name__ == ("Qwen3ForCausalLM" if kind == "dense" else "Qwen3MoeForCausalLM")
        ids = models[kind]["ids"]
        with torch.no_grad():
            assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)


@pytest.mark.parametrize("layout", [dict(tp=2, pp=2), dict(ep=2), dict(tp=2, ep=2), dict(ep=2, pp=2)], ids=_name)
def test_weight_sync_tensors_are_the_hf_state_dict(setup, layout):
    """iter_hf_weights: 'all' gives every rank every tensor (experts gathered over ep) and 'generator' gives the
    generating ranks exactly the same, the others nothing; names are the HF (and SGLang) names."""
    tmp, models, results = setup
    kind = "dense" if "ep" not in layout else "moe"
    want = read_safetensors(Path(models[kind]["hf_dir"]))
    if kind == "dense":
        want.pop("lm_head.weight", None)               # tied: the sync sends the embedding only
    key = f"{kind}_{_name(layout)}"
    for rank, res in enumerate(results):
        got = res[f"{key}_iter_all"]
        assert sorted(got) == sorted(want), f"rank {rank}"
        assert all(torch.equal(torch.from_numpy(got[k]), want[k]) for k in want), f"rank {rank}"
        gen = res[f"{key}_iter_generator"]
        if res[f"{key}_is_generator"]:
            assert sorted(gen) == sorted(want), f"rank {rank}"
            assert all(torch.equal(torch.from_numpy(gen[k]), want[k]) for k in want), f"rank {rank}"
        else:
            assert gen == {}, f"rank {rank} is not a generating rank but received {sorted(gen)[:3]}"
