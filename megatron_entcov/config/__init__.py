"""Run configuration: nested dataclass sections, YAML loading, ``--set`` overrides, validation, resolved dump.

The public names, re-exported from where they live: :class:`RunConfig` and its sections (config/schema.py,
config/rollout.py, config/data.py; their checks in config/checks.py), reading and writing config files
(config/load.py). The Hugging Face config.json mapping is config/hf.py, the dtype table config/dtypes.py; import
those from their modules.

Example:
    cfg = load_config("configs/quickstart.yaml", overrides=["loss.name=kl_cov", "optim.lr=1e-5"])
    cfg.resolve(world_size=4)
    dump_config(cfg, run_dir / "resolved_config.yaml")

Design notes: docs/design/config.md
"""

from megatron_entcov.config.data import DataConfig, EvalConfig, SFTConfig
from megatron_entcov.config.hardware import HardwareConfig
from megatron_entcov.config.load import (
    MOVED_KEYS,
    NON_FINITE_FLOAT_FIELDS,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    source_revision,
)
from megatron_entcov.config.rollout import (
    SYNC_PROBE_PROMPT_LEN,
    RolloutConfig,
    SamplingConfig,
    SGLangConfig,
    WeightSyncConfig,
    server_tp,
)
from megatron_entcov.config.schema import (
    AGG_MODES,
    LOSS_NAMES,
    RUN_NAME_RULE,
    SCHEDULE_KINDS,
    CheckpointConfig,
    LossConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
)

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "RolloutConfig",
    "SGLangConfig",
    "WeightSyncConfig",
    "SamplingConfig",
    "ScheduleConfig",
    "LossConfig",
    "OptimConfig",
    "DataConfig",
    "CheckpointConfig",
    "MetricsConfig",
    "EvalConfig",
    "SFTConfig",
    "HardwareConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "dump_config",
    "source_revision",
    "server_tp",
    "MOVED_KEYS",
    "NON_FINITE_FLOAT_FIELDS",
    "SYNC_PROBE_PROMPT_LEN",
    "SCHEDULE_KINDS",
    "LOSS_NAMES",
    "AGG_MODES",
    "RUN_NAME_RULE",
]
