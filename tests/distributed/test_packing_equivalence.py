"""Packed sequences under a token budget give the padded path's log-probs, loss, token selection and gradients.

For one batch of samples with long-tailed lengths, the same Actor runs the padded path (micro-batches of rows)
and the packed path (samples back to back in rows of at most ``optim.max_tokens_per_micro_batch`` tokens, THD
boundaries) at tp1, tp2 + sequence parallelism, pp2 (1F1B, packed rows of different lengths) and dp2 with
different numbers of micro-batches per replica. Compared, to float tolerance (summation order differs, nothing
else may):
  * old log-probs and entropies of every response token (forward only);
  * the loss metrics of one optimizer step (KL-Cov selection and an entropy bonus, seq-mean-token-mean
    aggregation so per-sample means inside packed rows are exercised);
  * the updated weights (SGD, so the update is -lr * the summed gradient), which must also have moved.
A token's value in the packed row may only depend on its own sample: the test also checks a sample's log-probs
do not change when its bin-mates change (attention would leak across boundaries otherwise).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_workers, tiny_model

pytestmark = pytest.mark.distributed

MODEL = tiny_model(num_layers=4, max_position_embeddings=128, add_qkv_bias=True)
STEP = ["optim.optimizer=sgd", "optim.lr=5e-2", "optim.clip_grad=0", "optim.micro_batch_size=2",
        "rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=40", "loss.name=kl_cov", "loss.kl_cov_ratio=0.3", "loss.entropy_coef=0.01",
        "loss.agg=seq-mean-token-mean"]
BUDGET = 64
N = 16


def _samples(n: int, seed: int):
    """Long-tailed lengths: most responses short, a few near the maximum."""
    from megatron_entcov.rollout.types import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 12, (), generator=g))
        r = 40 if i in (3, 6, 13) else int(torch.randint(1, 9, (), generator=g))
        out.append(Sample(prompt_ids=torch.randint(0, 32, (p,), generator=g).tolist(),
                          response_ids=torch.randint(0, 32, (r,), generator=g).tolist(),
                          rollout_logprobs=(-torch.rand(r, generator=g) * 3).tolist(),
                          finish_reason="stop", weight_version=0, index=i))
    return out


def _worker(rank, world_size, layout):
    import torch.distributed as dist

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.experience import shard_rows
    from megatron_entcov.losses.policy import compute_token_selection, policy_loss
    from megatron_entcov.policy.actor import Actor
    from megatron_entcov.policy.batch import rows_from_samples
    from megatron_entcov.policy.packing import plan_bins

    cfg = load_config(None, MODEL + STEP + layout).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    actor = Actor(cfg, ps, temperature=1.0)
    samples = _samples(N, seed=5)
    adv = torch.randn(N, generator=torch.Generator().manual_seed(9))
    key_stride = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    rows = shard_rows(N, num_mini_batches=1, dp_rank=ps.dp_rank, dp_size=ps.dp_size)
    batch = rows_from_samples([samples[i] for i in rows], adv[rows], pad_id=0, sample_ids=rows, key_stride=key_stride,
                              multiple_of=ps.tp_size, device=ps.device)
    mask = batch.loss_mask
    params = [p for c in actor.chunks for p in c.parameters()]
    start = [p.detach().clone() for p in params]
    results = {}
    for mode, budget in (("padded", 0), ("packed", BUDGET)):
        actor.max_tokens = budget
        lp, ent = actor.logprobs(batch)
        batch.old_logprobs, batch.old_entropy = lp, ent
        sel = None
        if ps.is_last_stage:
            # The selection from the padded path's log-probs in both modes: what is compared is the loss given
            # the selection (the selection is a function of the row layout only).
            ref_lp = results["padded"]["lp"] if mode == "packed" else lp
            sel = compute_token_selection(cfg.loss, ref_lp, ref_lp, batch.advantages, mask,
                                          token_keys=batch.token_keys, group=ps.dp_group, step=0, seed=cfg.seed)

        def loss_fn(mb, logprobs, entropy):
            return policy_loss(cfg.loss, logprobs, mb.old_logprobs, mb.advantages, mb.loss_mask, entropy=entropy,
                               step=0, selection=sel.view(mb.view), rollout_logprobs=mb.rollout_logprobs,
                               segment_ids=mb.segment_ids)

        result = actor.train_step(batch, loss_fn)
        results[mode] = {"lp": lp, "ent": ent, "metrics": result.metrics, "grad_norm": result.grad_norm,
                         "weights": [p.detach().clone() for p in params],
                         "kl_cov": None if sel is None else sel.kl_cov_mask.clone()}
        with torch.no_grad():                                  # back to the start for the other mode
            for p, s in zip(params, start):
                p.copy_(s)
        actor.optimizer.reload_model_params()
    n_micro = len(plan_bins(batch.seq_lengths.tolist(), BUDGET, multiple_of=ps.tp_size,
                            count_multiple=ps.pp_size if len(actor.chunks) > 1 else 1))
    counts = [None] * ps.world_size
    dist.all_gather_object(counts, n_micro)
    out = {"counts": counts, "grad_norm": (results["padded"]["grad_norm"], results["packed"]["grad_norm"])}
    out["weights"] = [(a.numpy().copy(), b.numpy().copy(), s.numpy().copy()) for a, b, s in
                      zip(results["padded"]["weights"], results["packed"]["weights"], start)]
    if ps.is_last_stage:
        m = mask.bool()
        out["lp"] = (results["padded"]["lp"][m].numpy(), results["packed"]["lp"][m].numpy())
        out["ent"] = (results["padded"]["ent"][m].numpy(), results["packed"]["ent"][m].numpy())
        out["metrics"] = (results["padded"]["metrics"], results["packed"]["metrics"])
    # Boundaries: two samples' log-probs are the same packed without the other samples as with them.
    actor.max_tokens = BUDGET
    alone = batch.rows(slice(0, 2))
    lp_alone, _ = actor.logprobs(alone)
    if ps.is_last_stage and ps.dp_rank == 0:
        out["alone"] = (lp_alone[alone.loss_mask.bool()].numpy(),
                        results["packed"]["lp"][:2][mask[:2].bool()].numpy())
    return out


LAYOUTS = {
    "tp1": (1, []),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),           # packed rows of different lengths
    "dp2": (2, []),                                                    # a different micro-batch count per replica
}
"""The interleaved schedule (one padded length, tests/distributed/test_layout_invariance.py's packed_pp2_vpp2)
passes here too; it is left to the layout test to keep the suite's time down."""


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_micro_batches_match_the_padded_path(name):
    world_size, layout = LAYOUTS[name]
    results = run_workers(_worker, world_size=world_size, args=(layout,), timeout=600)
    last = [r for r in results if "lp" in r]
    assert last, "no last-stage rank reported"
    for r in last:
        torch.testing.assert_close(torch.from_numpy(r["lp"][1]), torch.from_numpy(r["lp"][0]), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(r["ent"][1]), torch.from_numpy(r["ent"][0]), atol=2e-5, rtol=1e-5)
        padded, packed = r["metrics"]
        assert set(padded) == set(packed)
        for key in padded:
            assert packed[key] == pytest.approx(padded[key], abs=2e-6, rel=1e-5), key
    for r in results:
        assert r["grad_norm"][1] == pytest.approx(r["grad_norm"][0], rel=1e-5)
        moved = 0.0
        for padded, packed, start in r["weights"]:
            torch.testing.assert_close(torch.from_numpy(packed), torch.from_numpy(padded), atol=2e-6, rtol=1e-5)
            moved = max(moved, float(abs(padded - start).max()))
        assert moved > 1e-3, "the step did not move the weights: the comparison would be vacuous"
    alone = [r["alone"] for r in results if "alone" in r]
    assert alone
    torch.testing.assert_close(torch.from_numpy(alone[0][0]), torch.from_numpy(alone[0][1]), atol=2e-5, rtol=1e-5)
    if name == "dp2":
        counts = results[0]["counts"]
        assert counts[0] != counts[1], f"both replicas got {counts[0]} micro-batches: the test must exercise unequal counts"
