"""Config loading, overrides, validation messages, resolved dump, and the shipped configs."""

from pathlib import Path

import pytest
import yaml

from megatron_entcov.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_documented():
    cfg = RunConfig()
    assert cfg.loss.name == "ppo" and cfg.loss.agg == "token-mean"
    # Every field of every section has a docstring line (checked through the dataclass source order).
    import dataclasses
    import inspect

    from megatron_entcov import config as config_mod

    for section in [RunConfig] + [type(getattr(cfg, f.name)) for f in dataclasses.fields(RunConfig)
                                  if dataclasses.is_dataclass(getattr(cfg, f.name))]:
        src = inspect.getsource(section)
        for f in dataclasses.fields(section):
            after = src.split(f"\n    {f.name}:", 1)[1].split("\n", 2)[1].strip()
            assert after.startswith('"""'), f"{section.__name__}.{f.name} has no docstring line"
    assert config_mod.__doc__


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# test\nloss:\n  name: clip_cov\noptim:\n  lr: 1e-6\n")
    cfg = load_config(path, ["loss.clip_cov_ratio=0.01", "sampling.stop_token_ids=[1, 2]", "optim.lr=2e-6"])
    assert cfg.loss.name == "clip_cov" and cfg.loss.clip_cov_ratio == 0.01
    assert cfg.optim.lr == 2e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.sampling.stop_token_ids == [1, 2]


@pytest.mark.parametrize("overrides, match", [
    (["loss.name=grpo"], r"loss.name='grpo' is invalid: choose one of 'ppo', 'clip_cov', 'kl_cov'"),
    (["loss.agg=mean"], r"loss.agg='mean' is invalid"),
    (["loss.clip_cov_ratio=0"], r"loss.clip_cov_ratio=0.0 is invalid: must lie in \(0.0, 1.0\]"),
    (["loss.kl_cov_ratio=1.5"], r"loss.kl_cov_ratio=1.5 is invalid"),
    (["loss.clip_cov_lb=5", "loss.clip_cov_ub=5"], r"loss.clip_cov_lb=5.0 is invalid: must be < loss.clip_cov_ub"),
    (["loss.kl_cov_ratio_schedule.kind=linear"], r"loss.kl_cov_ratio_schedule.steps=0 is invalid"),
    (["loss.entropy_coef_schedule.kind=exponential", "loss.entropy_coef_schedule.steps=5"],
     r"loss.entropy_coef_schedule.end=0.0 is invalid"),
    (["optim.lr=fast"], r"optim.lr='fast' has the wrong type: expected a number"),
    (["optim.micro_batch_size=1.5"], r"optim.micro_batch_size=1.5 has the wrong type: expected an integer"),
    (["model.bogus=1"], r"unknown config key\(s\) 'bogus' in model"),
    (["bogus.x=1"], r"unknown config key\(s\) 'bogus' in top level"),
    (["parallel.tensor_model_parallel_size=3"], r"parallel.tensor_model_parallel_size=3 is invalid: must divide "
                                                r"model.num_attention_heads=4"),
    (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], r"model.num_layers=3 is invalid"),
    (["model.num_query_groups=3"], r"model.num_query_groups=3 is invalid: must divide model.num_attention_heads"),
    (["parallel.sequence_parallel=true"], r"parallel.sequence_parallel=True is invalid: needs parallel.tensor"),
    (["sampling.top_p=0"], r"sampling.top_p=0.0 is invalid"),
    (["data.source=file"], r"data.path=None is invalid: data.source='file' needs a jsonl or parquet path"),
    (["rollout.engine=vllm"], r"rollout.engine='vllm' is invalid"),
    (["rollout.sync_verify=checksum"], r"rollout.sync_verify='checksum' is invalid: choose one of 'probe', 'version'"),
    (["rollout.sync_verify_tol=0"], r"rollout.sync_verify_tol=0.0 is invalid: must be > 0"),
    (["rollout.server_device=tpu"], r"rollout.server_device='tpu' is invalid"),
    (["rollout.max_server_restarts=-1"], r"rollout.max_server_restarts=-1 is invalid: must be >= 0"),
    (["rollout.release_memory=true"], r"rollout.release_memory=True is invalid: applies to rollout.engine=sglang"),
    (["rollout.engine=sglang", "rollout.release_memory=true", "rollout.server_device=cpu"],
     r"rollout.release_memory=True is invalid: needs GPU servers .* rollout.server_device=cuda"),
    (["rollout.sync_probe_tokens=100000"], r"rollout.sync_probe_tokens=100000 is invalid: the probe \(8 prompt tokens"),
    (["rollout.engine=sglang", "rollout.server_device=cuda", "rollout.num_servers=2"],
     r"rollout.num_servers=2 is invalid: launched GPU servers go on their replica's own GPUs: 2 servers x 1"),
    (["rollout.router_url=router:30000"], r"rollout.router_url='router:30000' is invalid: must be an http"),
    (["rollout.server_urls=[node:1]"], r"rollout.server_urls\[0\]='node:1' is invalid: must be an http"),
    (["rollout.server_args=[--tp-size, 2]"], r"rollout.server_args\[1\]=2 has the wrong type: expected a string"),
    (["model.max_position_embeddings=16"], r"model.max_position_embeddings=16 is invalid: must be >= "
                                           r"rollout.max_prompt_len"),
])
def test_bad_values_name_field_value_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_world_size_checks():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ValueError, match=r"must divide the world size 3"):
        cfg.resolve(3)
    cfg.resolve(4)
    assert cfg.parallel.data_parallel_size == 2
    cfg = load_config(None, ["rollout.prompts_per_step=3", "rollout.n_samples_per_prompt=2",
                             "optim.micro_batch_size=4"])
    with pytest.raises(ValueError, match=r"optim.micro_batch_size=4 is invalid"):
        cfg.resolve(1)


def test_padded_vocab():
    cfg = load_config(None, ["model.vocab_size=250", "model.make_vocab_size_divisible_by=64"])
    assert cfg.model.padded_vocab_size(1) == 256
    assert cfg.model.padded_vocab_size(2) == 256
    assert cfg.model.padded_vocab_size(4) == 256
    assert cfg.model.padded_vocab_size(8) == 512


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ValueError, match=r"use dotted.key=value"):
        apply_overrides({}, ["loss.name"])
    with pytest.raises(ValueError, match=r"no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_resolved_dump_round_trips(tmp_path):
    cfg = load_config(None, ["loss.name=kl_cov", "loss.kl_cov_ratio_schedule.kind=cosine",
                             "loss.kl_cov_ratio_schedule.steps=10"]).resolve(1)
    dump_config(cfg, tmp_path / "resolved_config.yaml")
    text = (tmp_path / "resolved_config.yaml").read_text()
    assert text.startswith("# resolved config; git ")
    again = config_from_dict(yaml.safe_load(text))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_resolve(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: line 1 must be a comment giving hardware and purpose"
    cfg = load_config(path)
    p = cfg.parallel
    cfg.resolve(p.tensor_model_parallel_size * p.pipeline_model_parallel_size * _dp_for(path))


def _dp_for(path: Path) -> int:
    """The data-parallel size a config is meant for, from its '# world: N' comment (default 1)."""
    for line in path.read_text().splitlines()[:5]:
        if line.startswith("# dp:"):
            return int(line.split(":")[1])
    return 1


def test_real_model_configs_carry_the_released_hyperparameters():
    """Reference section 6: GRPO, token-mean, dynamic sampling, 256 x 8 per step, 8 mini-batches, T=1, top_p=1,
    lr 5e-7 (7B) / 1e-6 (32B), wd 0, clip 1; Clip-Cov r=2e-4 in (1, 5), clip ratio 1, dual 10; KL-Cov k=2e-3 (7B),
    2e-4 (32B), beta 1."""
    for name in ("qwen2.5-7b_clip_cov", "qwen2.5-7b_kl_cov", "qwen2.5-32b_kl_cov", "qwen2.5-32b_clip_cov"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.rollout.prompts_per_step, cfg.rollout.n_samples_per_prompt) == (256, 8)
        assert cfg.optim.num_mini_batches == 8 and cfg.rollout.dynamic_sampling
        assert cfg.sampling.temperature == 1.0 and cfg.sampling.top_p == 1.0
        assert cfg.optim.weight_decay == 0.0 and cfg.optim.clip_grad == 1.0
        assert cfg.loss.agg == "token-mean" and cfg.loss.entropy_coef == 0.0
        assert cfg.optim.lr == (5e-7 if "7b" in name else 1e-6)
        assert cfg.rollout.max_prompt_len == 2048 and cfg.sampling.max_new_tokens == 8192
        if cfg.loss.name == "clip_cov":
            assert (cfg.loss.clip_cov_ratio, cfg.loss.clip_cov_lb, cfg.loss.clip_cov_ub) == (2e-4, 1.0, 5.0)
            assert (cfg.loss.clip_ratio_low, cfg.loss.clip_ratio_high, cfg.loss.clip_ratio_c) == (1.0, 1.0, 10.0)
        else:
            assert cfg.loss.kl_cov_ratio == (2e-3 if "7b" in name else 2e-4) and cfg.loss.kl_cov_coef == 1.0
    big = load_config(ROOT / "configs" / "qwen2.5-32b_kl_cov.yaml")
    assert (big.model.num_layers, big.model.hidden_size, big.model.num_attention_heads) == (64, 5120, 40)


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="form a cycle"):
        load_config(tmp_path / "a.yaml")
