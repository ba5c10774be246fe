"""Coefficient annealing (losses/schedules.py): values at start, middle, end and after the end."""

import math

import pytest

from megatron_entcov.config import LossConfig, ScheduleConfig, config_from_dict
from megatron_entcov.losses.schedules import annealed_coefficients, value


def test_constant_ignores_step():
    s = ScheduleConfig(kind="constant")
    assert [value(0.3, s, t) for t in (0, 5, 10**6)] == [0.3, 0.3, 0.3]


def test_linear():
    s = ScheduleConfig(kind="linear", end=0.0, steps=100, start_step=10)
    assert value(0.2, s, 0) == 0.2          # before start
    assert value(0.2, s, 10) == 0.2         # start
    assert value(0.2, s, 60) == pytest.approx(0.1)   # middle: 0.2 + (0 - 0.2) * 50/100
    assert value(0.2, s, 85) == pytest.approx(0.05)  # 0.2 - 0.2 * 75/100
    assert value(0.2, s, 110) == 0.0        # end, exactly
    assert value(0.2, s, 5000) == 0.0       # after end


def test_cosine():
    s = ScheduleConfig(kind="cosine", end=0.1, steps=40)
    assert value(1.0, s, 0) == 1.0
    # middle: 0.1 + (1 - 0.1) * (1 + cos(pi/2)) / 2 = 0.55
    assert value(1.0, s, 20) == pytest.approx(0.55)
    # a quarter: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    assert value(1.0, s, 10) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)
    assert value(1.0, s, 40) == 0.1
    assert value(1.0, s, 41) == 0.1


def test_exponential():
    s = ScheduleConfig(kind="exponential", end=1e-4, steps=4)
    assert value(1e-2, s, 0) == 1e-2
    assert value(1e-2, s, 2) == pytest.approx(1e-3)     # geometric middle: 1e-2 * (1e-2)^(1/2)
    assert value(1e-2, s, 1) == pytest.approx(10**-2.5)
    assert value(1e-2, s, 4) == 1e-4
    assert value(1e-2, s, 9) == 1e-4


def test_annealed_coefficients_reads_every_schedule():
    cfg = LossConfig(name="kl_cov", kl_cov_ratio=0.2, kl_cov_coef=1.0, entropy_coef=0.01,
                     kl_cov_ratio_schedule=ScheduleConfig(kind="linear", end=0.0, steps=10),
                     entropy_coef_schedule=ScheduleConfig(kind="cosine", end=0.0, steps=10))
    assert annealed_coefficients(cfg, 5) == pytest.approx(
        {"clip_cov_ratio": 2e-4, "kl_cov_ratio": 0.1, "kl_cov_coef": 1.0, "entropy_coef": 0.005})
    assert annealed_coefficients(cfg, 10)["kl_cov_ratio"] == 0.0


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="steps"):
        config_from_dict({"loss": {"clip_cov_ratio_schedule": {"kind": "linear", "steps": 0}}})
    with pytest.raises(ValueError, match="exponential"):
        config_from_dict({"loss": {"kl_cov_ratio_schedule": {"kind": "exponential", "end": 0.0, "steps": 5}}})
    with pytest.raises(ValueError, match="kind"):
        config_from_dict({"loss": {"kl_cov_ratio_schedule": {"kind": "step"}}})
    with pytest.raises(ValueError, match="step"):
        value(1.0, ScheduleConfig(), -1)
