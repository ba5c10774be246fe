"""Re-score a finished run's kept checkpoints at other evaluation temperatures (bench/reproduce.py, long profile).

The trainer evaluates at one temperature (eval.temperature, 1 here: the training temperature, so eval/entropy is
the policy's entropy on its own samples). The paper scores its sampled benchmarks at T = 0.6; every kept
checkpoint (checkpoint.save_interval = the evaluation interval, all kept) and the SFT start (step 0) are scored
again here with the trainer's own Evaluator at each extra temperature: the same held-out problems, the same
per-sample seeds and weight version (so the same sampling noise as the trainer's evaluation at that step),
greedy accuracy, pass@k, avg@n (eval/pass@1), the entropy of those samples. Re-scored at the trainer's own
temperature, a checkpoint gives the trainer's evaluation back (tests/bench/test_reproduce_smoke.py). Results go to
<run_dir>/rescore.json, written after each checkpoint, so an interrupted pass resumes where it stopped.

Example:
    rescore_run(BASE_CONFIG, spec["set"], Path(spec["run_dir"]), Path(sft_ckpt), [0.6])
    json.loads((run_dir / "rescore.json").read_text())["0.6"]["mean_accuracy"]
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

__all__ = ["rescore_run", "checkpoints_to_score", "RESCORE_FILE"]

RESCORE_FILE = "rescore.json"


def checkpoints_to_score(run_dir: Path, sft_ckpt: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint) of the SFT start (step 0) and every complete step_N the run kept, oldest first."""
    from megatron_entcov.run.checkpoint import list_complete_steps

    return [(0, sft_ckpt), *list_complete_steps(run_dir / "checkpoints")]


def _empty() -> dict:
    return {"step": [], "accuracy": [], "mean_accuracy": [], "entropy_samples": [], "response_len": [],
            "pass_at_k": {}, "time_s": []}


def _record(block: dict, step: int, metrics: dict) -> None:
    block["step"].append(step)
    block["accuracy"].append(metrics["eval/accuracy"])
    block["mean_accuracy"].append(metrics["eval/pass@1"])
    block["entropy_samples"].append(metrics["eval/entropy"])
    block["response_len"].append(metrics["eval/response_len"])
    block["time_s"].append(metrics["perf/eval_time_s"])
    for key, value in metrics.items():
        if key.startswith("eval/pass@"):
            block["pass_at_k"].setdefault(key.split("@")[1], []).append(value)


def _weight_version(load: Path) -> int:
    """The weight version a kept RL checkpoint was trained to (its trainer_state.json); 0 for the SFT start."""
    state = load / "trainer_state.json"
    return int(json.loads(state.read_text())["weight_version"]) if state.is_file() else 0


def _evaluate(base_config: Path, sets: list[str], load: Path, temperature: float, ps) -> dict:
    """The trainer's evaluation of the weights in ``load`` at ``temperature`` (a throw-away run directory)."""
    from megatron_entcov.config import load_config
    from megatron_entcov.trainer import Trainer

    scratch = Path(tempfile.mkdtemp(prefix="rescore_"))
    try:
        cfg = load_config(str(base_config), [*sets, f"checkpoint.load={load}", f"eval.temperature={temperature}",
                                             f"output_dir={scratch}", "name=rescore", "eval.interval=1",
                                             "metrics.tensorboard=false", "checkpoint.resume=false"])
        cfg.resolve(1)
        trainer = Trainer(cfg, ps)
        try:
            # The engine's sampling noise is mix_seed(sample seed, weight version, position): push the weights again
            # under the version they had in training, so the samples are those of the trainer's own evaluation at
            # that step (at its temperature: the same numbers; at another: the same noise).
            trainer.weight_sync.push(trainer.engine, _weight_version(load))
            return trainer.evaluator.run(trainer.engine, trainer.actor)
        finally:
            trainer.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def rescore_run(base_config: Path, sets: list[str], run_dir: Path, sft_ckpt: Path,
                temperatures: list[float]) -> dict:
    """Score step 0 and every kept checkpoint of ``run_dir`` at each temperature (those already in
    rescore.json are kept); returns the file's content: temperature key -> per-step lists."""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel

    path = run_dir / RESCORE_FILE
    scores = json.loads(path.read_text()) if path.is_file() else {}
    todo = [(f"{float(t):g}", t, step, ck) for t in temperatures
            for step, ck in checkpoints_to_score(run_dir, sft_ckpt)
            if step not in scores.get(f"{float(t):g}", {}).get("step", [])]
    if not todo:
        return scores
    cfg = load_config(str(base_config), sets)
    cfg.resolve(1)
    ps = init_parallel(cfg.parallel, seed=cfg.seed)
    try:
        for key, t, step, ck in todo:
            _record(scores.setdefault(key, _empty()), step, _evaluate(base_config, sets, ck, t, ps))
            path.write_text(json.dumps(scores, indent=1))
    finally:
        destroy_parallel()
    return scores
