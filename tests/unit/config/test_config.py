"""Config loading, overrides, validation messages, resolved dump, and the shipped configs."""

from pathlib import Path

import pytest
import yaml

from megatron_entcov.config import (
    MOVED_KEYS,
    RunConfig,
    SGLangConfig,
    WeightSyncConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_are_valid_and_documented():
    cfg = RunConfig()
    assert cfg.loss.name == "ppo" and cfg.loss.agg == "token-mean"
    # Every field of every section has a docstring line (checked through the dataclass source order).
    import dataclasses
    import inspect

    from megatron_entcov import config as config_mod

    def sections(obj):            # every nested section, depth first (rollout.sglang included)
        yield type(obj)
        for f in dataclasses.fields(obj):
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                yield from sections(getattr(obj, f.name))

    seen = set()
    for section in sections(cfg):
        seen.add(section)
        src = inspect.getsource(section)
        for f in dataclasses.fields(section):
            after = src.split(f"\n    {f.name}:", 1)[1].split("\n", 2)[1].strip()
            assert after.startswith('"""'), f"{section.__name__}.{f.name} has no docstring line"
    assert {SGLangConfig, WeightSyncConfig} <= seen
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
    (["weight_sync.verify=checksum"], r"weight_sync.verify='checksum' is invalid: choose one of 'probe', 'version'"),
    (["weight_sync.verify_tol=0"], r"weight_sync.verify_tol=0.0 is invalid: must be > 0"),
    (["weight_sync.bucket_mb=-1"], r"weight_sync.bucket_mb=-1.0 is invalid: must be > 0"),
    (["rollout.sglang.server_device=tpu"], r"rollout.sglang.server_device='tpu' is invalid"),
    (["rollout.sglang.max_server_restarts=-1"], r"rollout.sglang.max_server_restarts=-1 is invalid: must be >= 0"),
    (["rollout.sglang.num_servers=0"], r"rollout.sglang.num_servers=0 is invalid: must be > 0"),
    (["rollout.sglang.sync_method=nfs"], r"rollout.sglang.sync_method='nfs' is invalid: choose one of 'disk'"),
    (["rollout.sglang.release_memory=true"],
     r"rollout.sglang.release_memory=True is invalid: applies to rollout.engine=sglang"),
    (["rollout.engine=sglang", "rollout.sglang.release_memory=true", "rollout.sglang.server_device=cpu"],
     r"rollout.sglang.release_memory=True is invalid: needs GPU servers .* rollout.sglang.server_device=cuda"),
    (["weight_sync.probe_tokens=100000"], r"weight_sync.probe_tokens=100000 is invalid: the probe \(8 prompt tokens"),
    (["rollout.engine=sglang", "rollout.sglang.server_device=cuda", "rollout.sglang.num_servers=2"],
     r"rollout.sglang.num_servers=2 is invalid: launched GPU servers go on their replica's own GPUs: 2 servers x 1"),
    (["rollout.sglang.router_url=router:30000"], r"rollout.sglang.router_url='router:30000' is invalid: must be an"),
    (["rollout.sglang.server_urls=[node:1]"], r"rollout.sglang.server_urls\[0\]='node:1' is invalid: must be an"),
    (["rollout.sglang.server_args=[--tp-size, 2]"],
     r"rollout.sglang.server_args\[1\]=2 has the wrong type: expected a string"),
    (["rollout.sglang.server_args=[--tp-size, two]"],
     r"rollout.sglang.server_args=\['--tp-size', 'two'\] is invalid: its --tp-size 'two' must be a positive"),
    (["model.max_position_embeddings=16"], r"model.max_position_embeddings=16 is invalid: must be >= "
                                           r"rollout.max_prompt_len"),
    (["optim.lr=.inf"], r"optim.lr=inf is invalid: must be a finite number \(not inf or nan\)"),
    (["sampling.temperature=nan"], r"sampling.temperature=nan is invalid: must be a finite number"),
    (["name=.."], r"name='\.\.' is invalid: a run name is one directory name under output_dir"),
    (["model.params_dtype=float16"], r"model.params_dtype='float16' is invalid: set model.params_dtype=bfloat16"),
    (["optim.max_consecutive_skipped=-2"], r"optim.max_consecutive_skipped=-2 is invalid: must be >= 0"),
    (["metrics.histogram_tokens=-1"], r"metrics.histogram_tokens=-1 is invalid: must be >= 0"),
    (["metrics.law_image_interval=-5"], r"metrics.law_image_interval=-5 is invalid: must be >= 0"),
    (["loss.tis_cap=-1"], r"loss.tis_cap=-1.0 is invalid: must be a finite number >= 0: 0 turns truncated"),
    (["loss.tis_cap=nan"], r"loss.tis_cap=nan is invalid: must be a finite number"),
    (["loss.tis_cap=.inf"], r"loss.tis_cap=inf is invalid: must be a finite number"),
])
def test_bad_values_name_field_value_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("old, new", sorted(MOVED_KEYS.items()))
def test_moved_keys_fail_naming_the_new_key(old, new, tmp_path):
    """Every key that moved fails, in a YAML file and in --set alike, with its new place named; the new key
    takes the same value."""
    value = {"server_urls": "[http://a:1]", "server_args": "[--tp-size, '1']", "router_url": "http://r:1",
             "server_device": "cpu", "sync_method": "tensor", "release_memory": "true",
             "sync_verify": "version"}.get(old.rsplit(".", 1)[1], "3")
    message = rf"{old} moved: use {new} \(the config sections were regrouped"
    with pytest.raises(ValueError, match=message):
        load_config(None, [f"{old}={value}"])
    section, key = old.split(".")
    (tmp_path / "old.yaml").write_text(f"# test\n{section}:\n  {key}: {value}\n")
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "old.yaml")
    cfg, default = load_config(None, ["rollout.engine=sglang", f"{new}={value}"]), RunConfig()
    for part in new.split("."):
        cfg, default = getattr(cfg, part), getattr(default, part)
    assert cfg == yaml.safe_load(value) != default


def test_two_moved_keys_are_both_named():
    with pytest.raises(ValueError, match=r"rollout.num_servers moved: use rollout.sglang.num_servers; "
                                         r"rollout.sync_bucket_mb moved: use weight_sync.bucket_mb"):
        load_config(None, ["rollout.sync_bucket_mb=64", "rollout.num_servers=2"])


def test_sglang_and_weight_sync_sections():
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.num_servers=3", "rollout.sglang.max_inflight=8",
                             "rollout.sglang.server_args=[--tp-size, '2']", "rollout.sglang.sync_method=distributed",
                             "weight_sync.bucket_mb=64", "weight_sync.verify=version", "weight_sync.verify_tol=0.1",
                             "weight_sync.probe_tokens=4"])
    sg = cfg.rollout.sglang
    assert (sg.num_servers, sg.max_inflight, sg.server_args, sg.sync_method) == (3, 8, ["--tp-size", "2"],
                                                                                "distributed")
    assert (sg.request_timeout_s, sg.server_device, sg.max_server_restarts) == (600.0, "auto", 2)   # defaults
    w = cfg.weight_sync
    assert (w.bucket_mb, w.verify, w.verify_tol, w.probe_tokens) == (64.0, "version", 0.1, 4)
    assert isinstance(w.bucket_mb, float)
    # The sections round-trip through the resolved dump like every other.
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)
    # With verify='version' the probe does not run, so it need not fit the context.
    load_config(None, ["weight_sync.verify=version", "weight_sync.probe_tokens=100000"])


def test_server_tp_reads_the_launch_flags():
    from megatron_entcov.config import server_tp

    assert server_tp([]) == 1 and server_tp(["--mem-fraction-static", "0.5"]) == 1
    assert server_tp(["--tp-size", "4"]) == 4 and server_tp(["--tp=2", "--dp", "3"]) == 2
    with pytest.raises(ValueError, match=r"rollout.sglang.server_args=\['--tp', '0'\] is invalid"):
        server_tp(["--tp", "0"])


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
    cfg.resolve(p.model_parallel_size * _dp_for(path))       # tp x pp x cp x dp


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


SP_LOCAL_GPU = ["parallel.backend=nccl", "model.transformer_impl=local", "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true"]
SP_LOCAL_GPU_ERROR = ("parallel.sequence_parallel=True is invalid: needs Transformer Engine on a GPU (parallel.backend="
                      "nccl): Megatron's local spec (model.transformer_impl=local) refuses it; set "
                      "model.transformer_impl=auto (Transformer Engine installed) or parallel.sequence_parallel=false")


def test_sequence_parallel_on_gpu_ranks_with_the_local_spec_is_refused_at_config_time():
    """Megatron's local-spec norm asserts sequence parallelism off; compat/cpu.py lifts that on CPU only, so a
    config that puts the local spec on GPU ranks (nccl) with it is refused before anything starts. On gloo (CPU)
    and with 'auto' (the build decides, policy/model.py check_local_spec) it loads."""
    with pytest.raises(ValueError) as err:
        load_config(None, SP_LOCAL_GPU)
    assert str(err.value) == SP_LOCAL_GPU_ERROR
    assert load_config(None, [*SP_LOCAL_GPU, "parallel.backend=gloo"]).parallel.sequence_parallel
    assert load_config(None, [*SP_LOCAL_GPU, "model.transformer_impl=auto"]).parallel.sequence_parallel


def test_the_cli_refuses_sequence_parallel_on_gpu_ranks_with_the_local_spec_in_one_line(tmp_path):
    import subprocess
    import sys

    args = [a for kv in [*SP_LOCAL_GPU, f"output_dir={tmp_path}"] for a in ("--set", kv)]
    out = subprocess.run([sys.executable, "-m", "megatron_entcov", "train", "--config",
                          str(ROOT / "configs" / "quickstart.yaml"), *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode != 0
    assert SP_LOCAL_GPU_ERROR in out.stderr and not list(tmp_path.iterdir())


# Launched GPU servers go on the replica's own GPUs; NCCL refuses two ranks of one group on a GPU.
DIST_COLOCATED = ["rollout.engine=sglang", "rollout.sglang.server_device=cuda", "rollout.sglang.sync_method=distributed"]
DIST_COLOCATED_ERROR = (
    "rollout.sglang.sync_method='distributed' is invalid: contradicts launched GPU servers (rollout.sglang."
    "server_device=cuda without server_urls or router_url), which go on the replica's own GPUs: NCCL refuses two "
    "ranks of the weight-sync group on one GPU; set rollout.sglang.sync_method=tensor (CUDA IPC, made for "
    "colocated servers), or start the servers on other GPUs and list them in rollout.sglang.server_urls")


def test_distributed_sync_with_colocated_launched_servers_is_refused_at_config_time():
    """A 'distributed' (NCCL) weight sync to servers launched on the trainer's own GPUs would fail at the group's
    first broadcast ("Duplicate GPU detected"); refused at load, naming both fields and the fix. The same sync to
    servers at URLs, to CPU servers, or 'tensor' to colocated servers loads."""
    with pytest.raises(ValueError) as err:
        load_config(None, DIST_COLOCATED)
    assert str(err.value) == DIST_COLOCATED_ERROR
    for ok in (["rollout.sglang.server_urls=[http://rollout-node:30000]"], ["rollout.sglang.server_device=cpu"],
               ["rollout.sglang.sync_method=tensor"]):
        cfg = load_config(None, [*DIST_COLOCATED, *ok])
        assert (cfg.rollout.sglang.sync_method, cfg.rollout.sglang.server_device) == \
            (ok[0].split("=", 1)[1] if "sync_method" in ok[0] else "distributed",
             "cpu" if "server_device" in ok[0] else "cuda")


def test_the_cli_refuses_distributed_sync_with_colocated_launched_servers_in_one_line(tmp_path):
    import subprocess
    import sys

    args = [a for kv in [*DIST_COLOCATED, f"output_dir={tmp_path}"] for a in ("--set", kv)]
    out = subprocess.run([sys.executable, "-m", "megatron_entcov", "train", "--config",
                          str(ROOT / "configs" / "quickstart.yaml"), *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode != 0
    assert DIST_COLOCATED_ERROR in out.stderr and not list(tmp_path.iterdir())
