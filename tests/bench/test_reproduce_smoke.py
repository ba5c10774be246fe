"""bench/reproduce.py --smoke end to end (a tiny model, 3 RL steps per method, one seed; about 1-2 minutes on
2 cores): every key the reproduction promises is in summary.json, the four plots exist, and the numbers are the runs'
own: curves equal the TensorBoard scalars read back here, and the law fit and the covariance correlation equal
an independent computation on those curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from script_modules import load_script

from megatron_entcov.monitor.metrics import read_scalars

ROOT = Path(__file__).resolve().parents[2]


def _load_reproduce():
    return load_script("reproduce_bench", ROOT / "bench" / "reproduce.py")


def test_reproduce_smoke(tmp_path):
    reproduce = _load_reproduce()
    out = tmp_path / "repro"
    # --steps overrides the profile's RL steps (3 in the smoke profile)
    assert reproduce.main(["--smoke", "--seeds", "5", "--out", str(out), "--jobs", "1", "--steps", "2"]) == 0
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
