"""One RL step of a tiny Qwen3-MoE under context parallelism gives the one-process updated weights.

Context parallelism (cp2: every sequence split into 4 load-balanced chunks over two ranks) with mixture-of-experts
layers: each cp rank routes its own tokens through the router and the experts (dropless: a token's experts depend on
that token only), the experts' gradients are summed over the cp ranks as every other weight's (the load-balancing
loss is refused with cp). From the same Hugging Face weights and seed, one full trainer step (rollouts, old
log-probs, two optimizer mini-batches with KL-Cov or Clip-Cov selection, weight sync) runs on one process and at
cp2 (padded rows), cp2 with packed rows, cp2 with routing replay (pi_old's recorded experts, recorded and replayed
per cp rank on its own tokens, packed rows) and cp2 x ep2 (the expert-parallel group spans the two cp ranks, each
holding half the experts; cp rank 1 takes its part in the weight sync's expert all-gathers). Every updated
parameter under its Hugging Face name, the chosen-token share, the mean reward, covariance and loss must be the
one-process run's.

As in test_moe_layout_invariance.py, the random tiny model never answers right, so the workers' arithmetic
verifier scores by the parity of the response's character codes: mixed rewards, the same on every layout.
"""

from __future__ import annotations

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
CP = ["parallel.context_parallel_size=2"]
PACKED = ["optim.max_tokens_per_micro_batch=24"]         # samples of <= 22 tokens (24 at cp2), several per row
REPLAY = ["model.moe_routing_replay=true"]
ONE_PROCESS = {"kl_cov_ref": LOSSES["kl_cov"], "clip_cov_ref": LOSSES["clip_cov"],
               "kl_cov_replay_ref": LOSSES["kl_cov"] + REPLAY}
TWO_PROCESSES = {"kl_cov_cp2": LOSSES["kl_cov"] + CP,
                 "clip_cov_cp2_packed": LOSSES["clip_cov"] + CP + PACKED,
                 "kl_cov_replay_cp2_packed": LOSSES["kl_cov"] + REPLAY + CP + PACKED,
                 # the expert-parallel group spans the two cp ranks: each holds 2 of the 4 experts
                 "kl_cov_cp2_ep2": LOSSES["kl_cov"] + CP + ["parallel.expert_model_parallel_size=2"]}


def _score_by_text_parity():
    """The workers' arithmetic verifier: 1.0 when the sum of the response's character codes is even."""
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
    try:
        metrics = trainer.train_step()
        weights = {n: t.detach().float().numpy().copy()
                   for bucket in iter_hf_weights(trainer.actor.chunks, cfg.model, ps) for n, t in bucket}
    finally:
        trainer.close()
    assert trainer.actor.skipped_steps == 0, f"{name}: an update was skipped"
    return {"weights": weights, "metrics": metrics} if ps.is_rank0 else None


def _worker(rank, world_size, layouts, hf_dir, out_dir):
    _score_by_text_parity()
    return {name: _one_step(world_size, overrides, hf_dir, out_dir, name) for name, overrides in layouts.items()}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_cp")
    hf_dir = tmp / "hf"
    initial = write_random_hf_model(MODEL + ["rollout.max_prompt_len=16", "sampling.max_new_tokens=6"], hf_dir)
    args = (str(hf_dir), str(tmp / "runs"))
    out = run_workers(_worker, 1, args=(ONE_PROCESS, *args), timeout=400)[0]
    out.update(run_workers(_worker, 2, args=(TWO_PROCESSES, *args), timeout=600)[0])
    return initial, out


def _reference(layout: str) -> str:
    loss = "clip_cov" if layout.startswith("clip_cov") else "kl_cov"
    return f"{loss}_replay_ref" if "_replay_" in layout else f"{loss}_ref"


@pytest.mark.parametrize("reference", list(ONE_PROCESS))
def test_the_reference_step_moves_the_experts_and_the_router(steps, reference):
    initial, results = steps
    ref = results[reference]
    assert 0 < ref["metrics"]["reward/mean"] < 1, ref["metrics"]["reward/mean"]
    assert ref["metrics"][CHOSEN[reference.split("_cov")[0] + "_cov"]] > 0
    moved = {n: (torch.from_numpy(ref["weights"][n]) - initial[n]).abs().max().item() for n in ref["weights"]}
    for part in (".mlp.experts.", ".mlp.gate.", "self_attn.q_norm"):
        most = max(v for n, v in moved.items() if part in n)
        assert most > 2e-5, f"{reference}: the step barely moved the {part} weights ({most})"
    if "_replay_" in reference:
        assert ref["metrics"]["moe/routing_changed_share"] > 0       # the replay overrode some own choices


@pytest.mark.parametrize("layout", list(TWO_PROCESSES))
def test_one_moe_step_at_cp2_updates_the_weights_as_one_process_does(steps, layout):
    _, results = steps
    ref, got = results[_reference(layout)], results[layout]
    loss = _reference(layout).split("_cov")[0] + "_cov"
    for key in (CHOSEN[loss], "reward/mean", "cov/mean", "train/pg_loss"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5, abs=1e-7), (layout, key)
    if "_replay_" in layout:
        # The share counts every routed position, padding included, and cp pads each sample to a multiple of 4:
        # not the one-process denominator; the replay's effect shows in the weights.
        assert got["metrics"]["moe/routing_changed_share"] > 0
    assert set(got["weights"]) == set(ref["weights"])
    for name, expected in ref["weights"].items():
        torch.testing.assert_close(torch.from_numpy(got["weights"][name]), torch.from_numpy(expected), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, name=name: f"{layout}: {name} differs from one process: {m}")
