"""SFT's learning-rate schedule (sft.lr_decay_style): the rate each step logs equals the warm-up-then-decay
formula written out here, and a decayed run ends at 0."""

from __future__ import annotations

import math

import pytest
from dist_utils import run_workers

pytestmark = pytest.mark.distributed

TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.vocab_size=32", "model.make_vocab_size_divisible_by=8",
    "model.max_position_embeddings=64", "rollout.max_prompt_len=16", "optim.micro_batch_size=4",
    "sft.batch_size=4", "sft.eval_size=0", "sft.steps=7", "sft.warmup_steps=2", "sft.lr=0.01",
]


def _sft_worker(rank, world_size, run_dir, styles):
    """SFT once per style, one after another in this process; the logged sft/lr of each."""
    from megatron_entcov.config import load_config
    from megatron_entcov.distributed.parallel import destroy_parallel, init_parallel
    from megatron_entcov.monitor.metrics import read_scalars
    from megatron_entcov.sft import run_sft

    logged = {}
    for style in styles:
        cfg = load_config(None, TINY + [f"sft.lr_decay_style={style}", f"output_dir={run_dir}", f"name={style}",
                                        "metrics.log_interval=1"]).resolve(world_size)
        run_sft(cfg, init_parallel(cfg.parallel, seed=cfg.seed))
        destroy_parallel()
        logged[style] = [v for _, v in read_scalars(f"{run_dir}/{style}/sft")["sft/lr"]]
    return logged


def _expected(style: str, steps: int = 7, warmup: int = 2, peak: float = 0.01) -> list[float]:
    """The rate of optimizer step t = 1..steps: linear warm-up to the peak over `warmup` steps, then the decay
    over the remaining steps to 0 at the last one (the rate a step trains with is set after the previous step)."""
    out = []
    for t in range(1, steps + 1):
        done = t - 1                                   # scheduler steps taken before step t trains
        if done < warmup:
            out.append(peak * done / warmup)
            continue
        ratio = (done - warmup) / (steps - warmup)
        out.append({"constant": peak, "linear": peak * (1 - ratio),
                    "cosine": peak * 0.5 * (1 + math.cos(math.pi * ratio))}[style])
    return out


def test_sft_lr_follows_the_schedule(tmp_path):
    styles = ("constant", "linear", "cosine")
    logged = run_workers(_sft_worker, 1, (str(tmp_path), styles), timeout=300)[0]
    for style in styles:
        expected = _expected(style)
        # The logged rate is the one after the step's scheduler update, i.e. the next step's rate.
        assert logged[style] == pytest.approx(expected[1:] + [_after_last(style)], abs=1e-9), (style, logged[style])
    assert logged["cosine"][-1] == 0.0 and logged["linear"][-1] == 0.0


def _after_last(style: str, peak: float = 0.01) -> float:
    return peak if style == "constant" else 0.0


def test_bad_sft_decay_style_names_the_field():
    from megatron_entcov.config import load_config

    with pytest.raises(ValueError, match="sft.lr_decay_style"):
        load_config(None, ["sft.lr_decay_style=step"])
