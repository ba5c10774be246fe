"""setup_logging: the project's records reach the handler, third-party noise is filtered at its source
(logger or warning module) by default and shown with verbose; warnings are not muted globally.

Each case runs in a fresh interpreter so logging and warnings state (and pytest's own capture) do not leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import io, json, logging, sys, types, warnings
    from megatron_entcov.run.logs import setup_logging

    setup_logging(**json.loads(sys.argv[1]))
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append([record.name, record.levelname, record.getMessage()])

    logging.getLogger().addHandler(Collect())
    logging.getLogger("megatron_entcov.trainer").info("ours info")
    logging.getLogger("megatron_entcov.trainer").debug("ours debug")
    logging.getLogger("megatron_entcov.trainer").warning("ours warning")
    logging.getLogger("megatron.core.optimizer").info("OptimizerConfig(lr=...)")
    logging.getLogger("megatron.core.optimizer").warning("optimizer warning")
    logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info("Params for bucket 1")
    logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision").info("Detected")
    logging.getLogger("some.other.lib").info("other info")

    # Python warnings attributed to a given module: run warnings.warn from code whose __name__ is that module.
    shown = []
    warnings.showwarning = lambda message, category, *a, **k: shown.append([category.__name__, str(message)])

    def warn_from(module, message, category):
        mod = types.ModuleType(module)
        exec(f"import warnings\\ndef go():\\n    warnings.warn({message!r}, {category.__name__})\\n", mod.__dict__)
        mod.go()

    warn_from("megatron.core.dist_checkpointing.strategies.torch", "`load_state_dict` is deprecated", FutureWarning)
    warn_from("torch.distributed.checkpoint.planner_helpers",
              "Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
    warn_from("megatron.core.models.gpt.gpt_layer_specs", "Apex is not installed. Falling back to Torch Norm",
              UserWarning)
    warn_from("some_user_module", "`load_state_dict` is deprecated", FutureWarning)
    warn_from("some_user_module", "Apex is not installed. Falling back to Torch Norm", UserWarning)
    warn_from("torch.distributed.checkpoint.state_dict_loader", "another deprecation", FutureWarning)
    print(json.dumps({"records": seen, "warnings": shown, "root": logging.getLogger().level}))
""")


def _probe(kwargs: dict, rank: int = 0) -> dict:
    env = dict(os.environ, RANK=str(rank))
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(kwargs)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["messages"] = [m for _, _, m in result["records"]]
    result["warned"] = [m for _, m in result["warnings"]]
    result["stderr"] = out.stderr
    return result


def test_default_keeps_ours_and_filters_megatron_internals():
    r = _probe({})
    assert r["root"] == 20  # INFO, not above: the project's info lines show
    assert r["messages"] == ["ours info", "ours warning", "optimizer warning", "other info"]
    # The installed stream handler printed the same records, with rank and logger name.
    assert "[" in r["stderr"] and " r0] INFO megatron_entcov.trainer: ours info" in r["stderr"]
    assert "OptimizerConfig" not in r["stderr"] and "Params for bucket" not in r["stderr"]


def test_default_filters_warnings_by_source_only():
    r = _probe({})
    assert r["warned"] == [
        "`load_state_dict` is deprecated",                     # same text from another module still shows
        "Apex is not installed. Falling back to Torch Norm",   # likewise
        "another deprecation",                                 # other torch.distributed.checkpoint warnings show
    ]


def test_verbose_shows_everything():
    r = _probe({"verbose": True})
    assert r["messages"] == ["ours info", "ours warning", "OptimizerConfig(lr=...)", "optimizer warning",
                             "Params for bucket 1", "Detected", "other info"]
    assert len(r["warned"]) == 6
    assert "Please use DTensor instead and we are deprecating ShardedTensor." in r["warned"]


def test_debug_level_adds_debug_records_and_implies_verbose():
    r = _probe({"level": "debug"})
    assert r["root"] == 10
    assert "ours debug" in r["messages"] and "OptimizerConfig(lr=...)" in r["messages"]
    assert len(r["warned"]) == 6


def test_warning_level():
    r = _probe({"level": "warning"})
    assert r["messages"] == ["ours warning", "optimizer warning"]


def test_other_ranks_stay_at_warning():
    r = _probe({}, rank=1)
    assert r["root"] == 30
    assert r["messages"] == ["ours warning", "optimizer warning"]
    assert " r1] WARNING megatron_entcov.trainer: ours warning" in r["stderr"]
    r = _probe({"verbose": True, "level": "debug"}, rank=1)
    assert r["root"] == 30 and "ours debug" not in r["messages"] and "ours info" not in r["messages"]
    assert "OptimizerConfig(lr=...)" not in r["messages"]


def test_setup_again_replaces_its_handler_and_undoes_the_filters():
    import logging
    import warnings

    from megatron_entcov.run.logs import QUIET_WARNINGS, setup_logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    opt = logging.getLogger("megatron.core.optimizer")
    with warnings.catch_warnings():
        try:
            setup_logging()
            setup_logging()
            ours = [h for h in root.handlers if h not in handlers]
            assert len(ours) == 1
            assert opt.level == logging.WARNING
            assert sum(f[0] == "ignore" and f[2] is FutureWarning for f in warnings.filters) >= 2
            n_filters = len(warnings.filters)
            setup_logging(verbose=True)
            assert len([h for h in root.handlers if h not in handlers]) == 1
            assert opt.level == logging.NOTSET
            assert len(warnings.filters) == n_filters - len(QUIET_WARNINGS)
        finally:
            for h in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(h)
            root.setLevel(level)
            opt.setLevel(logging.NOTSET)


def test_bad_level():
    from megatron_entcov.run.logs import setup_logging

    with pytest.raises(ValueError, match="log level"):
        setup_logging(level="loud")


def test_cli_flags_parse():
    from megatron_entcov.cli import build_parser

    parser = build_parser()
    for cmd in ("train", "sft", "quickstart"):
        args = parser.parse_args([cmd, "--verbose", "--log-level", "debug"])
        assert (args.verbose, args.log_level) == (True, "debug")
        args = parser.parse_args([cmd])
        assert (args.verbose, args.log_level) == (False, "info")
