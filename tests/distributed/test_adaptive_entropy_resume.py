"""The adaptive entropy coefficient (loss.target_entropy, Skywork-OR1) resumes bit for bit in a real run.

One process trains a tiny policy for STEPS steps with high_entropy_tokens and the adaptive coefficient, two
optimizer mini-batches per step; a second run with the same seed is stopped after step STOP_AFTER (a stop request,
as SIGTERM makes one: the trainer checkpoints the step and returns), then resumed from its checkpoint
(checkpoint.resume=true) to STEPS. Every optimizer step's (e_k, c_{k+1}), the entropy the coefficient reads and
the coefficient it gives, must be the same floats in both runs, as must the final state in trainer_state.json.
e_k depends on the weights, which the gated entropy term moves, so a coefficient restored wrong (reset to c_0, or
counted twice) would also show in the entropies that follow.
"""

from __future__ import annotations

import json
import signal

import pytest
from dist_utils import TINY_MODEL, TINY_STEP, run_workers

pytestmark = pytest.mark.distributed

STEPS, STOP_AFTER = 3, 1
METHOD = ["loss.name=high_entropy_tokens", "loss.high_entropy_ratio=0.5", "loss.target_entropy=10",
          "loss.target_entropy_delta=0.05", "loss.target_entropy_coef_init=0.1", "loss.entropy_coef=0",
          "optim.num_mini_batches=2", "optim.lr=1e-2", "metrics.tensorboard=false",
          "metrics.measure_entropy_change=false", "checkpoint.save_interval=0", "weight_sync.verify=version",
          f"steps={STEPS}"]


def _train(out_dir, name, *, resume, stop_after):
    """One trainer run; returns each optimizer step's (e_k, c_{k+1}) and the checkpointed coefficient state."""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import init_parallel
    from megatron_entcov.run.stop import clear_stop, request_stop
    from megatron_entcov.trainer import Trainer

    cfg = load_config(None, TINY_MODEL + TINY_STEP + METHOD + [
        f"output_dir={out_dir}", f"name={name}", f"checkpoint.resume={str(resume).lower()}"]).resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    trainer = Trainer(cfg, ps)
    start = trainer.entropy_control.state_dict()
    trajectory = []
    control, update, real_step = trainer.entropy_control, trainer.entropy_control.update, trainer.train_step

    def recorded_update(*args, **kwargs):
        e_k = update(*args, **kwargs)
        trajectory.append((e_k, control.coef))
        return e_k

    def train_step():
        out = real_step()
        if stop_after is not None and trainer.step + 1 == stop_after:    # as a SIGTERM during this step
            request_stop(signal.SIGTERM)
        return out

    control.update, trainer.train_step = recorded_update, train_step
    try:
        trainer.train()
    finally:
        trainer.close()
        clear_stop()
    saved = sorted(trainer.checkpointer.root.glob("*/trainer_state.json"))
    state = json.loads(saved[-1].read_text())["entropy_control"] if saved else None
    return {"start": start, "trajectory": trajectory, "stopped_at": trainer.step, "signal": trainer.stop_signal,
            "state": state, "live": control.state_dict()}


def _worker(rank, world_size, out_dir):
    whole = _train(out_dir, "whole", resume=False, stop_after=None)
    first = _train(out_dir, "stopped", resume=False, stop_after=STOP_AFTER)
    second = _train(out_dir, "stopped", resume=True, stop_after=None)
    return {"whole": whole, "first": first, "second": second}


def test_a_stopped_and_resumed_run_has_the_uninterrupted_coefficient_trajectory(tmp_path):
    runs = run_workers(_worker, 1, args=(str(tmp_path),), timeout=400)[0]
    whole, first, second = runs["whole"], runs["first"], runs["second"]
    updates_per_step = 2
    assert len(whole["trajectory"]) == STEPS * updates_per_step
    assert first["signal"] == signal.SIGTERM and first["stopped_at"] == STOP_AFTER
    assert len(first["trajectory"]) == STOP_AFTER * updates_per_step
    # The resumed run starts from the stopped run's c_k and count, not from loss.target_entropy_coef_init.
    assert second["start"] == first["state"] == {"coef": first["trajectory"][-1][1],
                                                 "updates": STOP_AFTER * updates_per_step}
    assert second["start"]["coef"] != 0.1
    assert first["trajectory"] + second["trajectory"] == whole["trajectory"]       # floats, bit for bit
    assert second["state"] == whole["state"] == whole["live"]
    # Non-trivial: the entropy moved between updates, and the coefficient with it (here below the target).
    assert len({e for e, _ in whole["trajectory"]}) == len(whole["trajectory"])
    assert [c for _, c in whole["trajectory"]] == pytest.approx([0.1 + 0.05 * (k + 1) for k in range(6)], abs=1e-12)
