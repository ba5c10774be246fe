"""Every scalar the trainer logs, checked against an independent computation.

A tiny policy is warm-started here with plain-torch teacher forcing (so rewards are neither all 0 nor all 1),
then trained for a few RL steps (KL-Cov, dynamic sampling, evaluation every step, the online law) on one
process, and on two data-parallel processes with the same seed. The one-process run records what the
rollout engine was asked and answered (every generate call: phase, seeds, samples) and snapshots the
engine's Hugging Face weights before every step and every evaluation. The expectations are then recomputed
in this process WITHOUT the code under test:
* text: our own decoding of the character ids (tokenizer.py docstring table) and our own verifier (the
  response's leading integer against the prompt's value computed here);
* token statistics: a plain transformers forward of the snapshot in float64, log_softmax over the unpadded
  vocabulary at the sampling temperature;
* batch statistics: numpy (GRPO advantages, covariance, 'lower' quantiles, polyfit), itertools for pass@k.
Limits: train/loss, train/pg_loss, train/ppo_kl and train/grad_norm depend on the weights between a step's
two optimizer updates, which no engine ever holds; they are checked by their relations and ranges only, as
are the wall-clock perf/* and sync/* timings.
"""

from __future__ import annotations

import itertools
import math
import re
from contextlib import contextmanager

import numpy as np
import pytest
from dist_utils import run_workers

from megatron_entcov.monitor.entropy_classes import PARTITIONS

pytestmark = pytest.mark.distributed

# ------------------------------------------------------------------------------------------------- the runs
VOCAB = 20                     # the character tokenizer's size; padded to 24 in the Megatron model
TEMPERATURE = 0.8              # != 1, so every entropy/log-prob must apply it
PROMPTS, N = 4, 4              # prompts per step, responses per prompt
NUM_MINI = 2
MAX_NEW = 6
KL_COV_RATIO, KL_COV_COEF, ENTROPY_COEF = 0.2, 1.0, 0.01
CLIP_COV_RATIO = 2e-4          # the default: logged as coef/clip_cov_ratio even with KL-Cov
LR = 1e-3
EVAL_PROMPTS, EVAL_N, PASS_K = 5, 4, (1, 2, 4)   # 5: two replicas evaluate 3 + 2 prompts
MAX_REFILL = 4
LAW_MIN_POINTS = 3
PROBE_TOKENS = 16
STEPS, STEPS_DP2 = 3, 2
EOS = 1
SEED = 1234                    # the config's default seed
HIST_TOKENS = 10               # 5 per mini-batch: fewer than a mini-batch's tokens, so it is a real sample

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
         "model.num_query_groups=2", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=8",
         "model.max_position_embeddings=32", "model.add_qkv_bias=true"]
RL = [f"rollout.prompts_per_step={PROMPTS}", f"rollout.n_samples_per_prompt={N}", "rollout.max_prompt_len=16",
      "rollout.dynamic_sampling=true", f"rollout.max_refill_rounds={MAX_REFILL}",
      f"sampling.temperature={TEMPERATURE}", f"sampling.max_new_tokens={MAX_NEW}",
      "optim.micro_batch_size=4", f"optim.num_mini_batches={NUM_MINI}", f"optim.lr={LR}",
      "loss.name=kl_cov", f"loss.kl_cov_ratio={KL_COV_RATIO}", f"loss.kl_cov_coef={KL_COV_COEF}",
      f"loss.entropy_coef={ENTROPY_COEF}", "loss.selection_logprobs=old",
      "data.arithmetic_digits=1", "data.arithmetic_ops=+", "data.held_out_share=0.2",
      "eval.interval=1", f"eval.num_prompts={EVAL_PROMPTS}", f"eval.n_samples={EVAL_N}",
      f"eval.pass_k=[{','.join(map(str, PASS_K))}]", f"metrics.law_fit_min_points={LAW_MIN_POINTS}",
      f"weight_sync.probe_tokens={PROBE_TOKENS}", "metrics.log_interval=100",
      f"metrics.histogram_tokens={HIST_TOKENS}", f"seed={SEED}"]

# ------------------------------------------------------------------------------- our own text and verifier
CHARS = "0123456789+-*= \n"    # ids 4.. (tokenizer.py); ids 0-3 are <pad> <eos> <bos> <unk>
CHAR_ID = {c: i + 4 for i, c in enumerate(CHARS)}


def _decode(ids) -> str:
    """Characters of the ids, special tokens dropped (as the trainer decodes with skip_special_tokens)."""
    return "".join(CHARS[t - 4] for t in ids if 4 <= t < 4 + len(CHARS))


def _value(prompt_ids) -> int:
    a, op, b = re.fullmatch(r"([0-9]+)([-+*])([0-9]+)=", _decode(prompt_ids)).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def _leading_int(response_ids):
    m = re.match(r"\s*(-?[0-9]+)", _decode(response_ids))
    return int(m.group(1)) if m else None


def _reward(sample) -> float:
    return float(_leading_int(sample["response_ids"]) == _value(sample["prompt_ids"]))


@contextmanager
def _one_thread():
    """Plain-torch work in this process on one thread (two oversubscribe a busy 2-core machine badly)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- the worker
def _run_worker(rank, world_size, hf_dir, out_dir, name, steps, record):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.rollout.local import LocalEngine
    from megatron_entcov.trainer import Trainer

    class RecordingEngine(LocalEngine):
        """The embedded engine, recording every generate call (probe calls flagged) with the trainer's phase."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase, self.calls, self._probing = ("init", 0), [], False

        def probe(self, prompt, params):
            self._probing = True
            try:
                return super().probe(prompt, params)
            finally:
                self._probing = False

        def generate(self, prompts, params, *, seeds=None):
            samples = super().generate(prompts, params, seeds=seeds)
            self.calls.append({"phase": self.phase, "probe": self._probing, "top_k": params.top_k,
                               "temperature": params.temperature, "max_new_tokens": params.max_new_tokens,
                               "stop": list(params.stop_token_ids),
                               "seeds": None if seeds is None else [int(s) for s in seeds],
                               "samples": [s.to_dict() for s in samples]})
            return samples

        def snapshot(self):
            return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    cfg = load_config(None, MODEL + RL + [f"model.hf_dir={hf_dir}", f"output_dir={out_dir}", f"name={name}",
                                          f"steps={steps}"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    # As rollout.build_engine builds the local engine, on the generating rank of each replica.
    engine = RecordingEngine(cfg.model, seed=cfg.seed) if ps.is_generator else None
    trainer = Trainer(cfg, ps, engine=engine)
    logs, snapshots, histograms = [], {}, {}
    real_step, real_eval, real_log = trainer.train_step, trainer.evaluator.run, trainer.metrics.log
    real_histograms = trainer.metrics.histograms

    def train_step():
        step = trainer.step + 1
        if record and engine is not None:
            snapshots[("train", step)] = engine.snapshot()      # the weights the step's rollouts use
            engine.phase = ("train", step)
        return real_step()

    def evaluate(eng, actor):
        if record and engine is not None:
            snapshots[("eval", trainer.step)] = engine.snapshot()   # post-sync: what the evaluator sees
            engine.phase = ("eval", trainer.step)
        return real_eval(eng, actor)

    def log(step, metrics):
        logs.append((step, {k: float(v) for k, v in metrics.items()}))
        real_log(step, metrics)

    def write_histograms(step, values):
        histograms[step] = {tag: np.asarray(v, dtype=np.float64).tolist() for tag, v in values.items()}
        real_histograms(step, values)

    trainer.train_step, trainer.evaluator.run, trainer.metrics.log = train_step, evaluate, log
    trainer.metrics.histograms = write_histograms
    try:
        trainer.train()
    finally:
        trainer.close()
    if not ps.is_rank0:
        return None
    import resource

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30     # Linux: KiB
    return {"logs": logs, "calls": engine.calls if record else [], "snapshots": snapshots,
            "histograms": histograms, "run_dir": str(cfg.run_dir), "peak_rss_gib": peak_rss}


# ----------------------------------------------------------------------------------------------- fixtures
def _sft(model, steps=80, batch=64, lr=3e-3, seed=0):
    """Teacher forcing on 'a+b=' -> answer <eos> (plain torch), to partial accuracy."""
    import random

    import torch

    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows, masks = [], []
        for _ in range(batch):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            prompt = [2] + [CHAR_ID[c] for c in f"{a}+{b}="]
            answer = [CHAR_ID[c] for c in str(a + b)] + [EOS]
            pad = 8 - len(prompt) - len(answer)
            rows.append(prompt + answer + [0] * pad)
            masks.append([0] * (len(prompt) - 1) + [1] * len(answer) + [0] * pad)
        x, mask = torch.tensor(rows), torch.tensor(masks, dtype=torch.float32)
        logp = torch.log_softmax(model(input_ids=x[:, :-1]).logits.float(), -1)
        loss = -(logp.gather(-1, x[:, 1:, None]).squeeze(-1) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    """A Hugging Face model directory (char tokenizer) with SFT'd weights: both runs start from it."""
    from transformers import AutoModelForCausalLM

    from megatron_entcov.config import load_config
    from megatron_entcov.rollout.sglang.server import write_hf_model_dir

    model_cfg = load_config(None, MODEL + ["rollout.max_prompt_len=16", f"sampling.max_new_tokens={MAX_NEW}"]).model
    path = write_hf_model_dir(model_cfg, tmp_path_factory.mktemp("warm") / "hf", seed=7)
    with _one_thread():
        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
        _sft(model)
    return str(write_hf_model_dir(model_cfg, path, state_dict=model.state_dict()))


@pytest.fixture(scope="module")
def run1(warm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run_workers(_run_worker, 1, args=(warm_dir, str(out), "one", STEPS, True), timeout=300)[0]


@pytest.fixture(scope="module")
def run2(warm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs_dp2")
    return run_workers(_run_worker, 2, args=(warm_dir, str(out), "dp2", STEPS_DP2, False), timeout=300)[0]


class _Forward:
    """A plain transformers forward of engine snapshots, in float64."""

    def __init__(self, hf_dir, snapshots):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").double().eval()
        self.snapshots, self.loaded = snapshots, None

    def use(self, key):
        if key != self.loaded:
            self.model.load_state_dict({k: self.torch.from_numpy(v) for k, v in self.snapshots[key].items()})
            self.loaded = key
        return self

    def logits(self, ids):
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([list(ids)])).logits[0]
        assert out.shape[-1] == VOCAB, out.shape     # the unpadded vocabulary
        return out

    def response_logits(self, sample, temperature=TEMPERATURE):
        """[R, V] logits / temperature at the response tokens' positions (the unpadded vocabulary)."""
        p, r = sample["prompt_ids"], sample["response_ids"]
        return self.logits(p + r)[len(p) - 1:len(p) - 1 + len(r)] / temperature

    def token_stats(self, sample, temperature=TEMPERATURE):
        """(log-probs, entropies) [R] of the response tokens: full softmax of logits / temperature."""
        p, r = sample["prompt_ids"], sample["response_ids"]
        z = self.logits(p + r)[len(p) - 1:len(p) - 1 + len(r)] / temperature
        logp = self.torch.log_softmax(z, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, self.torch.tensor(r)[:, None]).squeeze(-1).numpy(), entropy.numpy()

    def greedy(self, prompt, max_new, stop):
        out = []
        for _ in range(max_new):
            out.append(int(self.logits(list(prompt) + out)[-1].argmax()))
            if out[-1] in stop:
                break
        return out


def _first_order(z_old: np.ndarray, z_new: np.ndarray) -> np.ndarray:
    """[R] the first-order entropy change per state, written out in float64: dH/dz_a = -pi_a (log pi_a + H), so
    dH = sum_a dH/dz_a (z_new - z_old)_a (arXiv 2505.22617, section 2)."""
    logp = z_old - z_old.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    pi = np.exp(logp)
    entropy = -(pi * logp).sum(-1, keepdims=True)
    return (-pi * (logp + entropy) * (z_new - z_old)).sum(-1)


def _grpo(rewards: np.ndarray) -> np.ndarray:
    """GRPO advantages (r - group mean) / (unbiased group std + 1e-6), 0 for all-equal groups."""
    adv = np.zeros_like(rewards)
    for g in range(0, len(rewards), N):
        r = rewards[g:g + N]
        if r.max() != r.min():
            adv[g:g + N] = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    return adv


def _expected_step(calls, want):
    """The step's rollout statistics from its recorded rounds: dynamic sampling redone by hand."""
    rounds = [[dict(s, reward=_reward(s)) for s in c["samples"]] for c in calls]
    kept, spare, seen, degenerate = [], [], 0, 0
    for i, samples in enumerate(rounds):
        assert len(kept) < want, "a refill round ran although enough groups were kept"
        assert len(samples) == want * N
        for g in range(want):
            block = samples[g * N:(g + 1) * N]
            seen += 1
            if len({s["reward"] for s in block}) == 1:
                degenerate += 1
                spare.append(block)
            else:
                kept.append(block)
    assert len(kept) >= want or len(rounds) == 1 + MAX_REFILL, "refills stopped early"
    shortfall = max(0, want - len(kept))
    batch = [s for block in (kept + spare[:shortfall])[:want] for s in block]
    everything = [s for samples in rounds for s in samples]
    rewards = np.array([s["reward"] for s in batch])
    lengths = np.array([len(s["response_ids"]) for s in batch])
    return {
        "batch": batch, "rewards": rewards, "advantages": _grpo(rewards), "lengths": lengths,
        "num_dropped": len(everything) - len(batch),
        "reward/mean": rewards.mean(),
        "reward/mean_all": np.mean([s["reward"] for s in everything]),
        "reward/accuracy": np.mean(rewards >= 1.0),
        "reward/std": rewards.std(ddof=0),
        "reward/degenerate_group_frac": degenerate / seen,
        "reward/parse_fail_frac": np.mean([_leading_int(s["response_ids"]) is None for s in everything]),
        "reward/timeout_frac": 0.0, "reward/error_frac": 0.0, "data/skipped_prompts": 0.0,
        "rollout/response_len": lengths.mean(),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/stop_frac": np.mean([s["response_ids"][-1] == EOS for s in batch]),
        "rollout/generated_tokens": float(sum(len(s["response_ids"]) for s in everything)),
        "rollout/refill_rounds": float(len(rounds) - 1),
        "rollout/refill_shortfall": float(shortfall),
        "perf/tokens": float(lengths.sum()),
    }


@pytest.fixture(scope="module")
def truth(run1, warm_dir):
    """Per-step logged metrics and their independent expectations (run1)."""
    calls = run1["calls"]
    fwd = _Forward(warm_dir, run1["snapshots"])
    logged = {}
    for step, metrics in run1["logs"]:
        assert step not in logged, f"step {step} logged twice"
        logged[step] = metrics
    expected = {}
    with _one_thread():
        for step in range(1, STEPS + 1):
            mine = [c for c in calls if c["phase"] == ("train", step) and not c["probe"]]
            e = _expected_step(mine, PROMPTS)
            lp, ent_old, ent_new, gap = [], [], [], []
            for s in e["batch"]:
                logp, h = fwd.use(("train", step)).token_stats(s)
                lp.append(logp)
                ent_old.append(h)
                gap.append(np.abs(np.array(s["rollout_logprobs"]) - logp))
            first_order = []
            for s in e["batch"]:
                ent_new.append(fwd.use(("eval", step)).token_stats(s)[1])   # the weights after the step
                z_new = fwd.response_logits(s).numpy()
                first_order.append(_first_order(fwd.use(("train", step)).response_logits(s).numpy(), z_new))
            e.update({"logprobs": lp, "entropy": ent_old,
                      "entropy/mean": np.concatenate(ent_old).mean(),
                      "rollout/logprob_gap": np.concatenate(gap).mean(),
                      "entropy/delta_measured": np.concatenate(ent_new).mean() - np.concatenate(ent_old).mean(),
                      "entropy/delta_first_order": np.concatenate(first_order).mean()})
            probes = [c for c in calls if c["phase"] == ("train", step) and c["probe"]]
            e["probes"] = [(s, fwd.use(("eval", step)).token_stats(s)[0]) for c in probes for s in c["samples"]]
            expected[step] = e
        for step in range(STEPS + 1):
            greedy, sampled = [c for c in calls if c["phase"] == ("eval", step) and not c["probe"]]
            assert greedy["top_k"] == 1 and sampled["top_k"] == -1, (greedy["top_k"], sampled["top_k"])
            fwd.use(("eval", step))
            prompts = [s["prompt_ids"] for s in greedy["samples"]]
            mine_greedy = [fwd.greedy(p, MAX_NEW, (EOS,)) for p in prompts]
            responses = list(sampled["samples"])
            entropies = [fwd.token_stats(s)[1] for s in responses]
            expected[("eval", step)] = {"prompts": prompts, "greedy": mine_greedy, "greedy_call": greedy,
                                        "sampled_call": sampled, "sampled": responses, "entropies": entropies}
    return {"logged": logged, "expected": expected, "calls": calls, "run_dir": run1["run_dir"],
            "snapshots": run1["snapshots"], "histograms": run1["histograms"], "peak_rss_gib": run1["peak_rss_gib"]}


def _close(got, want, tol=1e-6, what=""):
    assert got == pytest.approx(want, rel=tol, abs=tol), f"{what}: logged {got!r}, expected {want!r}"


# ------------------------------------------------------------------------------------------------- tests
ENTROPY_CLASS_TAGS = {"entropy_class/cov_total", "entropy_class/pred_total",
                      *(f"entropy_class/{kind}_{c}" for kind in ("frac", "delta", "cov", "pred")
                        for classes in PARTITIONS.values() for c in classes)}
"""monitor/entropy_classes.py's tags; their values: test_entropy_change_by_class_adds_up."""
CHECKED_TAGS = {
    "reward/mean", "reward/mean_all", "reward/accuracy", "reward/std", "reward/degenerate_group_frac",
    "reward/parse_fail_frac", "reward/timeout_frac", "reward/error_frac", "data/skipped_prompts",
    "rollout/response_len", "rollout/response_len_max", "rollout/stop_frac", "rollout/generated_tokens",
    "rollout/refill_rounds", "rollout/refill_shortfall", "rollout/logprob_gap",
    "entropy/mean", "entropy/delta_measured", "entropy/delta_predicted", "entropy/delta_slope", "entropy/delta_corr",
    "entropy/delta_first_order", "entropy/delta_higher_order", "entropy/delta_predicted_error",
    "cov/mean", "cov/q10", "cov/q50", "cov/q90", "cov/q99",
    "train/kl_cov_frac", "train/clip_cov_frac", "train/clip_frac_low", "train/clip_frac_high", "train/clip_frac_dual",
    "train/loss", "train/pg_loss", "train/entropy_bonus", "train/ppo_kl", "train/grad_norm", "train/lr",
    "train/weight_version", "train/skipped_updates",
    "coef/kl_cov_ratio", "coef/kl_cov_coef", "coef/entropy_coef", "coef/clip_cov_ratio",
    "eval/accuracy", "eval/response_len", "eval/entropy", *(f"eval/pass@{k}" for k in PASS_K),
    "law/a", "law/b", "law/r2", "law/ceiling",
    "sync/bytes", "sync/time(s)", "sync/GBps", "sync/step_frac", "sync/probe_gap", "sync/probe_tokens", "sync/probe_time(s)",
    "perf/tokens", "perf/tokens_per_s", "perf/step_time_s", "perf/train_time_s", "perf/sync_time_s",
    "perf/rollout_time_s", "perf/reward_time_s", "perf/selection_time_s", "perf/selection_frac",
    "perf/eval_time_s", "perf/histogram_time_s",
    "mem/rollout/host_rss_GiB", "mem/train/host_rss_GiB", "mem/sync/host_rss_GiB",
    *ENTROPY_CLASS_TAGS,
}


def test_tensorboard_holds_the_logged_values_and_every_tag_is_checked_here(truth):
    from megatron_entcov.monitor.metrics import read_scalars

    logged = truth["logged"]
    assert sorted(logged) == list(range(STEPS + 1))
    tags = set().union(*logged.values())
    assert tags <= CHECKED_TAGS, f"logged but not checked by this file: {sorted(tags - CHECKED_TAGS)}"
    scalars = {tag: dict(points) for tag, points in read_scalars(truth["run_dir"]).items()}
    for step, metrics in logged.items():
        for tag, value in metrics.items():
            assert math.isfinite(value), (step, tag, value)
            assert scalars[tag][step] == pytest.approx(float(np.float32(value)), rel=1e-7, abs=1e-30), (step, tag)
    assert {(tag, s) for tag, pts in scalars.items() for s in pts} == \
        {(tag, s) for s, m in logged.items() for tag in m}, "TensorBoard holds other points than were logged"


def test_entropy_and_logprob_gap_equal_a_plain_forward(truth):
    """entropy/mean: the full-softmax entropy at the sampling temperature, token mean over the step's training
    samples (once: not x2), within [0, ln V]; rollout/logprob_gap from the recorded rollout log-probs;
    entropy/delta_measured from the weights after the step."""
    for step in range(1, STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][step]
        assert 0.0 <= got["entropy/mean"] <= math.log(VOCAB)
        _close(got["entropy/mean"], e["entropy/mean"], 1e-4, f"step {step} entropy/mean")
        assert e["rollout/logprob_gap"] < 1e-4, "the engine's log-probs are not at the sampling temperature"
        assert got["rollout/logprob_gap"] == pytest.approx(e["rollout/logprob_gap"], abs=1e-5)
        _close(got["entropy/delta_measured"], e["entropy/delta_measured"], 1e-4, f"step {step} entropy/delta")
        assert abs(e["entropy/delta_measured"]) > 1e-4, "the step did not move the entropy: the check is void"


def test_exact_first_order_entropy_change_equals_float64_logits(truth):
    """entropy/delta_first_order (V = 20 <= metrics.exact_entropy_change_max_vocab): the token mean of the
    per-state first-order change from the full softmax, recomputed from plain float64 forwards of the weights
    before and after the step; entropy/delta_higher_order is the measured change minus it, and
    entropy/delta_predicted_error the covariance prediction minus it."""
    checked = 0
    for step in range(1, STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][step]
        _close(got["entropy/delta_first_order"], e["entropy/delta_first_order"], 1e-5, f"step {step} first order")
        assert abs(e["entropy/delta_first_order"]) > 1e-4, "no first-order change: the check is void"
        assert got["entropy/delta_higher_order"] == pytest.approx(
            got["entropy/delta_measured"] - got["entropy/delta_first_order"], abs=1e-7)
        if "entropy/delta_predicted" in got:
            assert got["entropy/delta_predicted_error"] == pytest.approx(
                got["entropy/delta_predicted"] - got["entropy/delta_first_order"], abs=1e-7)
            checked += 1
        else:
            assert "entropy/delta_predicted_error" not in got, step
    assert checked, "no step had a covariance prediction to compare"


def test_rewards_and_rollout_statistics_equal_the_recorded_samples(truth):
    keys = ["reward/mean", "reward/mean_all", "reward/accuracy", "reward/std", "reward/degenerate_group_frac",
            "reward/parse_fail_frac", "reward/timeout_frac", "reward/error_frac", "data/skipped_prompts",
            "rollout/response_len", "rollout/response_len_max", "rollout/stop_frac", "rollout/generated_tokens",
            "rollout/refill_rounds", "rollout/refill_shortfall", "perf/tokens"]
    dropped = max_above_mean = mixed = 0
    for step in range(1, STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][step]
        for key in keys:
            _close(got[key], e[key], 1e-6, f"step {step} {key}")
        dropped += e["num_dropped"] > 0
        max_above_mean += e["rollout/response_len_max"] > e["rollout/response_len"]
        mixed += 0 < e["reward/mean_all"] < 1
        # The engine's finish reasons agree with the tokens (stop frac above is counted from the tokens).
        for s in e["batch"]:
            assert (s["finish_reason"] == "stop") == (s["response_ids"][-1] == EOS), s
            assert s["finish_reason"] == "stop" or len(s["response_ids"]) == MAX_NEW, s
    # The checks above could not tell the cases apart without these.
    assert dropped, "dynamic sampling never dropped a group: reward/mean_all vs reward/mean is untested"
    assert max_above_mean, "rollout/response_len_max never differed from the mean"
    assert mixed, "rewards are all 0 or all 1: the reward checks are void"


def test_token_shares_coefficients_and_counters(truth):
    """KL-Cov chooses max(int(r N_i), 1) of the N_i valid tokens of global mini-batch i (rows [i M, (i+1) M) of
    the kept batch, whatever the layout); KL-Cov clips nothing; coefficients are the configured ones."""
    m = PROMPTS * N // NUM_MINI
    for step in range(1, STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][step]
        counts = [int(e["lengths"][i * m:(i + 1) * m].sum()) for i in range(NUM_MINI)]
        want = np.mean([max(int(KL_COV_RATIO * n), 1) / n for n in counts])
        _close(got["train/kl_cov_frac"], want, 1e-6, f"step {step} kl_cov_frac {counts}")
        for key in ("train/clip_frac_low", "train/clip_frac_high", "train/clip_frac_dual", "train/clip_cov_frac",
                    "train/kl_cov_frac"):
            assert 0.0 <= got[key] <= 1.0, (step, key, got[key])
        for key in ("train/clip_frac_low", "train/clip_frac_high", "train/clip_frac_dual", "train/clip_cov_frac"):
            assert got[key] == 0.0, f"step {step}: {key}={got[key]} under KL-Cov, which clips nothing"
        for key, value in (("coef/kl_cov_ratio", KL_COV_RATIO), ("coef/kl_cov_coef", KL_COV_COEF),
                           ("coef/entropy_coef", ENTROPY_COEF), ("coef/clip_cov_ratio", CLIP_COV_RATIO)):
            # Exactly the configured constant, not a sum of per-token shares that wobbles in the last bits.
            assert got[key] == pytest.approx(value, rel=1e-15, abs=0), (step, key, got[key])
        for key, value in (("train/lr", LR), ("train/weight_version", step), ("train/skipped_updates", 0.0)):
            _close(got[key], value, 1e-6, f"step {step} {key}")
        # The loss is the policy loss minus the entropy bonus; the bonus is coef * a token-mean entropy.
        _close(got["train/loss"], got["train/pg_loss"] - got["train/entropy_bonus"], 1e-5, "train/loss")
        assert 0.0 < got["train/entropy_bonus"] <= ENTROPY_COEF * math.log(VOCAB)
        assert got["train/grad_norm"] > 0 and math.isfinite(got["train/ppo_kl"])


def test_covariance_statistics_equal_numpy(truth):
    """cov_t = (log p_t - mean log p)(A_t - mean A) over the valid tokens of each global mini-batch (old
    log-probs: loss.selection_logprobs=old), GRPO advantages of the kept batch; cov/mean and the 'lower'
    quantiles averaged over the mini-batches."""
    m = PROMPTS * N // NUM_MINI
    for step in range(1, STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][step]
        means, quantiles = [], {q: [] for q in (10, 50, 90, 99)}
        for i in range(NUM_MINI):
            rows = range(i * m, (i + 1) * m)
            lp = np.concatenate([e["logprobs"][r] for r in rows])
            adv = np.concatenate([np.full(e["lengths"][r], e["advantages"][r]) for r in rows])
            cov = (lp - lp.mean()) * (adv - adv.mean())
            means.append(cov.mean())
            for q in quantiles:
                quantiles[q].append(np.quantile(cov, q / 100, method="lower"))
        assert got["cov/mean"] == pytest.approx(np.mean(means), abs=1e-5), step
        for q, values in quantiles.items():
            assert got[f"cov/q{q}"] == pytest.approx(np.mean(values), abs=1e-4), (step, q)


def test_eval_metrics_equal_own_greedy_decode_and_brute_force_pass_at_k(truth):
    for step in range(STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][("eval", step)]
        prompts, sampled = e["prompts"], e["sampled"]
        assert len(prompts) == EVAL_PROMPTS and len(sampled) == EVAL_PROMPTS * EVAL_N
        assert [s["prompt_ids"] for s in sampled] == [p for p in prompts for _ in range(EVAL_N)]
        # Common random numbers: every evaluation draws its samples with the same seeds.
        assert e["sampled_call"]["seeds"] == truth["expected"][("eval", 0)]["sampled_call"]["seeds"]
        assert len(set(e["sampled_call"]["seeds"])) == EVAL_PROMPTS * EVAL_N
        # Greedy accuracy from our own decode of the weights the evaluator saw.
        assert [s["response_ids"] for s in e["greedy_call"]["samples"]] == e["greedy"], step
        accuracy = np.mean([_leading_int(r) == _value(p) for p, r in zip(prompts, e["greedy"])])
        _close(got["eval/accuracy"], accuracy, 1e-9, f"step {step} eval/accuracy")
        # pass@k: over every k-subset of the n samples of a prompt, does any answer right; mean over prompts.
        correct = [[_reward(s) == 1.0 for s in sampled[i * EVAL_N:(i + 1) * EVAL_N]] for i in range(EVAL_PROMPTS)]
        for k in PASS_K:
            per_prompt = [np.mean([any(c[j] for j in subset) for subset in itertools.combinations(range(EVAL_N), k)])
                          for c in correct]
            _close(got[f"eval/pass@{k}"], np.mean(per_prompt), 1e-9, f"step {step} eval/pass@{k}")
        _close(got["eval/response_len"], np.mean([len(s["response_ids"]) for s in sampled]), 1e-9,
               f"step {step} eval/response_len")
        entropy = np.concatenate(e["entropies"]).mean()
        assert 0.0 <= got["eval/entropy"] <= math.log(VOCAB)
        _close(got["eval/entropy"], entropy, 1e-4, f"step {step} eval/entropy")
        assert got["perf/eval_time_s"] >= 0.0
    pass1 = [truth["logged"][s]["eval/pass@1"] for s in range(STEPS + 1)]
    assert any(0 < p < 1 for p in pass1), f"eval samples all right or all wrong {pass1}: pass@k checks are void"


def test_law_fit_and_entropy_dynamics_equal_numpy_fits(truth):
    """law/*: least squares of eval/accuracy on -exp(eval/entropy) over the evaluations so far, from
    law_fit_min_points on; entropy/delta_*: the slope through the origin of the previous steps' (measured
    entropy change, cov/mean) pairs, and their correlation."""
    logged = truth["logged"]
    for step in range(STEPS + 1):
        got = logged[step]
        h = np.array([logged[s]["eval/entropy"] for s in range(step + 1)])
        r = np.array([logged[s]["eval/accuracy"] for s in range(step + 1)])
        if step + 1 < LAW_MIN_POINTS:
            assert not any(k.startswith("law/") for k in got), (step, got)
            continue
        x = -np.exp(h)
        a, b = np.polyfit(x, r, 1)
        resid = r - (a * x + b)
        ss_tot = float(((r - r.mean()) ** 2).sum())
        r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 1e-15 else 1.0
        for key, value in (("law/a", a), ("law/b", b), ("law/ceiling", b - a), ("law/r2", r2)):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    pairs = {s: (logged[s]["entropy/delta_measured"], logged[s]["cov/mean"]) for s in range(1, STEPS + 1)}
    for step in range(1, STEPS + 1):
        got = logged[step]
        prev = np.array([pairs[s] for s in range(1, step)]).reshape(-1, 2)
        if len(prev) >= 2:
            k = float((prev[:, 0] * prev[:, 1]).sum() / (prev[:, 1] ** 2).sum())
            _close(got["entropy/delta_slope"], k, 1e-6, f"step {step} delta_slope")
            _close(got["entropy/delta_predicted"], k * pairs[step][1], 1e-6, f"step {step} delta_predicted")
        else:
            assert "entropy/delta_predicted" not in got and "entropy/delta_slope" not in got, step
        upto = np.array([pairs[s] for s in range(1, step + 1)])
        if len(upto) >= 3:
            _close(got["entropy/delta_corr"], np.corrcoef(upto[:, 0], upto[:, 1])[0, 1], 1e-6, "delta_corr")
        else:
            assert "entropy/delta_corr" not in got, step
    assert "law/a" in logged[STEPS] and "entropy/delta_corr" in logged[STEPS]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The splitmix64 finaliser (Steele, Lea, Flood 2014) on unsigned 64-bit ints, written here from its
    definition."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _sample_rank(key: int, step: int) -> int:
    """The documented sample order of a token (token_histograms.py): splitmix64(key XOR salt), salt =
    splitmix64(splitmix64(stream seed) XOR step), stream seed = the histogram seed of the run seed."""
    from megatron_entcov.monitor.histograms import histogram_seed

    salt = _splitmix64(_splitmix64(histogram_seed(SEED) & _MASK64) ^ step)
    return _splitmix64(key ^ salt)


def _expected_histograms(e, step, logged):
    """The step's sampled (key, cov, entropy) per tag, redone from the recorded samples: token key = kept-batch
    index * longest sample + position; the HIST_TOKENS / NUM_MINI tokens of each global mini-batch with the
    smallest sample order; among KL-Cov's chosen tokens (the top max(int(r N), 1) by covariance) the same."""
    m = PROMPTS * N // NUM_MINI
    stride = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in e["batch"])
    per_mini = -(-HIST_TOKENS // NUM_MINI)
    want = {"all": [], "chosen": []}
    for i in range(NUM_MINI):
        rows = range(i * m, (i + 1) * m)
        keys = np.concatenate([[r * stride + len(e["batch"][r]["prompt_ids"]) - 1 + j
                                for j in range(e["lengths"][r])] for r in rows]).astype(np.int64)
        lp = np.concatenate([e["logprobs"][r] for r in rows])
        adv = np.concatenate([np.full(e["lengths"][r], e["advantages"][r]) for r in rows])
        ent = np.concatenate([e["entropy"][r] for r in rows])
        cov = (lp - lp.mean()) * (adv - adv.mean())
        order = np.array([_sample_rank(int(k), step) for k in keys], dtype=np.uint64)
        top = np.argsort(-cov, kind="stable")[:max(int(KL_COV_RATIO * len(cov)), 1)]
        for name, candidates in (("all", np.arange(len(keys))), ("chosen", top)):
            picked = candidates[np.argsort(order[candidates], kind="stable")[:per_mini]]
            want[name].extend((int(keys[t]), cov[t], ent[t]) for t in picked)
    return {name: sorted(rows) for name, rows in want.items()}


def test_token_histograms_are_the_documented_sample_of_the_true_values(truth):
    """cov/tokens and entropy/tokens hold, per global mini-batch, the HIST_TOKENS / NUM_MINI tokens with the
    smallest splitmix64 order, in token-key order (so the two arrays pair up token by token); the chosen_*
    arrays the same among KL-Cov's chosen tokens; TensorBoard holds them as histograms with these statistics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(truth["run_dir"] + "/tensorboard", size_guidance={"histograms": 0})
    acc.Reload()
    assert sorted(truth["histograms"]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        got, e = truth["histograms"][step], truth["expected"][step]
        want = _expected_histograms(e, step, truth["logged"][step])
        assert len(want["all"]) == HIST_TOKENS < e["perf/tokens"], "the sample is the whole batch: the check is void"
        for name, prefix in (("all", ""), ("chosen", "chosen_")):
            cov = np.array([c for _, c, _ in want[name]])
            ent = np.array([h for _, _, h in want[name]])
            np.testing.assert_allclose(got[f"cov/{prefix}tokens"], cov, atol=1e-5, err_msg=f"step {step} {name}")
            np.testing.assert_allclose(got[f"entropy/{prefix}tokens"], ent, atol=1e-4, err_msg=f"step {step} {name}")
            for tag in (f"cov/{prefix}tokens", f"entropy/{prefix}tokens"):
                (event,) = [ev for ev in acc.Histograms(tag) if ev.step == step]
                h, values = event.histogram_value, np.array(got[tag])
                assert h.num == len(values) == sum(h.bucket), (step, tag)
                assert (h.min, h.max) == pytest.approx((values.min(), values.max()), abs=1e-6), (step, tag)
                assert h.sum == pytest.approx(values.sum(), abs=1e-5) and \
                    h.sum_squares == pytest.approx((values ** 2).sum(), abs=1e-5), (step, tag)
        # KL-Cov chooses the highest covariances of each global mini-batch: there, the chosen sample lies in the
        # upper half of the batch's sample (pooled over mini-batches it need not: another mini-batch's
        # covariances may all be larger).
        stride = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in e["batch"])
        mini = lambda key: key // stride // (PROMPTS * N // NUM_MINI)        # noqa: E731
        for i in range(NUM_MINI):
            chosen = [c for k, c, _ in want["chosen"] if mini(k) == i]
            sampled = [c for k, c, _ in want["all"] if mini(k) == i]
            assert min(chosen) >= np.median(sampled), (step, i)


def test_sync_and_perf_metrics(truth):
    snapshot = truth["snapshots"][("train", 1)]
    # Tied embeddings: lm_head.weight is the embedding, sent once.
    assert np.array_equal(snapshot["lm_head.weight"], snapshot["model.embed_tokens.weight"])
    nbytes = sum(v.nbytes for k, v in snapshot.items() if k != "lm_head.weight")
    for step in range(1, STEPS + 1):
        got, e = truth["logged"][step], truth["expected"][step]
        assert got["sync/bytes"] == nbytes
        _close(got["sync/GBps"], got["sync/bytes"] / max(got["sync/time(s)"], 1e-9) / 1e9, 1e-6, "sync/GBps")
        # The share of the step spent syncing (the sync is timed inside the step).
        _close(got["sync/step_frac"], got["sync/time(s)"] / got["perf/step_time_s"], 1e-6, "sync/step_frac")
        assert 0 < got["sync/step_frac"] < 1
        # One probe of probe_tokens tokens (no stop token) after the step's sync, on the synced weights.
        ((probe, logprobs),) = e["probes"]
        assert got["sync/probe_tokens"] == len(probe["response_ids"]) == PROBE_TOKENS
        gap = float(np.abs(np.array(probe["rollout_logprobs"]) - logprobs).max())
        assert gap < 1e-4 and got["sync/probe_gap"] < 1e-4, (gap, got["sync/probe_gap"])
        times = {k: got[k] for k in got if k.endswith("(s)")}
        assert all(t >= 0 for t in times.values()), times
        assert got["perf/train_time_s"] + got["perf/sync_time_s"] <= got["perf/step_time_s"] * (1 + 1e-9)
        assert got["perf/rollout_time_s"] <= got["perf/step_time_s"]
        _close(got["perf/tokens_per_s"], got["perf/tokens"] / got["perf/step_time_s"], 1e-6, "tokens_per_s")
        _close(got["perf/selection_frac"], got["perf/selection_time_s"] / got["perf/step_time_s"], 1e-6,
               "selection_frac")
        assert got["perf/histogram_time_s"] <= got["perf/step_time_s"]
        # Resident host memory at the end of each phase: at most the process's peak (getrusage, independent of
        # psutil), and at least what torch and Megatron alone take. No GPU figures on CPU, no offload without
        # colocated servers.
        for phase in ("rollout", "train", "sync"):
            assert 0.2 < got[f"mem/{phase}/host_rss_GiB"] <= truth["peak_rss_gib"] * (1 + 1e-9)
            assert f"mem/{phase}/allocated_GiB" not in got and "mem/offloaded_GiB" not in got


DP_EQUAL_SECTIONS = ("reward/", "rollout/", "eval/", "cov/", "law/", "coef/", "data/")
DP_EQUAL_KEYS = {"entropy/mean", "entropy/delta_measured", "entropy/delta_first_order", "train/kl_cov_frac", "train/weight_version",
                 "train/skipped_updates", "perf/tokens", "sync/bytes"}


def test_two_data_parallel_replicas_log_what_one_process_logs(truth, run2):
    """Global statistics, not per-replica averages: the dp2 run's metrics equal the one-process run's."""
    one = truth["logged"]
    two = {}
    for step, metrics in run2["logs"]:
        two[step] = metrics
    assert sorted(two) == list(range(STEPS_DP2 + 1))
    compared = 0
    for step, metrics in two.items():
        keys = [k for k in one[step] if k.startswith(DP_EQUAL_SECTIONS) or k in DP_EQUAL_KEYS]
        assert set(keys) <= set(metrics), (step, sorted(set(keys) - set(metrics)))
        for key in keys:
            tol = 1e-4 if key.startswith(("entropy/", "eval/entropy", "cov/", "law/")) else 1e-6
            assert metrics[key] == pytest.approx(one[step][key], rel=tol, abs=tol), \
                f"step {step} {key}: dp2 {metrics[key]!r}, one process {one[step][key]!r}"
            compared += 1
        if step:
            # One probe per replica, counted over both.
            assert metrics["sync/probe_tokens"] == 2 * PROBE_TOKENS
            # The histogram sample is a function of the token keys: the same tokens, in the same order.
            for tag, values in truth["histograms"][step].items():
                np.testing.assert_allclose(run2["histograms"][step][tag], values, atol=1e-5, err_msg=tag)
                compared += 1
    assert compared > 60


def test_entropy_change_by_class_adds_up(truth):
    """Each partition's shares of the measured change add up to entropy/delta_measured, its covariance shares to
    entropy_class/cov_total, its token shares to 1; the predicted shares are the law's slope times the covariance
    shares (monitor/entropy_classes.py; the class masks themselves: tests/unit/monitor/test_entropy_classes.py)."""
    for step, m in truth["logged"].items():
        if "entropy/delta_measured" not in m:
            continue
        for classes in PARTITIONS.values():
            _close(sum(m[f"entropy_class/frac_{c}"] for c in classes), 1.0, 1e-9, f"step {step} frac {classes}")
            _close(sum(m[f"entropy_class/delta_{c}"] for c in classes), m["entropy/delta_measured"], 1e-6,
                   f"step {step} delta {classes}")
            _close(sum(m[f"entropy_class/cov_{c}"] for c in classes), m["entropy_class/cov_total"], 1e-6,
                   f"step {step} cov {classes}")
            if "entropy/delta_slope" in m:
                for c in classes:
                    _close(m[f"entropy_class/pred_{c}"], m["entropy/delta_slope"] * m[f"entropy_class/cov_{c}"],
                           1e-9, f"step {step} pred {c}")
