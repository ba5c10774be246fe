"""One RL step of a tiny Qwen3-MoE gives the same updated weights at ep1, ep2, tp2, tp2 x ep2, pp2 x ep2 and
tp2 x dp2 x ep2 as one process does.

From the same Hugging Face weights and seed, one full trainer step (rollouts on the embedded engine, old log-probs,
two optimizer mini-batches with Clip-Cov or KL-Cov token selection, weight sync with the experts gathered over ep)
runs on one process, on dp2, on dp2 with the experts split over ep2 (the all-to-all dispatcher moves each replica's
tokens to the other's experts), on tp2 with sequence parallelism (each tp rank's whole experts see its shard of the
tokens: their gradients are summed over the tp ranks), with and without ep2, and on four processes as pp2 x dp2 x
ep2 and tp2 x dp2 x ep2. Every updated parameter, gathered under its Hugging Face name, must equal the one-process
result to float tolerance, the chosen-token share must be the one-process one (the selection is global and exact
with experts: nothing in it depends on the MLP), so must the grad norm (also where it clips the step: the dense and
the expert norms are reduced over different groups), and the step must have moved the weights, the experts, the
router and the q/k norms included.

The random tiny model never answers an arithmetic problem right, so every reward would be 0 and every advantage 0:
the policy gradient, Clip-Cov's and KL-Cov's covariance and KL-Cov's penalty (whose gradient is 0 while the policy
equals pi_old, and stays so when nothing moved) would all vanish and no weight would move. The workers' arithmetic
verifier scores by a fixed function of the response text instead (the parity of its character codes), so the
rewards differ within a group, as they do for a model that sometimes answers right, and are the same on every
layout (the rollouts are).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_utils import run_workers, tiny_model, write_random_hf_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODEL = tiny_model(num_layers=4, qk_layernorm=True, kv_channels=16, num_experts=4, moe_router_topk=2,
                   moe_ffn_hidden_size=16) + ["model.moe_dense_layers=[1]"]
STEP = ["rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "optim.num_mini_batches=2", "optim.lr=0.2",
        "optim.clip_grad=0", "optim.optimizer=sgd", "metrics.measure_entropy_change=false",
        "weight_sync.verify=version", "steps=1", "data.arithmetic_digits=1"]
LOSSES = {"kl_cov": ["loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "loss.kl_cov_coef=1.0"],
          "clip_cov": ["loss.name=clip_cov", "loss.clip_cov_ratio=0.2", "loss.clip_cov_lb=0.0",
                       "loss.clip_cov_ub=5.0"]}
CHOSEN = {"kl_cov": "train/kl_cov_frac", "clip_cov": "train/clip_cov_frac"}
ONE_PROCESS = {f"{loss}_ref": overrides for loss, overrides in LOSSES.items()}
TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
# tp2: each tp rank's experts (expert tp 1) see its sequence-parallel shard of the tokens.
TWO_PROCESSES = {f"{loss}_{layout}": overrides + extra for loss, overrides in LOSSES.items()
                 for layout, extra in {"dp2": [], "dp2_ep2": ["parallel.expert_model_parallel_size=2"],
                                       "tp2": TP2}.items()}
# Routing replay (model.moe_routing_replay): the same step with pi_old's recorded experts, at ep1 and ep2.
REPLAY = ["model.moe_routing_replay=true"]
ONE_PROCESS.update({f"{loss}_replay_ref": overrides + REPLAY for loss, overrides in LOSSES.items()})
TWO_PROCESSES.update({f"{loss}_replay_dp2_ep2": overrides + REPLAY + ["parallel.expert_model_parallel_size=2"]
                      for loss, overrides in LOSSES.items()})
# The load-balancing loss on (its value is logged as train/moe_aux_loss).
ONE_PROCESS["kl_cov_aux_ref"] = LOSSES["kl_cov"] + ["model.moe_aux_loss_coeff=0.01"]
# Grad clipping on (the step's grad norm, ~1.6, is over it): the norm, taken over the dense and the expert
# parameters by different groups, must be the one-process norm, and so must the clipped updates.
CLIP = ["optim.clip_grad=0.5"]
ONE_PROCESS["kl_cov_clip_ref"] = LOSSES["kl_cov"] + CLIP
TWO_PROCESSES.update({"kl_cov_clip_tp2": LOSSES["kl_cov"] + CLIP + TP2,
                      "kl_cov_clip_tp2_ep2": LOSSES["kl_cov"] + CLIP + TP2 + ["parallel.expert_model_parallel_size=2"]})
FOUR_PROCESSES = {f"{loss}_pp2_dp2_ep2": overrides + ["parallel.expert_model_parallel_size=2",
                                                      "parallel.pipeline_model_parallel_size=2"]
                  for loss, overrides in LOSSES.items()}
FOUR_PROCESSES["clip_cov_tp2_dp2_ep2"] = LOSSES["clip_cov"] + TP2 + ["parallel.expert_model_parallel_size=2"]


def _score_by_text_parity():
    """The workers' arithmetic verifier (see the module docstring): 1.0 when the sum of the response's character
    codes is even (every instance, also those built after a trainer closed its verifiers)."""
    from megatron_entcov.tasks.arithmetic import ArithmeticVerifier
    from megatron_entcov.tasks.verifiers import VerifyResult

    ArithmeticVerifier.verify_one = lambda self, response, answer, index: VerifyResult(
        1.0 if sum(map(ord, response)) % 2 == 0 else 0.0)


def _one_step(world_size, overrides, hf_dir, out_dir, name):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.shards import iter_hf_weights

    cfg = load_config(None, MODEL + STEP + overrides + [f"model.hf_dir={hf_dir}", f"output_dir={out_dir}",
                                                        f"name={name}"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    *routed, aux_losses = _watch_routing(trainer.actor.chunks)
    try:
        metrics = trainer.train_step()
        weights = {n: t.detach().float().numpy().copy()
                   for bucket in iter_hf_weights(trainer.actor.chunks, cfg.model, ps) for n, t in bucket}
    finally:
        trainer.close()
    assert trainer.actor.skipped_steps == 0, f"{name}: an update was skipped"
    replay = trainer.actor.routing_replay
    recorded = None if replay is None else [[t.numpy().copy() for t in layer.recorded] for layer in replay.layers]
    return {"weights": weights, "metrics": metrics, "routed": routed, "recorded": recorded, "aux": aux_losses,
            "offsets": None if replay is None else replay.part_offsets} if ps.is_rank0 else None


def _watch_routing(chunks) -> list[list]:
    """Per MoE router (module order), the expert sets [tokens, E] (bool) it routed by in each training forward
    (grad enabled), as its output says: what the dispatcher used, replayed or not; then one list of every such
    call's load-balancing loss computed here from the router's logits."""
    from megatron.core.transformer.moe.router import TopKRouter

    routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    out = [[] for _ in routers]

    def hook(module, args, output, i):
        if not torch.is_grad_enabled():
            return
        out[i].append(output[1].detach().numpy().copy())
        # The Switch load-balancing loss of this call, from the router's own logits (float64):
        # E * sum_e f_e * P_e, f_e = tokens routed to e / (T k), P_e = mean probability of e over all E.
        with torch.no_grad():
            logits = module.gating(args[0]).reshape(-1, module.config.num_moe_experts).double()
        tokens, experts = logits.shape
        k = module.config.moe_router_topk
        counts = torch.zeros(experts, dtype=torch.float64).scatter_add_(
            0, logits.topk(k, dim=-1).indices.reshape(-1), torch.ones(tokens * k, dtype=torch.float64))
        aux_losses.append(float(experts * ((counts / (tokens * k)) * logits.softmax(-1).mean(0)).sum()))

    aux_losses: list[float] = []
    for i, router in enumerate(routers):
        router.register_forward_hook(lambda module, args, output, i=i: hook(module, args, output, i))
    out.append(aux_losses)
    return out


def _worker(rank, world_size, layouts, hf_dir, out_dir):
    _score_by_text_parity()
    return {name: _one_step(world_size, overrides, hf_dir, out_dir, name) for name, overrides in layouts.items()}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_layouts")
    hf_dir = tmp / "hf"
    initial = write_random_hf_model(MODEL + ["rollout.max_prompt_len=16", "sampling.max_new_tokens=6"], hf_dir)
    args = (str(hf_dir), str(tmp / "runs"))
    out = run_workers(_worker, 1, args=(ONE_PROCESS, *args), timeout=400)[0]
    out.update(run_workers(_worker, 2, args=(TWO_PROCESSES, *args), timeout=600)[0])
    out.update(run_workers(_worker, 4, args=(FOUR_PROCESSES, *args), timeout=600)[0])
    return initial, out


@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_reference_moe_step_learns_from_mixed_rewards(steps, loss):
    initial, results = steps
    ref = results[f"{loss}_ref"]
    assert 0 < ref["metrics"]["reward/mean"] < 1, ref["metrics"]["reward/mean"]
    assert ref["metrics"][CHOSEN[loss]] > 0
    assert set(ref["weights"]) == set(initial) - {"lm_head.weight"}
    assert any(".mlp.experts.3.down_proj" in n for n in ref["weights"])
    moved = {n: (torch.from_numpy(ref["weights"][n]) - initial[n]).abs().max().item() for n in ref["weights"]}
    for part in (".mlp.experts.", ".mlp.gate.", "self_attn.q_norm", "layers.1.mlp.down_proj"):
        most = max(v for n, v in moved.items() if part in n)
        assert most > 2e-5, f"the reference step barely moved the {part} weights ({most}): {moved}"


@pytest.mark.parametrize("layout", [*TWO_PROCESSES, *FOUR_PROCESSES])
def test_one_moe_step_updates_the_weights_as_one_process_does(steps, layout):
    _, results = steps
    loss = layout.split("_cov")[0] + "_cov"
    variant = "_replay" if "_replay_" in layout else "_clip" if "_clip_" in layout else ""
    ref, got = results[f"{loss}{variant}_ref"], results[layout]
    keys = (CHOSEN[loss], "reward/mean", "cov/mean", "train/grad_norm") + (
        ("moe/routing_changed_share",) if variant == "_replay" else ())
    for key in keys:
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-7), (layout, key)
    assert set(got["weights"]) == set(ref["weights"])
    for name, expected in ref["weights"].items():
        torch.testing.assert_close(torch.from_numpy(got["weights"][name]), torch.from_numpy(expected), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, name=name: f"{layout}: {name} differs from one process: {m}")


@pytest.mark.parametrize("loss", list(LOSSES))
def test_replay_routes_each_training_forward_by_the_recorded_experts(steps, loss):
    """Token by token: the experts every MoE layer routed by in the training forwards of both mini-batches are the
    ones the old-log-prob forward recorded for those tokens; and the router's own choice did change for some
    tokens after the first update (the replay is not void)."""
    _, results = steps
    got = results[f"{loss}_replay_ref"]
    assert got["recorded"] and len(got["recorded"]) == len(got["routed"]) == 3       # the MoE layers 0, 2, 3
    for layer, (recorded, routed) in enumerate(zip(got["recorded"], got["routed"])):
        assert len(routed) == len(recorded) == got["offsets"][-1] == 8        # 2 mini-batches x 4 micro-batches
        for mb, (indices, used) in enumerate(zip(recorded, routed)):
            expected = np.zeros_like(used)
            np.put_along_axis(expected, indices, True, axis=1)
            assert expected.sum(axis=1).tolist() == [2] * len(expected)
            np.testing.assert_array_equal(used, expected, err_msg=f"layer {layer} micro-batch {mb}")
    assert got["metrics"]["moe/routing_changed_share"] > 0
    # Without replay the same step's second mini-batch routes by the router's own (changed) choice.
    plain = results[f"{loss}_ref"]["routed"]
    assert any(not np.array_equal(a, b) for layer_a, layer_b in zip(plain, got["routed"])
               for a, b in zip(layer_a[4:], layer_b[4:]))


def test_the_load_balancing_loss_is_logged_as_its_mean_over_layers_and_micro_batches(steps):
    _, results = steps
    got = results["kl_cov_aux_ref"]
    assert len(got["aux"]) == 3 * 8                            # 3 MoE layers x 2 mini-batches x 4 micro-batches
    assert got["metrics"]["train/moe_aux_loss"] == pytest.approx(np.mean(got["aux"]), rel=1e-5)
    assert "train/moe_aux_loss" not in results["kl_cov_ref"]["metrics"]       # off by default
