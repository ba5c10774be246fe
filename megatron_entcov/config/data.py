"""The data-side sections of the run config: the prompt source and verifier (``data``), the periodic held-out
evaluation (``eval``) and the supervised warm start (``sft``).

Each section checks its own fields in ``__post_init__`` (ValueError naming the dotted field, the value and the
fix); checks across sections live in :meth:`RunConfig.validate` (config/schema.py).

Design notes: docs/design/config.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_entcov.config.checks import check_choices, check_positive, check_range, fail

__all__ = ["DataConfig", "EvalConfig", "SFTConfig"]


@dataclass(kw_only=True)
class DataConfig:
    """Prompt source and verifier."""

    source: Literal["arithmetic", "countdown", "file"] = "arithmetic"
    """'arithmetic' = the synthetic verifiable task generated from a seed; 'countdown' = the generated search task
    with a scratchpad (tasks/countdown.py; SFT trains on its reference traces); 'file' = jsonl/parquet at path."""
    path: str | None = None
    """jsonl or parquet file with prompt/answer columns (e.g. DAPO-Math-17k); needed when source='file'."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or a chat message list)."""
    answer_key: str = "answer"
    """Column holding the reference answer."""
    unknown_chars: Literal["error", "warn"] = "error"
    """A file's prompts with characters the tokenizer does not have (they would become its unk token): 'error' =
    refuse the file, naming the first such row and the characters; 'warn' = log how many rows have them and train
    on the unk token. Checked when the file is loaded (data.path and eval.path)."""
    reward: Literal["arithmetic", "countdown", "math"] = "arithmetic"
    """Verifier from the tasks registry (tasks/verifiers.py): 'arithmetic' (exact integer), 'countdown' (the steps
    of a countdown solution, simulated) or 'math' (math-verify, boxed)."""
    reward_timeout_s: float = 5.0
    """Per-sample verifier time-out in seconds; a time-out scores 0 and is counted."""
    chat_template: bool = False
    """Wrap prompts with the tokenizer's chat template."""
    arithmetic_digits: int = 2
    """Synthetic task difficulty: operands have up to this many digits."""
    arithmetic_ops: str = "+-"
    """Synthetic task operators drawn from this string (subset of '+-*')."""
    arithmetic_operands: int = 2
    """Synthetic task difficulty: operands per problem (>= 2)."""
    countdown_numbers: int = 4
    """Countdown task: numbers given per problem, 2..6 (num_numbers - 1 steps per solution)."""
    countdown_max_number: int = 9
    """Countdown task: the given numbers are drawn from 1..this, 2..99."""
    countdown_max_value: int = 99
    """Countdown task: bound of every intermediate value of the generating path and the SFT traces (>= the
    largest number); the verifier accepts any non-negative intermediate value."""
    shuffle: bool = True
    """Shuffle the prompt order (with the top-level seed) every epoch."""
    held_out_share: float = 0.1
    """Arithmetic task: share of the problem space held out by content (a hash of the problem text, the same
    for every seed) for evaluation; SFT and RL never train on these problems."""
    held_out_rows: int = 0
    """File source: the last this many rows of data.path are held out for evaluation (never trained on);
    0 = no held-out split (evaluate on a separate file: eval.source='file')."""

    def __post_init__(self) -> None:
        check_choices(self, "data")
        check_range("data.held_out_share", self.held_out_share, 0.0, 1.0, hi_open=True)
        check_positive("data.held_out_rows", self.held_out_rows, allow_zero=True)
        if self.source == "file" and not self.path:
            fail("data.path", self.path, "data.source='file' needs a jsonl or parquet path")
        check_positive("data.reward_timeout_s", self.reward_timeout_s)
        check_range("data.arithmetic_digits", self.arithmetic_digits, 1, 18)
        check_range("data.arithmetic_operands", self.arithmetic_operands, 2, 16)
        if not self.arithmetic_ops or set(self.arithmetic_ops) - set("+-*"):
            fail("data.arithmetic_ops", self.arithmetic_ops, "use a non-empty subset of '+-*'")
        check_range("data.countdown_numbers", self.countdown_numbers, 2, 6)
        check_range("data.countdown_max_number", self.countdown_max_number, 2, 99)
        if self.countdown_max_value < self.countdown_max_number:
            fail("data.countdown_max_value", self.countdown_max_value,
                 f"use a value >= data.countdown_max_number={self.countdown_max_number}")
        if self.source == "countdown" and self.reward != "countdown":
            fail("data.reward", self.reward, "data.source='countdown' is scored by its own verifier: set "
                 "data.reward=countdown")


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic held-out evaluation during RL (evaluation.py): greedy accuracy, pass@k, entropy, length."""

    interval: int = 0
    """Evaluate before the first step, every this many steps and after the last; 0 = never."""
    source: Literal["held_out", "file"] = "held_out"
    """'held_out' = the data set's held-out split (data.held_out_share / data.held_out_rows: disjoint from
    training), 'file' = eval.path (same format and keys as data.path)."""
    path: str | None = None
    """jsonl or parquet evaluation file (eval.source='file')."""
    num_prompts: int = 64
    """Evaluation prompts (the first ones of the split or file)."""
    n_samples: int = 8
    """Sampled responses per prompt for pass@k (unbiased estimator from n samples), besides the greedy one."""
    temperature: float = 1.0
    """Sampling temperature of the n samples (top_p/top_k from the sampling section)."""
    pass_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """k values of eval/pass@k; each in [1, eval.n_samples]."""
    seed: int | None = None
    """Generated tasks (data.source arithmetic or countdown): the seed of the problem stream whose held-out
    problems are evaluated; null = the run's seed. Fix it to evaluate runs of different seeds on the same
    problems (the held-out split itself is by content, the same for every seed)."""

    def __post_init__(self) -> None:
        check_choices(self, "eval")
        check_positive("eval.interval", self.interval, allow_zero=True)
        if self.source == "file" and not self.path:
            fail("eval.path", self.path, "eval.source='file' needs a jsonl or parquet path")
        check_positive("eval.num_prompts", self.num_prompts)
        check_positive("eval.n_samples", self.n_samples)
        check_positive("eval.temperature", self.temperature)
        if not self.pass_k:
            fail("eval.pass_k", self.pass_k, "list at least one k, e.g. [1, 4, 8]")
        for k in self.pass_k:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_samples:
                fail("eval.pass_k", self.pass_k, f"every k must be an integer in [1, eval.n_samples={self.n_samples}]")


@dataclass(kw_only=True)
class SFTConfig:
    """Supervised warm start on the task's reference answers (teacher forcing), before RL."""

    steps: int = 0
    """Optimizer steps of SFT; 0 = no warm start."""
    batch_size: int = 64
    """Sequences per SFT step (global, over data-parallel ranks)."""
    lr: float = 1e-3
    """SFT learning rate (Adam; after warm-up constant, or decayed to 0 by sft.lr_decay_style)."""
    warmup_steps: int = 10
    """Linear learning-rate warm-up of SFT."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: 'constant' at sft.lr, or 'linear' / 'cosine' decay to 0 at the last of sft.steps (a decayed
    run ends on an averaged, not a noisy, iterate: a better model for the same steps)."""
    eval_size: int = 64
    """Held-out prompts (the data set's held-out split, never trained on) decoded greedily at the end of SFT to
    report accuracy; 0 = skip."""

    def __post_init__(self) -> None:
        check_choices(self, "sft")
        check_positive("sft.steps", self.steps, allow_zero=True)
        check_positive("sft.batch_size", self.batch_size)
        check_positive("sft.lr", self.lr)
        check_positive("sft.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("sft.eval_size", self.eval_size, allow_zero=True)
