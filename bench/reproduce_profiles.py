"""bench/reproduce.py's profiles and methods: the config overrides each profile and each method runs with.

Profiles (SFT steps, RL steps, overrides shared by SFT and RL; the long profile also evaluates at more
temperatures by re-scoring its checkpoints, keeps them, and has its own default method set):
- full (default; <= 90 min on 2 cores), quick (<= 15 min), smoke (a tiny model, a few steps: make test),
- long: 200 steps (5x the full profile, 16 prompts a step), GRPO, Clip-Cov and KL-Cov (ours constant and
  annealed, and the released settings), the token-entropy family, evaluation every 25 steps at T = 1 (the
  trainer's) and T = 0.6 (the paper's, re-scored from the kept checkpoints); sizing in docs/reproduction.md.

Where the methods depart from the released recipe (docs/reproduction.md lists each): Clip-Cov/KL-Cov shares
0.05 / 0.1 (250x / 50x the released 2e-4 / 2e-3: a step has ~5,000 response tokens, not millions), Clip-Cov under
PPO clip 0.2 / 0.2 (released 1 / 1), annealed schedules (our addition). The ``*_released`` arms run the released
settings as they are.
"""

from __future__ import annotations

SFT_SEED = 1234  # the one SFT checkpoint every seed starts from (configs/countdown.yaml's seed)

PROFILES: dict[str, dict] = {
    "full": {"sft_steps": 1200, "steps": 40, "set": [
        "rollout.prompts_per_step=32", "optim.micro_batch_size=64", "eval.interval=4", "eval.num_prompts=64",
        "eval.n_samples=16"]},
    "quick": {"sft_steps": 800, "steps": 8, "set": [
        "rollout.prompts_per_step=16", "optim.micro_batch_size=32", "eval.interval=4", "eval.num_prompts=32",
        "eval.n_samples=16"]},
    "smoke": {"sft_steps": 20, "steps": 3, "set": [
        "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64", "sft.batch_size=16",
        "sft.eval_size=4", "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        "optim.micro_batch_size=4", "sampling.max_new_tokens=12", "eval.interval=1", "eval.num_prompts=4",
        "eval.n_samples=16"]},
    # The full profile's model and SFT; half its prompts per step (16 x 8: 2.1 s a step instead of ~4, so 12
    # methods x 3 seeds reach 200 steps in ~2.3-2.9 h on 2 cores); evaluation and a kept checkpoint every 25 steps,
    # each checkpoint (and the SFT start) re-scored at T = 0.6 after the run. Sizing: docs/reproduction.md.
    "long": {"sft_steps": 1200, "steps": 200, "eval_interval": 25, "rescore_temperatures": [0.6],
             "main_temperature": 0.6, "set": [
                 "rollout.prompts_per_step=16", "optim.micro_batch_size=32", "eval.num_prompts=64",
                 "eval.n_samples=16"]},
}
"""Profile name -> sft_steps, steps, set (overrides for SFT and RL); optional eval_interval (evaluation and kept
checkpoints every this many steps), rescore_temperatures (checkpoints re-scored at each), main_temperature (the
analysis' R; default: the trainer's eval.temperature, 1)."""

# Every run of every seed evaluates the same held-out problems (those of the SFT seed's stream): a seed changes
# the RL prompts and the sampling, not the yardstick, so the spread over seeds is the spread of RL itself.
COMMON_RL = ["checkpoint.save_interval=0", "metrics.entropy_change_samples=64", "metrics.law_image_interval=0",
             "metrics.histogram_tokens=0", f"eval.seed={SFT_SEED}"]

# Entropy-control coefficients at this scale (a step has ~5,000 response tokens, not millions): the quickstart's
# Clip-Cov/KL-Cov shares with the released KL-Cov coefficient (beta = 1; the quickstart's 10 held entropy above its
# starting value here, i.e. pinned the policy); an entropy bonus large enough to hold entropy up against the
# policy gradient.
CLIP_COV = ["loss.name=clip_cov", "loss.clip_cov_ratio=0.05", "loss.clip_cov_lb=1.0", "loss.clip_cov_ub=5.0"]
KL_COV = ["loss.name=kl_cov", "loss.kl_cov_ratio=0.1", "loss.kl_cov_coef=1.0"]
BONUS = ["loss.name=ppo", "loss.entropy_coef=0.03"]
PPO = ["loss.clip_ratio_low=0.2", "loss.clip_ratio_high=0.2"]
ANNEALED = {"clip_cov": "clip_cov_ratio", "kl_cov": "kl_cov_ratio", "entropy_bonus": "entropy_coef"}
# The released recipe (arXiv 2505.22617's scripts): Clip-Cov r 2e-4, bounds (1, 5), PPO clip 1 / 1 (the ratio kept
# in [0, 2]), no dual clip; KL-Cov k 2e-3 (7B), beta 1 (KL-Cov applies no PPO clip).
RELEASED = {
    "clip_cov_released": ["loss.name=clip_cov", "loss.clip_cov_ratio=2e-4", "loss.clip_cov_lb=1.0",
                          "loss.clip_cov_ub=5.0", "loss.clip_ratio_low=1.0", "loss.clip_ratio_high=1.0"],
    "kl_cov_released": ["loss.name=kl_cov", "loss.kl_cov_ratio=2e-3", "loss.kl_cov_coef=1.0"],
}

# The token-entropy family (losses/token_entropy.py, losses/adaptive_entropy.py), at each paper's released
# settings. DAPO clip 0.2 / 0.28 as released.
DAPO = ["loss.clip_ratio_low=0.2", "loss.clip_ratio_high=0.28"]
TOKEN_ENTROPY = {
    "high_entropy_tokens": ["loss.name=high_entropy_tokens", "loss.high_entropy_ratio=0.2", *DAPO],
    "entropy_advantage": ["loss.name=ppo", "loss.entropy_advantage_coef=0.4", "loss.entropy_advantage_kappa=2",
                          *PPO],
    "target_entropy": ["loss.name=ppo", "loss.target_entropy=0.2", "loss.target_entropy_delta=0.005", *PPO],
    "archer": ["loss.name=archer", "loss.archer_entropy_quantile=0.8", "loss.archer_low_clip_ratio=0.2",
               "loss.archer_high_clip_ratio=0.5"],
    "ce_gppo": ["loss.name=ce_gppo", "loss.ce_gppo_beta1=0.75", "loss.ce_gppo_beta2=1.0", *DAPO],
}


def method_overrides(steps: int, mini_batches: int) -> dict[str, list[str]]:
    """Method name -> --set overrides. Annealed coefficients fall linearly to 0 over the first half of the run
    (schedules count optimizer steps: mini-batches per RL step), so the second half runs unregularised."""
    def anneal(coef: str) -> list[str]:
        return [f"loss.{coef}_schedule.kind=linear", f"loss.{coef}_schedule.end=0.0",
                f"loss.{coef}_schedule.steps={max(steps // 2, 1) * mini_batches}"]
    return {
        "grpo": ["loss.name=ppo", *PPO],
        "clip_higher": ["loss.name=ppo", "loss.clip_ratio_low=0.2", "loss.clip_ratio_high=0.28"],
        "entropy_bonus": [*BONUS, *PPO],
        "entropy_bonus_annealed": [*BONUS, *PPO, *anneal(ANNEALED["entropy_bonus"])],
        "clip_cov": [*CLIP_COV, *PPO],
        "clip_cov_annealed": [*CLIP_COV, *PPO, *anneal(ANNEALED["clip_cov"])],
        "kl_cov": [*KL_COV, *PPO],
        "kl_cov_annealed": [*KL_COV, *PPO, *anneal(ANNEALED["kl_cov"])],
        **TOKEN_ENTROPY,
        **RELEASED,
    }


ALL_METHODS = tuple(method_overrides(2, 1))
"""Every method --methods accepts."""
METHODS = tuple(m for m in ALL_METHODS if m not in TOKEN_ENTROPY and m not in RELEASED)
"""The default set of the full, quick and smoke profiles (unchanged by the token-entropy family)."""
LONG_METHODS = ("grpo", "clip_cov", "clip_cov_annealed", "kl_cov", "kl_cov_annealed", *RELEASED, *TOKEN_ENTROPY)
"""The long profile's default set: GRPO, Clip-Cov and KL-Cov (ours constant and annealed, and released), the
token-entropy family."""


def default_methods(profile: str) -> tuple[str, ...]:
    return LONG_METHODS if profile == "long" else METHODS
