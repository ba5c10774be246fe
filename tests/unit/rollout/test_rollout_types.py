"""rollout/types.py: SamplingParams validation and construction from config; Sample checks and round trips."""

import json

import pytest

from megatron_entcov.config import SamplingConfig
from megatron_entcov.rollout import Sample, SamplingParams


@pytest.mark.parametrize("field, value, match", [
    ("temperature", 0.0, r"temperature=0.0 is invalid.*top_k=1"),
    ("temperature", -1.0, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_p", 0.0, r"top_p=0.0 is invalid: must lie in \(0, 1\]"),
    ("top_p", 1.5, "top_p=1.5"),
    ("top_k", 0, "top_k=0"),
    ("top_k", -2, "top_k=-2"),
    ("max_new_tokens", 0, "max_new_tokens=0"),
    ("max_new_tokens", 2.5, "max_new_tokens=2.5"),
    ("stop_token_ids", (3, -1), r"stop_token_ids\[1\]=-1"),
    ("seed", -1, "seed=-1"),
])
def test_bad_sampling_params_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_sampling_params_from_config_and_dict():
    cfg = SamplingConfig(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, stop_token_ids=[2, 5])
    p = SamplingParams.from_config(cfg, seed=4)
    assert p == SamplingParams(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7, stop_token_ids=(2, 5),
                               seed=4)
    assert p.truncates and not SamplingParams().truncates
    assert SamplingParams.from_config(cfg, top_k=1).top_k == 1
    with pytest.raises(TypeError, match="unknown fields"):
        SamplingParams.from_config(cfg, n=4)
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)     # lists are stored as tuples
    assert SamplingParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    hash(p)


def test_sample_round_trip_and_checks():
    s = Sample(prompt_ids=[1, 2], response_ids=[3, 4, 0], rollout_logprobs=[-0.5, -1.25, -0.125],
               finish_reason="stop", weight_version=3, index=7)
    assert s.num_response_tokens == 3
    assert Sample.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="3 response_ids but 2 rollout_logprobs"):
        Sample(prompt_ids=[1], response_ids=[3, 4, 0], rollout_logprobs=[-0.5, -1.0], finish_reason="stop",
               weight_version=0, index=0)
    with pytest.raises(ValueError, match="finish_reason='eos'"):
        Sample(prompt_ids=[1], response_ids=[], rollout_logprobs=[], finish_reason="eos", weight_version=0, index=0)
    with pytest.raises(ValueError, match=r"missing keys \['index'\]"):
        Sample.from_dict({k: v for k, v in s.to_dict().items() if k != "index"})
