"""Routing replay with full recomputation (model.recompute=full): the recomputed forward of each layer, run inside
the backward, routes by the experts recorded for the micro-batch being recomputed.

One RL step of the tiny Qwen3-MoE of test_moe_layout_invariance.py (KL-Cov, two mini-batches of four micro-batches,
rewards by text parity so the step learns) runs with replay on one process without and with recompute=full, and on
two processes as pp2 with recompute=full: there the 1F1B schedule runs the forwards of micro-batches 0 and 1 before
the backward (and recomputation) of micro-batch 0, so a running counter would serve micro-batch 2's routing. Every
router call of the training steps, the schedule's forwards and the recomputed ones alike, must route each token by
the experts the old-log-prob forward recorded for it, and the updated weights must equal the step without recompute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_utils import run_workers
from test_moe_layout_invariance import LOSSES, MODEL, STEP, _score_by_text_parity

pytestmark = pytest.mark.distributed

REPLAY = LOSSES["kl_cov"] + ["model.moe_routing_replay=true"]
ONE_PROCESS = {"replay": REPLAY, "replay_full": REPLAY + ["model.recompute=full"]}
TWO_PROCESSES = {"replay_full_pp2": REPLAY + ["model.recompute=full", "parallel.pipeline_model_parallel_size=2"]}


def _one_step(world_size, overrides, hf_dir, out_dir, name):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.shards import iter_hf_weights

    cfg = load_config(None, MODEL + STEP + overrides + [f"model.hf_dir={hf_dir}", f"output_dir={out_dir}",
                                                        f"name={name}"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    actor = trainer.actor
    routers = [m for chunk in actor.chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    # Per router, every call inside the training steps: (recomputed in the backward?, expert set [tokens, E]).
    calls = [[] for _ in routers]
    training = [False]

    def hook(module, args, output, i):
        if training[0]:
            recomputed = torch._C._current_graph_task_id() != -1
            calls[i].append((recomputed, output[1].detach().numpy().copy()))

    for i, router in enumerate(routers):
        router.register_forward_hook(lambda module, args, output, i=i: hook(module, args, output, i))
    train_step = actor.train_step

    def watched_train_step(*args, **kwargs):
        training[0] = True
        try:
            return train_step(*args, **kwargs)
        finally:
            training[0] = False

    actor.train_step = watched_train_step
    try:
        metrics = trainer.train_step()
        weights = {n: t.detach().float().numpy().copy()
                   for bucket in iter_hf_weights(actor.chunks, cfg.model, ps) for n, t in bucket}
    finally:
        trainer.close()
    assert actor.skipped_steps == 0, f"{name}: an update was skipped"
    recorded = [[t.numpy().copy() for t in layer.recorded] for layer in actor.routing_replay.layers]
    return {"weights": weights, "metrics": metrics, "calls": calls, "recorded": recorded,
            "offsets": actor.routing_replay.part_offsets} if ps.is_rank0 else None


def _worker(rank, world_size, layouts, hf_dir, out_dir):
    _score_by_text_parity()
    return {name: _one_step(world_size, overrides, hf_dir, out_dir, name) for name, overrides in layouts.items()}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config import load_config
    from megatron_entcov.config.hf import to_hf_config
    from megatron_entcov.tasks.tokenizer import build_char_tokenizer

    tmp = tmp_path_factory.mktemp("replay_recompute")
    model_cfg = load_config(None, MODEL + ["rollout.max_prompt_len=16", "sampling.max_new_tokens=6"]).model
    torch.manual_seed(7)
    hf_dir = tmp / "hf"
    AutoModelForCausalLM.from_config(to_hf_config(model_cfg)).save_pretrained(hf_dir)
    build_char_tokenizer(hf_dir)
    args = (str(hf_dir), str(tmp / "runs"))
    out = run_workers(_worker, 1, args=(ONE_PROCESS, *args), timeout=400)[0]
    out.update(run_workers(_worker, 2, args=(TWO_PROCESSES, *args), timeout=400)[0])
    return out


@pytest.mark.parametrize("name", ["replay_full", "replay_full_pp2"])
def test_recomputed_forwards_route_by_the_recorded_experts_of_their_micro_batch(steps, name):
    got = steps[name]
    assert got["offsets"] == [0, 4, 8]                            # 2 mini-batches x 4 micro-batches
    assert got["recorded"] and len(got["recorded"]) == len(got["calls"])
    for layer, (recorded, calls) in enumerate(zip(got["recorded"], got["calls"])):
        forwards = [used for recomputed, used in calls if not recomputed]
        recomputes = [used for recomputed, used in calls if recomputed]
        # Every micro-batch is routed once by the schedule's forward and once by the recomputation.
        assert len(forwards) == len(recomputes) == 8, (layer, len(forwards), len(recomputes))
        for mb, indices in enumerate(recorded):
            expected = np.zeros_like(forwards[mb])
            np.put_along_axis(expected, indices, True, axis=1)
            assert expected.sum(axis=1).tolist() == [2] * len(expected)
            np.testing.assert_array_equal(forwards[mb], expected, err_msg=f"{name} layer {layer} forward {mb}")
            np.testing.assert_array_equal(recomputes[mb], expected, err_msg=f"{name} layer {layer} recompute {mb}")
    if name.endswith("pp2"):
        # 1F1B on the first stage: the forward of a later micro-batch runs before micro-batch 0 is recomputed, so a
        # running counter would have served the wrong routing.
        order = [recomputed for recomputed, _ in got["calls"][0]]
        assert order.index(True) > 1, order
    # The router's own choice changed after the first update: the replay is not void.
    assert got["metrics"]["moe/routing_changed_share"] > 0


@pytest.mark.parametrize("name", ["replay_full", "replay_full_pp2"])
def test_the_step_with_recompute_updates_the_weights_as_without(steps, name):
    ref, got = steps["replay"], steps[name]
    for key in ("train/kl_cov_frac", "reward/mean", "moe/routing_changed_share"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-7), (name, key)
    assert 0 < ref["metrics"]["reward/mean"] < 1 and ref["metrics"]["train/kl_cov_frac"] > 0
    assert set(got["weights"]) == set(ref["weights"])
    for name_, expected in ref["weights"].items():
        torch.testing.assert_close(torch.from_numpy(got["weights"][name_]), torch.from_numpy(expected), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, n=name_: f"{name}: {n} differs without recompute: {m}")
