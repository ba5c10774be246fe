"""One RL step gives the same updated weights for every parallel layout.

From the same Hugging Face weights and seed, one full trainer step (rollouts on the embedded engine, old
log-probs, two optimizer mini-batches with KL-Cov token selection and an entropy bonus, weight sync) runs on one
process and on tp2 + sequence parallelism with the compiled log-prob kernels, pp2 with virtual stages, dp2 (SGD),
different micro-batch splits, packed micro-batches under a token budget (one process, tp2 + SP, pp2 interleaved,
dp2), and dp2 with the distributed optimizer (Adam, against one-process Adam). Every updated parameter, gathered
under its Hugging Face name, must equal the one-process result to float tolerance (summation order differs
between layouts; nothing else may). The step must also have moved the weights, by far more than the tolerance.
The TensorBoard token histograms must hold the same sampled tokens (a function of the token keys only).
The token-entropy family (losses/token_entropy.py) runs the same step at one process, tp2 + SP, pp2 and dp2 in
the same two spawns: high_entropy_tokens with entropy advantage shaping and the adaptive entropy coefficient,
archer with its global quantile, ce_gppo; their selected-token shares must agree too (the global threshold
is the one-process one). The random tiny model never answers right (every reward 0, every advantage 0), so for
these runs the workers' arithmetic verifier scores by the parity of the response's character codes (as in
test_moe_layout_invariance.py): rewards differ within groups, the same on every layout (the rollouts are), and
the terms that scale with the advantage (the shaping and its bound, the CE-GPPO gradient outside the clip range,
Archer's dual clip) act in the step whose weights and clip shares are compared. The high_entropy_tokens runs also
log the exact first-order entropy change (entropy/delta_first_order: full logits gathered over tp, on the last
pipeline stage), which must be the one-process value too.
Context parallelism (cp2: every sequence split into 4 load-balanced chunks, the attention across the two ranks,
policy/cp_attention.py) runs KL-Cov on padded rows (with the weight-sync probe and the measured and exact entropy
change: forward outputs gathered back to the row layout), Clip-Cov on packed rows (its seeded random choice) and
KL-Cov with seq-mean-token-mean on packed rows (each sample's tokens split over the ranks: its token count comes
from the row layout), all scored by text parity so that the covariance and the selection act; cp2 x tp2 with sequence parallelism,
cp2 x dp2 and cp2 x pp2 with virtual stages (the interleaved schedule, padded rows and packed rows of one length)
run on four processes (slow). Their weights, selected shares, losses and histograms must be the
one-process run's.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from dist_utils import run_workers, tiny_model

pytestmark = pytest.mark.distributed

MODEL = tiny_model(num_layers=4, add_qkv_bias=True)
STEP = ["rollout.prompts_per_step=8", "rollout.n_samples_per_prompt=2", "rollout.max_prompt_len=16",
        "sampling.max_new_tokens=6", "optim.micro_batch_size=2", "optim.num_mini_batches=2", "optim.lr=1e-2",
        "optim.clip_grad=0", "loss.name=kl_cov", "loss.kl_cov_ratio=0.2", "loss.entropy_coef=0.01",
        "metrics.tensorboard=true", "metrics.histogram_tokens=12", "metrics.measure_entropy_change=false",
        "weight_sync.verify=version",
        "steps=1", "data.arithmetic_digits=1"]
SGD = ["optim.optimizer=sgd"]
ADAM = ["optim.optimizer=adam", "optim.lr=1e-3"]

PACKED = ["optim.max_tokens_per_micro_batch=24"]     # samples of <= 22 tokens, several per packed row
ONE_PROCESS = {"ref_sgd": SGD, "mbs1_sgd": SGD + ["optim.micro_batch_size=1"], "ref_adam": ADAM,
               "packed_sgd": SGD + PACKED}
TWO_PROCESSES = {
    # As every Qwen config: sequence parallelism with the compiled log-prob kernels (against eager, one process).
    "tp2_sp_compiled": SGD + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                              "loss.compile_logprob_kernels=true"],
    "pp2_vpp2": SGD + ["parallel.pipeline_model_parallel_size=2",
                       "parallel.virtual_pipeline_model_parallel_size=2"],
    "dp2": SGD,
    "dp2_mbs4": SGD + ["optim.micro_batch_size=4"],
    "dp2_distopt": ADAM + ["parallel.use_distributed_optimizer=true"],
    # Packed sequences under a token budget (issue: equivalence with the padded path at every layout).
    "packed_tp2_sp": SGD + PACKED + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "packed_pp2_vpp2": SGD + PACKED + ["parallel.pipeline_model_parallel_size=2",
                                       "parallel.virtual_pipeline_model_parallel_size=2"],
    "packed_dp2": SGD + PACKED,
}
# The token-entropy family (issue: each method layout-invariant at tp2, pp2 and dp2).
ENTROPY_METHODS = {
    "hent": ["loss.name=high_entropy_tokens", "loss.high_entropy_ratio=0.3", "loss.entropy_advantage_coef=0.1",
             "loss.entropy_coef=0", "loss.target_entropy=10", "loss.target_entropy_coef_init=1.0",
             # and the exact first-order entropy change (full logits gathered over tp, from the last stage at pp2)
             "metrics.measure_entropy_change=true"],
    # Tight clips, so that tokens leave the clip range in the second mini-batch of this small step.
    "archer": ["loss.name=archer", "loss.entropy_coef=0.5", "loss.archer_quantile_scope=global",
               "loss.archer_kl_coef=0.5", "loss.archer_low_clip_ratio=0.005", "loss.archer_high_clip_ratio=0.01"],
    "cegppo": ["loss.name=ce_gppo", "loss.entropy_coef=0.5", "loss.ce_gppo_beta1=0.5", "loss.clip_ratio_low=0.005",
               "loss.clip_ratio_high=0.005"],
}
ENTROPY_LAYOUTS = {"tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
                   "pp2": ["parallel.pipeline_model_parallel_size=2"], "dp2": []}
SELECTED = {"hent": "train/high_entropy_frac", "archer": "train/archer_high_frac", "cegppo": "train/entropy_bonus"}
"""A figure of each method that must be > 0 and agree across layouts."""
ADVANTAGE_TERMS = {"hent": ("train/adv_shaping_mean",), "archer": ("train/clip_frac_low", "train/clip_frac_high"),
                   "cegppo": ("train/clip_frac_low", "train/clip_frac_high")}
"""The advantage-dependent terms each method must exercise at the reference (their sum > 0; compared on every
layout with the other figures): the shaping, and the tokens outside the clip range (Archer's per-class clip,
CE-GPPO's bounded gradient there; they are clipped in the second mini-batch, after the first update moved pi)."""
COMPARED = [*SELECTED.values(), "coef/adaptive_entropy_coef", "train/adv_shaping_mean", "train/adv_shaping_bound_frac",
            "entropy/threshold", "train/clip_frac_low", "train/clip_frac_high", "train/pg_loss", "train/archer_kl",
            "reward/mean", "entropy/delta_first_order"]
ONE_PROCESS.update({f"ref_{method}": SGD + overrides for method, overrides in ENTROPY_METHODS.items()})
TWO_PROCESSES.update({f"{method}_{layout}": SGD + overrides + extra for method, overrides in ENTROPY_METHODS.items()
                      for layout, extra in ENTROPY_LAYOUTS.items()})
# Context parallelism (issue: cp2, and cp2 with tp2 / dp2, padded and packed, with Clip-Cov and KL-Cov).
CP_METHODS = {"klcov": ["loss.name=kl_cov", "metrics.measure_entropy_change=true", "weight_sync.verify=probe"],
              "clipcov": ["loss.name=clip_cov", "loss.clip_cov_ratio=0.1", "loss.clip_cov_lb=0"],
              # per-sequence means whose sequences are split over the ranks (counts from the row layout)
              "seqmean": ["loss.name=kl_cov", "loss.agg=seq-mean-token-mean"]}
CP = ["parallel.context_parallel_size=2"]
ONE_PROCESS.update({f"ref_{method}": SGD + overrides for method, overrides in CP_METHODS.items()})
TWO_PROCESSES.update({"klcov_cp2": SGD + CP_METHODS["klcov"] + CP,
                      "clipcov_cp2_packed": SGD + CP_METHODS["clipcov"] + CP + PACKED,
                      "seqmean_cp2_packed": SGD + CP_METHODS["seqmean"] + CP + PACKED})
FOUR_PROCESSES = {
    "klcov_cp2_tp2_sp": SGD + CP_METHODS["klcov"] + CP + ["parallel.tensor_model_parallel_size=2",
                                                           "parallel.sequence_parallel=true"],
    "clipcov_cp2_dp2_packed": SGD + CP_METHODS["clipcov"] + CP + PACKED,
    # the interleaved schedule (virtual stages) on cp micro-batches: padded rows, and packed rows of one length
    "klcov_cp2_pp2_vpp2": SGD + CP_METHODS["klcov"] + CP + ["parallel.pipeline_model_parallel_size=2",
                                                             "parallel.virtual_pipeline_model_parallel_size=2"],
    "clipcov_cp2_pp2_vpp2_packed": SGD + CP_METHODS["clipcov"] + CP + PACKED + [
        "parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
}
CP_COMPARED = ["train/kl_cov_frac", "train/clip_cov_frac", "train/pg_loss", "train/loss", "train/ppo_kl",
               "reward/mean", "entropy/mean", "cov/mean", "cov/q90", "entropy/delta_measured",
               "entropy/delta_first_order", "sync/probe_tokens"]
"""The figures of a context-parallel run that must be the one-process run's (None where a run logs none)."""
PARITY = {*ENTROPY_METHODS, *CP_METHODS}
"""The runs scored by text parity (mixed rewards): those of these methods and their references."""
REFERENCE = {name: "ref_adam" if "distopt" in name else "ref_sgd"
             for name in [*ONE_PROCESS, *TWO_PROCESSES, *FOUR_PROCESSES]}
REFERENCE.update({name: f"ref_{name.split('_')[0]}" for name in [*ONE_PROCESS, *TWO_PROCESSES, *FOUR_PROCESSES]
                  if name.split("_")[0] in PARITY})


@contextmanager
def _score_by_text_parity(on: bool):
    """With ``on``: the arithmetic verifier scores 1.0 when the sum of the response's character codes is even (see
    the module docstring); the real verifier again afterwards."""
    from megatron_entcov.tasks.arithmetic import ArithmeticVerifier
    from megatron_entcov.tasks.verifiers import VerifyResult

    real = ArithmeticVerifier.verify_one
    if on:
        ArithmeticVerifier.verify_one = lambda self, response, answer, index: VerifyResult(
            1.0 if sum(map(ord, response)) % 2 == 0 else 0.0)
    try:
        yield
    finally:
        ArithmeticVerifier.verify_one = real


def _one_step(world_size, overrides, hf_dir, out_dir, name):
    """One trainer step on this layout; rank 0 returns the updated weights under their HF names."""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer
    from megatron_entcov.weights.shards import iter_hf_weights

    cfg = load_config(None, MODEL + STEP + overrides + [f"model.hf_dir={hf_dir}", f"output_dir={out_dir}",
                                                        f"name={name}"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    parity = bool(set(name.split("_")[:2]) & PARITY)        # "hent_dp2" and its reference "ref_hent"
    with _score_by_text_parity(parity):
        trainer = Trainer(cfg, ps)
    try:
        with _score_by_text_parity(parity):
            metrics = trainer.train_step()
        # numpy: tensors would travel back through shared memory that dies with the worker.
        weights = {n: t.detach().float().numpy().copy()
                   for bucket in iter_hf_weights(trainer.actor.chunks, cfg.model, ps) for n, t in bucket}
    finally:
        trainer.close()
    assert trainer.actor.skipped_steps == 0, f"{name}: an update was skipped"
    if not ps.is_rank0:
        return None
    return {"weights": weights, "kl_cov_frac": metrics.get("train/kl_cov_frac"), "tokens": metrics["perf/tokens"],
            "selected": {key: metrics.get(key) for key in COMPARED},
            "cp_compared": {key: metrics.get(key) for key in CP_COMPARED},
            "entropy_control": trainer.entropy_control.state_dict(),
            "histograms": {tag: values.copy() for tag, values in trainer.step_histograms.items()}}


def _worker(rank, world_size, layouts, hf_dir, out_dir):
    return {name: _one_step(world_size, overrides, hf_dir, out_dir, name) for name, overrides in layouts.items()}


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    from megatron_entcov.config import load_config
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    tmp = tmp_path_factory.mktemp("layouts")
    model_cfg = load_config(None, MODEL + ["rollout.max_prompt_len=16", "sampling.max_new_tokens=6"]).model
    hf_dir = write_hf_model_dir(model_cfg, tmp / "hf", seed=7)
    from safetensors.torch import load_file

    initial = {k: v.float() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    out = run_workers(_worker, 1, args=(ONE_PROCESS, str(hf_dir), str(tmp / "runs")), timeout=400)[0]
    out.update(run_workers(_worker, 2, args=(TWO_PROCESSES, str(hf_dir), str(tmp / "runs")), timeout=600)[0])
    return initial, out, hf_dir, tmp


@pytest.fixture(scope="module")
def cp_steps(steps):
    """The four-process context-parallel layouts (cp2 x tp2, cp2 x dp2), with the two-process results."""
    initial, out, hf_dir, tmp = steps
    out = dict(out)
    out.update(run_workers(_worker, 4, args=(FOUR_PROCESSES, str(hf_dir), str(tmp / "runs4")), timeout=600)[0])
    return initial, out


@pytest.mark.parametrize("layout", [name for name in [*ONE_PROCESS, *TWO_PROCESSES] if not name.startswith("ref")])
def test_one_step_updates_the_weights_as_one_process_does(steps, layout):
    _check_layout(steps[0], steps[1], layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(FOUR_PROCESSES))
def test_context_parallel_with_tp_or_dp_updates_the_weights_as_one_process_does(cp_steps, layout):
    _check_layout(*cp_steps, layout)


def _check_cp_figures(layout: str, ref: dict, got: dict) -> None:
    """A context-parallel run: its method chose tokens and its figures are the one-process run's."""
    method = layout.split("_")[0]
    chosen = "train/clip_cov_frac" if method == "clipcov" else "train/kl_cov_frac"
    assert ref["cp_compared"][chosen] > 0 and 0 < ref["cp_compared"]["reward/mean"] < 1, ref["cp_compared"]
    if method == "klcov":          # the probe compared tokens; the step moved the entropy, measured both ways
        assert ref["cp_compared"]["sync/probe_tokens"] > 0
        assert abs(ref["cp_compared"]["entropy/delta_first_order"]) > 1e-5, ref["cp_compared"]
    for key, value in ref["cp_compared"].items():
        assert (got["cp_compared"][key] is None) == (value is None), (layout, key)
        if value is not None:
            assert got["cp_compared"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (layout, key)


def _check_layout(initial: dict, results: dict, layout: str) -> None:
    ref, got = results[REFERENCE[layout]], results[layout]
    method = layout.split("_")[0]
    if method in ENTROPY_METHODS:
        assert ref["selected"][SELECTED[method]] > 0
        assert 0 < ref["selected"]["reward/mean"] < 1, ref["selected"]["reward/mean"]      # mixed rewards
        assert sum(abs(ref["selected"][key]) for key in ADVANTAGE_TERMS[method]) > 0, (method, ref["selected"])
        if method == "hent":     # both branches of min(alpha H, |A| / kappa) occur; the weights moved the entropy
            assert 0 < ref["selected"]["train/adv_shaping_bound_frac"] < 1, ref["selected"]
            assert abs(ref["selected"]["entropy/delta_first_order"]) > 1e-5, ref["selected"]
        for key, value in ref["selected"].items():
            assert (got["selected"][key] is None) == (value is None), (layout, key)
            if value is not None:
                assert got["selected"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (layout, key)
        assert got["entropy_control"] == ref["entropy_control"]          # c_k after 2 updates, bit for bit
    elif method in CP_METHODS:
        _check_cp_figures(layout, ref, got)
    else:
        assert ref["kl_cov_frac"] > 0 and got["kl_cov_frac"] == pytest.approx(ref["kl_cov_frac"], abs=1e-6)
    assert set(got["weights"]) == set(ref["weights"])
    moved = max((torch.from_numpy(ref["weights"][n]) - initial[n]).abs().max().item()
                for n in ref["weights"] if n in initial)
    assert moved > 1e-4, f"the reference step barely moved the weights ({moved})"
    # The histogram sample: fewer tokens than the step has, the same ones (in key order) on every layout.
    tags = {"cov/tokens", "entropy/tokens"} | ({"cov/chosen_tokens", "entropy/chosen_tokens"}
                                               if method not in ENTROPY_METHODS else set())
    assert tags <= set(got["histograms"]) == set(ref["histograms"])
    assert len(ref["histograms"]["cov/tokens"]) == 12 < ref["tokens"]
    for tag, expected in ref["histograms"].items():
        torch.testing.assert_close(torch.from_numpy(got["histograms"][tag]), torch.from_numpy(expected), rtol=1e-5,
                                   atol=1e-6, msg=lambda m, tag=tag: f"{layout}: histogram {tag}: {m}")
    for name, expected in ref["weights"].items():
        torch.testing.assert_close(torch.from_numpy(got["weights"][name]), torch.from_numpy(expected), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{layout}: {name} differs from one process: {m}")
