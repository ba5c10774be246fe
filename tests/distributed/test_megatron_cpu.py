"""Megatron-Core on CPU with gloo: layouts agree, a tp=2 x pp=2 step trains every parameter, dist
checkpoints reshard. One spawn of 4 ranks runs every layout in turn (each launch costs ~10 s of imports).

Tolerances: float32 throughout; different layouts sum partial matmuls in a different order, so logits agree
to ~1e-6 relative; we allow 1e-5 absolute on logits of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_workers

pytestmark = pytest.mark.distributed

SEED = 7
B, T = 2, 16
LOGIT_ATOL = 1e-5


def _cfg(tp=1, pp=1, vpp=None, sp=False, tied=False):
    from megatron_entcov.config import load_config

    return load_config(None, [
        "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=200", "model.add_qkv_bias=true",
        f"model.tie_word_embeddings={str(tied).lower()}",
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.virtual_pipeline_model_parallel_size={'null' if vpp is None else vpp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        "optim.lr=1e-2", "optim.optimizer=sgd", "optim.clip_grad=0",
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=2", "optim.micro_batch_size=2",
    ]).resolve(4)


def _inputs():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 200, (2 * B, T), generator=g)
    pos = torch.arange(T).expand(2 * B, T).contiguous()
    from megatron_entcov.policy.pipeline import ModelInput

    return [ModelInput(input_ids=ids[i * B:(i + 1) * B], position_ids=pos[i * B:(i + 1) * B]) for i in range(2)]


def _full_logits(chunks, ps, cfg):
    """Forward both micro-batches through the pipeline schedule; gather the vocab shards over tp; the
    result is broadcast from the last stage so every rank returns the same [2B, T, V] tensor."""
    import torch.distributed as dist

    from megatron_entcov.policy.pipeline import run_microbatches

    def loss_fn(batch, logits):
        return logits.sum() * 0.0, {"logits": logits.detach().float()}

    outs = run_microbatches(chunks, _inputs(), loss_fn, ps=ps, forward_only=True)
    vpad = cfg.model.padded_vocab_size(ps.tp_size)
    full = torch.zeros(2 * B, T, vpad)
    if ps.is_last_stage:
        local = torch.cat([o["logits"] for o in outs])
        shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
        dist.all_gather(shards, local, group=ps.tp_group)
        full = torch.cat(shards, dim=-1)
    # Every stage takes the last stage's result.
    if ps.pp_size > 1:
        dist.broadcast(full, src=dist.get_global_rank(ps.pp_group, ps.pp_size - 1), group=ps.pp_group)
    return full


def _layout(cfg):
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model

    ps = init_parallel(cfg.parallel, seed=SEED)
    return ps, build_model(cfg.model, cfg.parallel, ps)


def _worker(rank, world_size, tmp):
    from megatron_entcov.policy.optimizer import build_optimizer, wrap_ddp, zero_grads
    from megatron_entcov.policy.pipeline import run_microbatches
    from megatron_entcov.run.checkpoint import load_model, save_model

    res = {}
    # Reference: tp=1, pp=1 (dp=4), saved as a dist checkpoint.
    cfg = _cfg()
    ps, chunks = _layout(cfg)
    ref = _full_logits(chunks, ps, cfg)
    save_model(chunks, f"{tmp}/ref")

    # tp=2 with the same seed: CPU initialisation makes the shards exact slices of the tp=1 weights.
    cfg = _cfg(tp=2)
    ps, chunks = _layout(cfg)
    res["tp2_same_seed"] = (_full_logits(chunks, ps, cfg) - ref).abs().max().item()
    load_model(chunks, f"{tmp}/ref")
    res["tp2_loaded"] = (_full_logits(chunks, ps, cfg) - ref).abs().max().item()

    for name, kwargs in [("tp2_sp", dict(tp=2, sp=True)), ("pp2", dict(pp=2)), ("pp2_vpp2", dict(pp=2, vpp=2)),
                         ("pp4", dict(pp=4)), ("tp2_pp2", dict(tp=2, pp=2))]:
        cfg = _cfg(**kwargs)
        ps, chunks = _layout(cfg)
        load_model(chunks, f"{tmp}/ref")
        res[name] = (_full_logits(chunks, ps, cfg) - ref).abs().max().item()

    # One training step at tp=2 x pp=2 (tied embeddings: the first/last-stage copies must stay in sync).
    cfg = _cfg(tp=2, pp=2, tied=True)
    ps, chunks = _layout(cfg)
    chunks = wrap_ddp(chunks, cfg)
    opt, _ = build_optimizer(chunks, cfg)
    before = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}

    def loss_fn(batch, logits):
        return logits.float().pow(2).mean() / (2 * ps.dp_size), {}

    zero_grads(chunks, opt)
    run_microbatches(chunks, _inputs(), loss_fn, ps=ps, forward_only=False)
    ok, grad_norm, _ = opt.step()
    res["step_ok"] = bool(ok)
    res["grad_norm"] = float(grad_norm)
    res["unchanged"] = [n for c in chunks for n, p in c.named_parameters() if torch.equal(before[n], p)]
    res["n_params"] = len(before)
    trained = _full_logits(chunks, ps, cfg)
    # The tied embedding: first-stage word embeddings == last-stage output weights after the step.
    import torch.distributed as dist

    from megatron_entcov.policy.model import unwrap_model

    model = unwrap_model(chunks[0])
    w = model.shared_embedding_or_output_weight().detach().clone()
    peer = w.clone()
    if ps.pp_size > 1:
        dist.all_reduce(peer, group=ps.embedding_group)
        res["tied_sync"] = (peer / 2 - w).abs().max().item()
    save_model(chunks, f"{tmp}/tp2pp2")

    # ... and that checkpoint loads at tp=1 (and tp=2, pp=1) with the same outputs.
    for name, kwargs in [("reload_tp1", dict(tied=True)), ("reload_tp2", dict(tp=2, tied=True))]:
        cfg = _cfg(**kwargs)
        ps, chunks = _layout(cfg)
        load_model(chunks, f"{tmp}/tp2pp2")
        res[name] = (_full_logits(chunks, ps, cfg) - trained).abs().max().item()
    res["trained_differs"] = (trained - ref).abs().max().item()
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron_cpu")
    return run_workers(_worker, 4, args=(str(tmp),), timeout=420)


@pytest.mark.parametrize("layout", ["tp2_same_seed", "tp2_loaded", "tp2_sp", "pp2", "pp2_vpp2", "pp4", "tp2_pp2"])
def test_layout_logits_equal_tp1(results, layout):
    for rank, res in enumerate(results):
        assert res[layout] < LOGIT_ATOL, f"rank {rank}: {layout} logits differ from tp=1 by {res[layout]:.3g}"


def test_tp2_pp2_step_changes_every_parameter(results):
    for rank, res in enumerate(results):
        assert res["step_ok"], f"rank {rank}: optimizer step reported failure"
        assert res["grad_norm"] > 0 and res["grad_norm"] == res["grad_norm"]
        assert res["n_params"] > 0
        assert res["unchanged"] == [], f"rank {rank}: parameters not updated: {res['unchanged']}"
        assert res["trained_differs"] > 1e-4
    # Grad norm is global: the same on every rank.
    assert len({round(r["grad_norm"], 10) for r in results}) == 1


def test_tied_embedding_stays_in_sync_across_stages(results):
    for rank, res in enumerate(results):
        assert res["tied_sync"] < 1e-7, f"rank {rank}: tied embedding copies differ by {res['tied_sync']}"


@pytest.mark.parametrize("layout", ["reload_tp1", "reload_tp2"])
def test_checkpoint_saved_at_tp2_pp2_loads_elsewhere(results, layout):
    for rank, res in enumerate(results):
        assert res[layout] < LOGIT_ATOL, f"rank {rank}: {layout} outputs differ by {res[layout]:.3g}"



def _load_worker(rank, world_size):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model, check_loaded

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                             "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=32"])
    ps = init_parallel(cfg.resolve(world_size).parallel, seed=0)
    chunks = build_model(cfg.model, cfg.parallel, ps, load_weights=True)
    params = dict(chunks[0].named_parameters())
    out = {"all_nan": all(bool(torch.isnan(p).all()) for p in params.values())}
    with torch.no_grad():
        for name, p in params.items():
            if "linear_fc2" not in name:
                p.fill_(0.5)
    try:
        check_loaded(chunks, "model.hf_dir")
        out["partial"] = "passed"
    except ValueError as err:
        out["partial"] = str(err)
    with torch.no_grad():
        for p in params.values():
            p.fill_(0.5)
    check_loaded(chunks, "model.hf_dir")
    random = build_model(cfg.model, cfg.parallel, ps)[0]
    out["random_finite"] = all(bool(torch.isfinite(p).all()) for p in random.parameters())
    return out


def test_a_model_built_for_loading_is_not_initialised_and_names_what_a_load_missed():
    """build_model(load_weights=True) skips Megatron's random init (NaN until loaded); check_loaded names every
    parameter a load left unset, and passes once every weight is written."""
    out = run_workers(_load_worker, 1)[0]
    assert out["all_nan"] and out["random_finite"]
    assert out["partial"] == ("model.hf_dir left 2 parameter(s) unset (NaN): decoder.layers.0.mlp.linear_fc2.weight, "
                              "decoder.layers.1.mlp.linear_fc2.weight; the weights do not cover this model "
                              "(architecture or layout mismatch)")


def _recompute_worker(rank: int, world_size: int):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.policy.model import build_model

    grads, saved = {}, {}
    for mode in ("none", "selective", "full"):
        cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                                 "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=32",
                                 f"model.recompute={mode}"])
        ps = init_parallel(cfg.resolve(world_size).parallel, seed=0)
        chunk = build_model(cfg.model, cfg.parallel, ps)[0]
        torch.manual_seed(1)
        ids = torch.randint(0, 32, (2, 24))
        positions = torch.arange(24).expand(2, 24)
        nbytes = []

        def pack(t):
            nbytes.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunk(ids, positions, None).float().pow(2).mean()
        loss.backward()
        grads[mode] = [p.grad.clone() for p in chunk.parameters()]
        saved[mode] = sum(nbytes)
    return {"grads": grads, "saved": saved}


def test_recompute_gives_the_same_gradients_and_keeps_less():
    """model.recompute=selective/full (Megatron's recompute_granularity; on CPU through compat fix 9) gives the
    gradients of no recomputation bit for bit, and the forward keeps fewer bytes for the backward: full least."""
    out = run_workers(_recompute_worker, 1)[0]
    for mode in ("selective", "full"):
        for a, b in zip(out["grads"]["none"], out["grads"][mode]):
            assert torch.equal(a, b), mode
    saved = out["saved"]
    assert saved["full"] < saved["selective"] < saved["none"], saved
