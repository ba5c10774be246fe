"""bench/reproduce.py --smoke end to end (a tiny model, 2 RL steps per method, one seed; about 1-2 minutes on
2 cores): every key the reproduction promises is in summary.json, the four plots exist, and the numbers are the runs'
own: curves equal the TensorBoard scalars read back here, and the law fit and the covariance correlation equal
an independent computation on those curves. The same runs then check the long profile's re-scoring: a kept
checkpoint re-scored at the trainer's own temperature gives the trainer's evaluation back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from script_modules import load_script

from megatron_entcov.monitor.metrics import read_scalars

ROOT = Path(__file__).resolve().parents[2]


def _load_reproduce():
    return load_script("reproduce_bench", ROOT / "bench" / "reproduce.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    reproduce = _load_reproduce()
    out = tmp_path_factory.mktemp("repro")
    # --steps overrides the profile's RL steps (3 in the smoke profile)
    assert reproduce.main(["--smoke", "--seeds", "5", "--out", str(out), "--jobs", "1", "--steps", "2"]) == 0
    return reproduce, out


def test_reproduce_smoke(smoke):
    reproduce, out = smoke
    summary = json.loads((out / "summary.json").read_text())
    for name in ("entropy.png", "eval.png", "law.png", "pass_at_k.png", "table.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "sft_hf" / "config.json").is_file() and (out / "sft_hf" / "tokenizer.json").is_file()
    assert set(summary["methods"]) == set(reproduce.METHODS)
    keys = {"final_eval_accuracy", "final_eval_pass_at_k", "final_entropy", "entropy_drop_first_quarter", "law_a",
            "law_b", "law_r2", "law_ceiling", "cov_dh_corr", "curves"}
    for method, m in summary["methods"].items():
        entry = m["seeds"]["5"]
        assert keys <= set(entry), (method, keys - set(entry))
        assert set(entry["final_eval_pass_at_k"]) == {"1", "2", "4", "8", "16"}
        scalars = read_scalars(out / "runs" / f"{method}_s5")
        curves = entry["curves"]
        # values come from the run: curves are its scalars, finals the last evaluation
        assert curves["entropy"] == [v for _, v in scalars["entropy/mean"]]
        assert curves["eval_accuracy"] == [v for _, v in scalars["eval/accuracy"]]
        assert entry["final_eval_accuracy"] == scalars["eval/accuracy"][-1][1]
        assert curves["eval_mean_accuracy"] == [v for _, v in scalars["eval/pass@1"]]
        assert entry["final_eval_mean_accuracy"] == scalars["eval/pass@1"][-1][1]
        assert entry["final_eval_pass_at_k"]["16"] == scalars["eval/pass@16"][-1][1]
        assert entry["final_entropy"] == scalars["eval/entropy"][-1][1]
        assert curves["delta_h_first_order"] == [v for _, v in scalars.get("entropy/delta_first_order", [])]
        assert len(curves["eval_accuracy"]) == 2 + 1 and len(curves["entropy"]) == 2
        h = np.asarray(curves["entropy"])
        assert np.isclose(entry["entropy_drop_first_quarter"], 1 - h[1] / h[0])
        # the law fits equal independent least-squares fits of R (avg@16; greedy) on -exp(H)
        x = -np.exp(np.asarray(curves["eval_entropy"]))
        for prefix, r in (("law", curves["eval_mean_accuracy"]), ("law_greedy", curves["eval_accuracy"])):
            slope, intercept = np.polyfit(x, r, 1)
            assert np.isclose(entry[f"{prefix}_a"], slope, atol=1e-9), prefix
            assert np.isclose(entry[f"{prefix}_b"], intercept, atol=1e-9), prefix
            assert np.isclose(entry[f"{prefix}_ceiling"], intercept - slope, atol=1e-9), prefix
        dh, cov = np.asarray(curves["delta_h_measured"]), np.asarray(curves["cov_mean"])
        if entry["cov_dh_corr"] is not None:
            assert np.isclose(entry["cov_dh_corr"], np.corrcoef(dh, -cov)[0, 1])
    assert "grpo_law_r2_ge_0.9" in summary["goals"]
    # the analysis reads the same curves: one seed, so paired differences are the plain differences of the finals
    a = summary["analysis"]
    assert a["main_temperature"] == "1" and set(a["vs_start"]) == set(reproduce.METHODS)
    grpo = summary["methods"]["grpo"]["seeds"]["5"]
    for method, pairs in a["paired_vs_grpo"].items():
        entry = summary["methods"][method]["seeds"]["5"]
        assert np.isclose(pairs["avg16_t1"]["mean"], entry["final_eval_mean_accuracy"] - grpo["final_eval_mean_accuracy"])
        assert np.isclose(pairs["pass16_t1"]["mean"],
                          entry["final_eval_pass_at_k"]["16"] - grpo["final_eval_pass_at_k"]["16"])


def test_rescoring_at_the_trainers_temperature_gives_its_evaluation_back(smoke):
    """rescore_run on a finished run's kept (final) checkpoint and the SFT start, at T = 1 (the trainer's
    eval.temperature): greedy accuracy, avg@16, pass@16 and the samples' entropy equal the trainer's own
    evaluation at steps 0 and 2 (same weights, same per-sample seeds and weight version: without the version, the
    step-2 samples differ although a zero-reward GRPO step leaves the weights where they were)."""
    reproduce, out = smoke
    info = json.loads((out / "sft_info.json").read_text())
    profile = dict(reproduce.PROFILES["smoke"], steps=2)
    spec = reproduce.run_specs(out, profile, [5], ["grpo"], Path(info["checkpoint"]))[0]
    run_dir = Path(spec["run_dir"])
    scores = reproduce.rescore_run(reproduce.BASE_CONFIG, spec["set"], run_dir, Path(info["checkpoint"]), [1.0])
    scalars = read_scalars(run_dir)
    t1 = scores["1"]
    assert t1["step"] == [0, 2]
    for key, tag in (("accuracy", "eval/accuracy"), ("mean_accuracy", "eval/pass@1"),
                     ("entropy_samples", "eval/entropy")):
        trainer = dict(scalars[tag])
        assert np.allclose(t1[key], [trainer[0], trainer[2]], rtol=0, atol=1e-6), key
    assert np.allclose(t1["pass_at_k"]["16"], [dict(scalars["eval/pass@16"])[s] for s in (0, 2)], atol=1e-6)
    again = reproduce.rescore_run(reproduce.BASE_CONFIG, spec["set"], run_dir, Path(info["checkpoint"]), [1.0])
    assert again == json.loads((run_dir / "rescore.json").read_text())            # nothing re-scored twice
