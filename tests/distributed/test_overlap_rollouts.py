"""rollout.overlap end to end at dp 2 with the embedded engine (gloo, CPU), checked against independent runs.

What is checkable, and checked here:
* the experience step t+1 trains on is exactly what a non-overlapped trainer generates for step t+1 with the
  weights from BEFORE step t's update: the reference trainer (overlap off, same seed) generates step 2's and
  step 3's batches itself with collect_experience at weight versions 0 and 1 (token ids equal, rollout
  log-probs equal to float32 rounding) and the overlapped run's step 1 equals the reference's step 1;
* every sample of steps 2 and 3 carries weight version (step - 2): rollout/staleness = staleness_max = 1;
* train/is_ratio_mean, train/tis_weight_mean and train/tis_clip_frac equal the token means of
  exp(old - rollout), min(that, cap) and [that > cap] computed here from each step's batch (the trainer's own
  recomputed old log-probs and the rollout log-probs), summed over both replicas;
* resume: stopped (signal) after step 2 while step 3's rollouts were already prefetched, then resumed to step 4,
  the run trains the same prompts at every step as an uninterrupted run, and step 3 is regenerated with the
  checkpoint's weights (version 2).
"""

from __future__ import annotations

import pytest
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

CAP = 1.05
"""Below the spread of the stale ratios (|log ratio| ~0.15 per token here): the cap applies to some tokens."""
TINY = [*TINY_MODEL, *TINY_STEP, "optim.num_mini_batches=1", "optim.lr=1e-2", "loss.name=ppo",
        "loss.entropy_coef=0.01", f"loss.tis_cap={CAP}", "metrics.log_interval=1",
        "metrics.measure_entropy_change=false"]


def _recorder(trainer):
    """Record each step's trained rows (by global sample id) and this rank's TIS sums over its batch."""
    import torch

    log: list[dict] = []
    inner_batch, inner_logprobs = trainer._experience_batch, trainer.actor.logprobs

    def experience_batch():
        batch, exp = inner_batch()
        log.append({"step": trainer.step + 1, "rows": {i: s.to_dict() for i, s in zip(exp.sample_ids, exp.samples)},
                    "prefetching": trainer.prefetch is not None and trainer.prefetch.pending})
        return batch, exp

    def logprobs(batch, *args, **kwargs):
        out = inner_logprobs(batch, *args, **kwargs)
        if "tis" not in log[-1]:                 # the step's first forward: its old log-probs
            mask = batch.loss_mask.bool()
            ratio = torch.exp(out[0].double() - batch.rollout_logprobs.double())[mask]
            log[-1]["tis"] = [float(ratio.sum()), float(ratio.clamp(max=CAP).sum()), float((ratio > CAP).sum()),
                              float(mask.sum())]
        return out

    trainer._experience_batch, trainer.actor.logprobs = experience_batch, logprobs
    return log


def _overlapped_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + ["steps=3", "rollout.overlap=true", f"output_dir={run_dir}",
                                    "name=overlap"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    log = _recorder(trainer)
    metrics = []
    try:
        while trainer.step < cfg.steps:
            metrics.append(trainer.train_step())
            trainer.step += 1
        assert trainer.rollout_group is not None and not trainer.prefetch.pending
    finally:
        trainer.close()
    return {"log": log, "metrics": metrics}


def _reference_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.experience import collect_experience, dp_gather
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + ["steps=3", f"output_dir={run_dir}", "name=reference"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    assert ps.is_generator and trainer.prefetch is None        # dp 2, tp 1: every rank generates

    def generate(step):
        """Step ``step``'s global batch from the loader's next-but-one batch (the one the overlapped run's
        prefetch draws), with the weights the engine holds now."""
        start = trainer.loader.state_dict()
        trainer.loader.next_global_batch()
        exp = collect_experience(cfg, trainer.engine, trainer.tokenizer, trainer.loader, step=step,
                                 dp_rank=ps.dp_rank, dp_size=ps.dp_size, gather=dp_gather(ps))
        trainer.loader.load_state_dict(start)
        return {s.index: s.to_dict() for s in exp.samples}

    log = _recorder(trainer)
    try:
        step2_v0 = generate(1)                  # before any update: weights version 0
        trainer.train_step()                   # step 1, as the overlapped run's (no prefetched batch yet)
        trainer.step += 1
        step3_v1 = generate(2)                  # after step 1's update and sync: version 1
    finally:
        trainer.close()
    return {"step1": log[0]["rows"], "step2": step2_v0, "step3": step3_v1}


def _merge(per_rank: list[dict]) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for part in per_rank:
        assert not rows.keys() & part.keys(), "replicas trained overlapping rows"
        rows.update(part)
    return dict(sorted(rows.items()))


def _assert_same_samples(got: dict[int, dict], want: dict[int, dict], what: str):
    assert sorted(got) == sorted(want), what
    for i in want:
        g, w = got[i], want[i]
        assert g["prompt_ids"] == w["prompt_ids"] and g["response_ids"] == w["response_ids"], (what, i)
        assert g["weight_version"] == w["weight_version"], (what, i)
        assert g["rollout_logprobs"] == pytest.approx(w["rollout_logprobs"], abs=1e-5), (what, i)


def test_overlapped_steps_train_the_previous_weights_rollouts_with_tis(tmp_path):
    over = run_workers(_overlapped_worker, 2, (str(tmp_path),), timeout=400)
    ref = run_workers(_reference_worker, 2, (str(tmp_path),), timeout=400)
    trained = {step: _merge([r["log"][step - 1]["rows"] for r in over]) for step in (1, 2, 3)}
    assert [entry["prefetching"] for entry in over[0]["log"]] == [True, True, False]   # none after the last step

    _assert_same_samples(trained[1], _merge([r["step1"] for r in ref]), "step 1 (generated synchronously)")
    assert ref[0]["step2"] == ref[1]["step2"] and ref[0]["step3"] == ref[1]["step3"]   # global, on each replica
    _assert_same_samples(trained[2], ref[0]["step2"], "step 2 = the reference's step-2 batch at version 0")
    _assert_same_samples(trained[3], ref[0]["step3"], "step 3 = the reference's step-3 batch at version 1")
    for step in (1, 2, 3):
        assert {s["weight_version"] for s in trained[step].values()} == {max(step - 2, 0)}

    metrics = over[0]["metrics"]
    for mine, theirs in zip(metrics, over[1]["metrics"]):                          # one value on every rank
        assert {k: v for k, v in mine.items() if k.startswith(("rollout/stale", "train/"))} == \
            {k: v for k, v in theirs.items() if k.startswith(("rollout/stale", "train/"))}
    for step, m in enumerate(metrics, 1):
        lag = 0.0 if step == 1 else 1.0
        assert m["rollout/staleness"] == lag and m["rollout/staleness_max"] == lag, (step, m)
        assert m["train/weight_version"] == step and m["perf/overlap_wait(s)"] >= 0.0
        sums = [sum(r["log"][step - 1]["tis"][k] for r in over) for k in range(4)]
        assert m["train/is_ratio_mean"] == pytest.approx(sums[0] / sums[3], rel=1e-5), step
        assert m["train/tis_weight_mean"] == pytest.approx(sums[1] / sums[3], rel=1e-5), step
        assert m["train/tis_clip_frac"] == pytest.approx(sums[2] / sums[3], abs=1e-6), step
    # The stale steps really are off-policy, and the cap bites: the test would not notice a fresh batch else.
    assert metrics[0]["train/tis_clip_frac"] == 0.0
    assert max(m["train/tis_clip_frac"] for m in metrics[1:]) > 0.0
    assert all(m["rollout/logprob_gap"] > 1e-3 for m in metrics[1:])


def _resume_worker(rank, world_size, run_dir, phase):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.run.stop import clear_stop, request_stop
    from megatron_entcov.trainer import Trainer

    name = "whole" if phase == "whole" else "stopped"
    cfg = load_config(None, TINY + ["steps=4", "rollout.overlap=true", "checkpoint.save_interval=0",
                                    f"checkpoint.resume={phase == 'resume'}", f"output_dir={run_dir}",
                                    f"name={name}"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    log = _recorder(trainer)
    if phase == "stop":
        inner = trainer.train_step

        def train_step():
            out = inner()
            if trainer.step == 1:           # stepping to 2: ask to stop at the next step boundary
                request_stop(10)
            return out
        trainer.train_step = train_step
    try:
        trainer.train()
        return {"log": log, "step": trainer.step, "stop": trainer.stop_signal,
                "prefetched": trainer._prefetched is not None}
    finally:
        clear_stop()
        trainer.close()


def test_resume_after_a_stop_trains_the_prefetched_prompts(tmp_path):
    whole = run_workers(_resume_worker, 2, (str(tmp_path), "whole"), timeout=400)
    stopped = run_workers(_resume_worker, 2, (str(tmp_path), "stop"), timeout=400)
    resumed = run_workers(_resume_worker, 2, (str(tmp_path), "resume"), timeout=400)
    assert stopped[0]["step"] == 2 and stopped[0]["stop"] == 10
    assert stopped[0]["prefetched"]              # step 3's rollouts had been generated: the checkpoint drops them
    assert resumed[0]["step"] == 4 and [e["step"] for e in resumed[0]["log"]] == [3, 4]

    def prompts(runs, index):
        rows = _merge([r["log"][index]["rows"] for r in runs])
        return [rows[i]["prompt_ids"] for i in rows]

    expected = [prompts(whole, i) for i in range(4)]
    assert [prompts(stopped, i) for i in range(2)] + [prompts(resumed, i) for i in range(2)] == expected
    assert len({tuple(map(tuple, p)) for p in expected}) == 4            # four different batches
    versions = {s["weight_version"] for s in _merge([r["log"][0]["rows"] for r in resumed]).values()}
    assert versions == {2}                     # regenerated from the checkpoint's weights (the whole run: 1)
    assert {s["weight_version"] for s in _merge([r["log"][2]["rows"] for r in whole]).values()} == {1}


def _failing_worker(rank, world_size, run_dir):
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY + ["steps=3", "rollout.overlap=true", f"output_dir={run_dir}",
                                    "name=failing"]).resolve(world_size)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    calls = []
    inner = trainer.engine.generate

    def generate(*args, **kwargs):           # replica 1's second call: step 2's rollouts, in the background
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise ConnectionError("server of replica 1 went away")
        return inner(*args, **kwargs)

    trainer.engine.generate = generate
    try:
        trainer.train_step()
    except Exception as err:                 # noqa: BLE001 - reported to the test
        return {"error": f"{type(err).__name__}: {err}", "notes": getattr(err, "__notes__", []),
                "pending": trainer.prefetch.pending, "version": trainer.weight_version}
    finally:
        trainer.close()
    return {"error": None}


def test_an_error_in_the_background_rollout_fails_every_rank_at_the_wait(tmp_path):
    results = run_workers(_failing_worker, 2, (str(tmp_path),), timeout=400)
    own, other = results[1], results[0]
    assert own["error"] == "ConnectionError: server of replica 1 went away"
    assert any("step index 1" in note for note in own["notes"])
    # Replica 0's thread learnt it in the round's gather; either way it fails in the same step, before the sync.
    assert other["error"] is not None and "replica 1" in other["error"]
    for r in results:
        assert not r["pending"] and r["version"] == 0      # failed at the wait: no new version, no sync
