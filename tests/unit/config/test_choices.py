"""Every Literal-annotated field of every config section rejects a value outside its annotation, naming the field,
the value and exactly the annotation's values: through a config file or --set (the loader) and through the
section's constructor alike. The expected choices are read here from the annotations with typing.get_args."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from megatron_entcov.config import (
    AGG_MODES,
    LOSS_NAMES,
    SCHEDULE_KINDS,
    LossConfig,
    RunConfig,
    ScheduleConfig,
    load_config,
)

GENERIC_PREFIX = {ScheduleConfig: "schedule"}
"""Sections whose constructor names its fields with a generic prefix (one class serves several dotted paths; the
loader gives the message the full path)."""


def _literal_fields(cls=RunConfig, prefix=""):
    """(section class, dotted section path, field name, choices) for every Literal field, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _literal_fields(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is typing.Literal:
            yield cls, prefix.rstrip("."), f.name, typing.get_args(tp)


LITERAL_FIELDS = list(_literal_fields())


def _message(path: str, value, choices: tuple) -> str:
    return "^" + re.escape(f"{path}={value!r} is invalid: choose one of {', '.join(repr(c) for c in choices)}") + "$"


def test_the_walk_finds_the_literal_fields_of_every_section():
    found = {f"{section}.{name}" for _, section, name, _ in LITERAL_FIELDS}
    assert {"model.params_dtype", "model.transformer_impl", "parallel.backend", "rollout.engine",
            "rollout.sglang.server_device", "rollout.sglang.sync_method", "weight_sync.verify", "loss.name",
            "loss.agg", "loss.selection_logprobs", "loss.advantage_estimator", "loss.kl_cov_ratio_schedule.kind",
            "optim.optimizer", "optim.lr_decay_style", "data.source", "data.reward", "metrics.law_reward",
            "eval.source", "sft.lr_decay_style"} <= found
    assert len({(cls, name) for cls, _, name, _ in LITERAL_FIELDS}) >= 19


@pytest.mark.parametrize("bad", ["not-a-choice", 3])
@pytest.mark.parametrize("cls, section, name, choices", LITERAL_FIELDS,
                         ids=[f"{section}.{name}" for _, section, name, _ in LITERAL_FIELDS])
def test_a_value_outside_the_literal_fails_in_the_loader(cls, section, name, choices, bad):
    with pytest.raises(ValueError, match=_message(f"{section}.{name}", bad, choices)):
        load_config(None, [f"{section}.{name}={bad}"])


@pytest.mark.parametrize("bad", ["not-a-choice", 3])
@pytest.mark.parametrize("cls, section, name, choices", LITERAL_FIELDS,
                         ids=[f"{section}.{name}" for _, section, name, _ in LITERAL_FIELDS])
def test_a_value_outside_the_literal_fails_in_the_constructor(cls, section, name, choices, bad):
    prefix = GENERIC_PREFIX.get(cls, section)
    with pytest.raises(ValueError, match=_message(f"{prefix}.{name}", bad, choices)):
        cls(**{name: bad})


@pytest.mark.parametrize("cls, section, name, choices", LITERAL_FIELDS,
                         ids=[f"{section}.{name}" for _, section, name, _ in LITERAL_FIELDS])
def test_the_default_is_one_of_the_choices(cls, section, name, choices):
    assert getattr(cls(), name) in choices


def test_the_exported_choice_lists_are_the_annotations():
    loss, schedule = typing.get_type_hints(LossConfig), typing.get_type_hints(ScheduleConfig)
    assert LOSS_NAMES == typing.get_args(loss["name"]) == ("ppo", "clip_cov", "kl_cov", "high_entropy_tokens",
                                                           "archer", "ce_gppo")
    assert AGG_MODES == typing.get_args(loss["agg"])
    assert SCHEDULE_KINDS == typing.get_args(schedule["kind"])
