"""Config inputs that used to be accepted and then trained garbage or wrote in the wrong place: non-finite floats,
run names that leave output_dir, float16 training, and a ``model`` section that contradicts ``model.hf_dir``'s
config.json (derived fields, checked fields). The Trainer-level halves are in tests/distributed/test_input_faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import yaml

from megatron_entcov.config import (
    NON_FINITE_FLOAT_FIELDS,
    ModelConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

# --------------------------------------------------------------------------------------------------
# Non-finite floats
# --------------------------------------------------------------------------------------------------


def _float_fields(cls=RunConfig, prefix=""):
    """Dotted paths of every float field of every section (float and float | None)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, f"{path}.")
        elif tp is float or float in typing.get_args(tp):
            yield path


FLOAT_FIELDS = sorted(_float_fields())


def test_the_walk_finds_the_float_fields():
    assert {"optim.lr", "loss.clip_ratio_c", "model.rotary_base", "loss.kl_cov_ratio_schedule.end",
            "rollout.sglang.request_timeout_s", "weight_sync.verify_tol"} <= set(FLOAT_FIELDS)
    assert NON_FINITE_FLOAT_FIELDS == frozenset()        # no field gives inf a meaning today


@pytest.mark.parametrize("path", FLOAT_FIELDS)
@pytest.mark.parametrize("raw, shown", [(".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")])
def test_every_float_field_rejects_non_finite_values(path, raw, shown):
    with pytest.raises(ValueError, match=rf"^{path}={shown} is invalid: must be a finite number \(not inf or nan\)$"):
        load_config(None, [f"{path}={raw}"])


@pytest.mark.parametrize("raw", ["inf", "Infinity", "nan", "NaN", "-inf", "1e999"])
def test_non_finite_spellings_that_yaml_reads_as_strings_are_rejected_too(raw):
    # "inf"/"nan" are strings to YAML, turned into floats by the loader; 1e999 overflows to inf.
    with pytest.raises(ValueError, match=r"^optim.lr=-?(inf|nan) is invalid: must be a finite number"):
        load_config(None, [f"optim.lr={raw}"])


def test_non_finite_in_a_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("# test\noptim:\n  lr: .inf\n")
    with pytest.raises(ValueError, match=r"optim.lr=inf is invalid: must be a finite number"):
        load_config(tmp_path / "c.yaml")
    assert load_config(None, ["optim.lr=1e-5"]).optim.lr == 1e-5


# --------------------------------------------------------------------------------------------------
# Run names
# --------------------------------------------------------------------------------------------------

RULE = (r"a run name is one directory name under output_dir: not empty, not '\.' or '\.\.', without '/', '\\' or "
        r"control characters, not starting with '-'")


@pytest.mark.parametrize("name", ["..", ".", "../escape", "../../etc", "a/b", "/abs", "a\\b", "..\\x", "-rf",
                                  "a\x00b", "tab\tname", "line\nbreak", ""])
def test_names_that_are_not_one_path_component_fail(name):
    with pytest.raises(ValueError, match="^" + re.escape(f"name={name!r} is invalid: ") + RULE):
        config_from_dict({"name": name})


def test_dotdot_from_the_command_line_fails(tmp_path):
    with pytest.raises(ValueError, match=rf"name='\.\.' is invalid: {RULE}; e\.g\. name="):
        load_config(None, [f"output_dir={tmp_path}/runs", "name=.."])


@pytest.mark.parametrize("name", ["qwen2.5-7b-kl-cov", "run_1", "a..b", ".hidden", "x-", "sft+rl=1", "run 2"])
def test_single_component_names_stay_under_output_dir(name, tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/runs", f"name={name}"])
    assert cfg.name == name
    assert Path(cfg.run_dir).resolve().parent == (tmp_path / "runs").resolve()


# --------------------------------------------------------------------------------------------------
# float16
# --------------------------------------------------------------------------------------------------


def test_float16_training_is_rejected_naming_the_fix():
    with pytest.raises(ValueError, match=r"model.params_dtype='float16' is invalid: set model.params_dtype=bfloat16 "
                                         r"on GPU \(or float32\): training in float16 needs loss scaling"):
        load_config(None, ["model.params_dtype=float16"])
    assert load_config(None, ["model.params_dtype=bfloat16"]).model.params_dtype == "bfloat16"
    # A ModelConfig alone (what the converters describe a checkpoint with) may still say float16.
    assert ModelConfig(params_dtype="float16").params_dtype == "float16"


def test_float16_checkpoints_still_convert(hf_llama):
    from megatron_entcov.weights.hf_checkpoint import load_hf_model_config

    assert load_hf_model_config(hf_llama, dtype="float16").params_dtype == "float16"


# --------------------------------------------------------------------------------------------------
# optim.max_consecutive_skipped (the stop itself: tests/distributed/test_input_faults.py)
# --------------------------------------------------------------------------------------------------


def test_max_consecutive_skipped_field():
    assert RunConfig().optim.max_consecutive_skipped == 5
    assert load_config(None, ["optim.max_consecutive_skipped=0"]).optim.max_consecutive_skipped == 0
    with pytest.raises(ValueError, match=r"optim.max_consecutive_skipped=-1 is invalid: must be >= 0"):
        load_config(None, ["optim.max_consecutive_skipped=-1"])


# --------------------------------------------------------------------------------------------------
# model.hf_dir: derived and checked architecture fields
# --------------------------------------------------------------------------------------------------

LLAMA = dict(vocab_size=20, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random 4-layer Llama (weights and config.json), untied, GQA, rope_theta 5e5."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**LLAMA, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_qwen(tmp_path_factory):
    """config.json of a tiny Qwen2 (QKV bias, tied embeddings, rope_theta as older files write it)."""
    path = tmp_path_factory.mktemp("qwen")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 300, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": True, "use_sliding_window": False, "torch_dtype": "bfloat16"}))
    return str(path)


def test_fields_left_out_come_from_config_json(hf_llama):
    from megatron_entcov.weights.hf_checkpoint import HFCheckpoint, check_hf_checkpoint, load_hf_model_config

    cfg = load_config(None, [f"model.hf_dir={hf_llama}", "model.make_vocab_size_divisible_by=8"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups) == (4, 32, 48,
                                                                                                         4, 2)
    assert (m.vocab_size, m.max_position_embeddings, m.rotary_base, m.norm_epsilon) == (20, 128, 5e5, 1e-5)
    assert (m.kv_channels, m.add_qkv_bias, m.tie_word_embeddings) == (None, False, False)
    assert m.make_vocab_size_divisible_by == 8 and m.params_dtype == "float32"     # not architecture: kept
    # The converter reads the same directory to the same architecture, and the weights have its shapes.
    conv = load_hf_model_config(hf_llama, make_vocab_size_divisible_by=8)
    assert dataclasses.replace(conv, hf_dir=hf_llama) == m
    check_hf_checkpoint(HFCheckpoint(hf_llama), m)


def test_qwen2_fields_and_a_yaml_model_section(hf_qwen, tmp_path):
    (tmp_path / "c.yaml").write_text(f"# test\nmodel:\n  hf_dir: {hf_qwen}\n  num_layers: 6\n  kv_channels: 8\n"
                                     "  max_position_embeddings: 512\n  params_dtype: bfloat16\n"
                                     "parallel:\n  tensor_model_parallel_size: 2\n")
    m = load_config(tmp_path / "c.yaml").model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.vocab_size) == (6, 64, 8, 2, 300)
    assert (m.add_qkv_bias, m.tie_word_embeddings, m.rotary_base) == (True, True, 1e6)
    assert m.kv_channels == 8                    # given, and equal to hidden_size // heads: agrees with null
    assert m.max_position_embeddings == 512      # a shorter context than the checkpoint's is allowed
    assert m.params_dtype == "bfloat16"


def test_a_field_that_contradicts_config_json_fails_naming_both_values(hf_llama):
    cfg_file = str(Path(hf_llama) / "config.json")
    with pytest.raises(ValueError) as err:
        load_config(None, [f"model.hf_dir={hf_llama}", "model.num_layers=2"])
    assert str(err.value) == (f"model.num_layers=2 but {cfg_file} has num_hidden_layers=4: set model.num_layers=4 "
                              "or remove it")


@pytest.mark.parametrize("setting, message", [
    ("model.hidden_size=64", "model.hidden_size=64 but {f} has hidden_size=32: set model.hidden_size=32 or remove it"),
    ("model.ffn_hidden_size=64", "model.ffn_hidden_size=64 but {f} has intermediate_size=48"),
    ("model.num_query_groups=4", "model.num_query_groups=4 but {f} has num_key_value_heads=2"),
    ("model.kv_channels=16", "model.kv_channels=16 but {f} has head_dim=8: set model.kv_channels=8 or remove it"),
    ("model.vocab_size=32", "model.vocab_size=32 but {f} has vocab_size=20"),
    ("model.max_position_embeddings=256", "model.max_position_embeddings=256 but {f} has max_position_embeddings=128: "
                                          "set model.max_position_embeddings <= 128"),
    ("model.rotary_base=10000", "model.rotary_base=10000.0 but {f} has rope_theta=500000.0: set "
                                "model.rotary_base=500000.0 or remove it"),
    ("model.norm_epsilon=1e-6", "model.norm_epsilon=1e-06 but {f} has rms_norm_eps=1e-05"),
    ("model.add_qkv_bias=true", "model.add_qkv_bias=true but {f} has a Llama architecture (no QKV bias): set "
                                "model.add_qkv_bias=false or remove it"),
    ("model.tie_word_embeddings=true", "model.tie_word_embeddings=true but {f} has tie_word_embeddings=false: set "
                                       "model.tie_word_embeddings=false or remove it"),
])
def test_every_architecture_field_is_checked(hf_llama, setting, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"model.hf_dir={hf_llama}", setting])
    assert message.format(f=Path(hf_llama) / "config.json") in str(err.value)


def test_all_mismatches_are_named_at_once(hf_qwen):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"model.hf_dir={hf_qwen}", "model.num_layers=2", "model.add_qkv_bias=false"])
    msg = str(err.value)
    assert "model.num_layers=2 but" in msg and "has num_hidden_layers=6" in msg
    assert "model.add_qkv_bias=false but" in msg
    assert "has a Qwen2 architecture (QKV bias): set model.add_qkv_bias=true or remove it" in msg
    assert msg.count("; ") == 1                            # the two, and nothing else


def test_the_start_check_compares_every_field(hf_llama):
    """What the Actor runs before building the model: a ModelConfig built without the loader (defaults: 2 layers)
    fails; the loader's derived config passes."""
    from megatron_entcov.config.hf import check_model_matches_hf

    with pytest.raises(ValueError, match=r"model.num_layers=2 but .*config.json has num_hidden_layers=4: set "
                                         r"model.num_layers=4 or remove it; model.hidden_size=64 but"):
        check_model_matches_hf(ModelConfig(hf_dir=hf_llama))
    check_model_matches_hf(load_config(None, [f"model.hf_dir={hf_llama}"]).model)
    check_model_matches_hf(ModelConfig())                  # no hf_dir: nothing to check


def test_a_directory_missing_here_is_checked_at_the_start(tmp_path):
    """A config written for another machine (configs/qwen2.5-*.yaml) still loads; the start check then fails."""
    from megatron_entcov.config.hf import check_model_matches_hf

    gone = tmp_path / "not_here"
    cfg = load_config(None, [f"model.hf_dir={gone}"])
    with pytest.raises(ValueError, match=re.escape(f"model.hf_dir='{gone}' is not a directory: point it at a Hugging")):
        check_model_matches_hf(cfg.model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model.hf_dir='.*empty' has no config.json"):
        load_config(None, [f"model.hf_dir={tmp_path / 'empty'}"])


def test_the_resolved_dump_of_a_derived_config_loads_back(hf_llama, tmp_path):
    cfg = load_config(None, [f"model.hf_dir={hf_llama}"]).resolve(1)
    dump_config(cfg, tmp_path / "resolved_config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "resolved_config.yaml").read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)
