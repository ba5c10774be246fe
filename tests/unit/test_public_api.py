"""The import paths users' scripts use keep working after the floor plan moved code into folders: the public
names of DESIGN.md resolve from their documented modules to the objects that now live in the subpackages."""

import importlib
import inspect

import pytest

# (documented module, name, where the object lives now)
PUBLIC = [
    ("megatron_entcov.config", "RunConfig", "megatron_entcov.config.schema"),
    ("megatron_entcov.config", "LossConfig", "megatron_entcov.config.schema"),
    ("megatron_entcov.config", "ModelConfig", "megatron_entcov.config.schema"),
    ("megatron_entcov.config", "load_config", "megatron_entcov.config.load"),
    ("megatron_entcov.config", "dump_config", "megatron_entcov.config.load"),
    ("megatron_entcov.losses", "policy_loss", "megatron_entcov.losses.policy"),
    ("megatron_entcov.losses", "compute_token_selection", "megatron_entcov.losses.policy"),
    ("megatron_entcov.losses", "compute_group_advantages", "megatron_entcov.losses.advantages"),
    ("megatron_entcov.ops.vocab_parallel", "logprobs_and_entropy", "megatron_entcov.ops.vocab_parallel"),
    ("megatron_entcov.ops.covariance", "token_covariance", "megatron_entcov.ops.covariance"),
    ("megatron_entcov.entropy_law", "entropy_change_first_order", "megatron_entcov.entropy_law"),
    ("megatron_entcov.entropy_law", "fit_entropy_law", "megatron_entcov.entropy_law"),
    ("megatron_entcov.entropy_law", "predicted_ceiling", "megatron_entcov.entropy_law"),
    ("megatron_entcov.rollout", "build_engine", "megatron_entcov.rollout"),
    ("megatron_entcov.rollout", "RolloutEngine", "megatron_entcov.rollout.engine"),
]


@pytest.mark.parametrize("module,name,home", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_documented_name_resolves_to_its_home(module, name, home):
    obj = getattr(importlib.import_module(module), name)
    assert obj is getattr(importlib.import_module(home), name)
    assert obj.__module__ == home


def test_policy_loss_keeps_the_documented_call_shape():
    """DESIGN.md: policy_loss(cfg, logprobs, old_logprobs, advantages, mask, *, entropy=None, selection=None,
    step=0, ...)."""
    from megatron_entcov.losses import policy_loss

    params = inspect.signature(policy_loss).parameters
    assert list(params)[:5] == ["cfg", "logprobs", "old_logprobs", "advantages", "mask"]
    assert {k: params[k].default for k in ("entropy", "selection", "step")} == {"entropy": None, "selection": None,
                                                                                "step": 0}
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in list(params)[5:])
