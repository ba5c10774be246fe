"""compat/toolchain.py: the probes of Transformer Engine and Megatron's jit_fuser, on CPU.

A Transformer Engine whose top-level package imports but whose ``transformer_engine.pytorch`` fails (its CUDA
libraries do not load) makes Megatron-Core fail at its own import (megatron/core/fp8_utils.py imports it
unguarded): shown in a fresh interpreter with such a package first on the path, where the command's imports now
hide it, build the local spec and say why. The jit_fuser probe is run with fake compilers that fail on their
first call (as inductor does without a working Triton) or work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_entcov.compat import toolchain

BROKEN = "libcudnn.so.9: cannot open shared object file: No such file or directory"


def _broken_te(root):
    pkg = root / "transformer_engine"
    (pkg / "pytorch").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "2.8.0"\n')
    (pkg / "pytorch" / "__init__.py").write_text(f"raise OSError({BROKEN!r})\n")


def _run(root, code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_te_whose_pytorch_module_fails_is_hidden_so_megatron_imports_and_the_local_spec_is_built(tmp_path):
    _broken_te(tmp_path)
    # The fault itself: Megatron-Core cannot even be imported next to such a TE.
    plain = _run(tmp_path, "import megatron.core")
    assert plain.returncode != 0 and BROKEN in plain.stderr
    # Through the package (any command imports megatron_entcov.compat before Megatron).
    out = _run(tmp_path, """
        from megatron_entcov.compat import toolchain
        from megatron_entcov.config import ModelConfig
        from megatron_entcov.policy import model
        spec = model.build_layer_spec(ModelConfig())
        print("CORE", spec.submodules.self_attention.submodules.core_attention.__name__)
        print("TE", model.te_available(), toolchain.transformer_engine().reason)
        print("CHOICE", model._spec_choice(ModelConfig()))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line[:4] in ("CORE", "TE F", "TE T", "CHOI"))
    assert lines["CORE"] == "PackedDotProductAttention"
    assert lines["TE"] == f"False transformer_engine.pytorch does not import (OSError: {BROKEN})"
    assert lines["CHOICE"] == ("local spec (model.transformer_impl=auto; Transformer Engine not usable: "
                               f"transformer_engine.pytorch does not import (OSError: {BROKEN}))")
    # One warning line, at import, says what was hidden and what the run uses instead.
    warnings = [line for line in out.stderr.splitlines() if "Transformer Engine is installed but" in line]
    assert warnings == [f"Transformer Engine is installed but transformer_engine.pytorch does not import (OSError: "
                        f"{BROKEN}): hidden from Megatron-Core for this process, which uses the local layer spec "
                        "and torch's optimizers"]


def test_no_te_installed_costs_nothing_and_hides_nothing(monkeypatch):
    toolchain.reset()
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    monkeypatch.setattr(toolchain.importlib.util, "find_spec", lambda name: None)
    try:
        toolchain.guard_transformer_engine()
        assert "transformer_engine" not in sys.modules and toolchain._HIDDEN is None
    finally:
        toolchain.reset()


@pytest.fixture
def fake_fuser(monkeypatch):
    """Replace Megatron's jit_fuser with a fake compiler; returns the list of functions it was asked to compile."""
    from megatron.core import jit

    toolchain.reset()
    compiled = []

    def install(fail: Exception | None):
        def compiler(fn):
            compiled.append(fn)

            def run(*args):
                if fail is not None:
                    raise fail                       # as inductor does at the first call without Triton
                return fn(*args)
            return run
        monkeypatch.setattr(jit, "jit_fuser", compiler)
        return compiled

    yield install
    toolchain.reset()


def test_jit_fuser_probe_reports_a_compiler_that_fails_on_its_first_call(fake_fuser):
    compiled = fake_fuser(RuntimeError("Cannot find a working triton installation. More information on installing "
                                       "Triton can be found at https://github.com/openai/triton\nsecond line"))
    probe = toolchain.jit_fuser(torch.device("cpu"), torch.float32)
    assert not probe.ok
    assert probe.reason.startswith("Megatron's jit_fuser (")
    assert probe.reason.endswith("fails on cpu (RuntimeError: Cannot find a working triton installation. More "
                                 "information on installing Triton can be found at https://github.com/openai/triton)")
    assert toolchain.jit_fuser(torch.device("cpu"), torch.float32) is probe and len(compiled) == 1   # once


def test_jit_fuser_probe_passes_a_working_compiler_and_checks_its_values(fake_fuser, monkeypatch):
    fake_fuser(None)
    probe = toolchain.jit_fuser(torch.device("cpu"), torch.bfloat16)
    assert probe.ok and probe.reason.endswith("compiles and runs on cpu")
    # A compiler that returns wrong values is a failed probe too.
    toolchain.reset()
    from megatron.core import jit

    monkeypatch.setattr(jit, "jit_fuser", lambda fn: (lambda y: fn(y) + 1.0))
    wrong = toolchain.jit_fuser(torch.device("cpu"))
    assert not wrong.ok and "differ from eager" in wrong.reason


def test_jit_fuser_probe_with_megatron_s_noop_fuser_compiles_nothing(monkeypatch):
    from megatron.core import jit

    toolchain.reset()
    monkeypatch.setattr(jit, "jit_fuser", jit.noop_decorator)
    try:
        probe = toolchain.jit_fuser(torch.device("cpu"))
        assert probe.ok and probe.reason.endswith("compiles nothing here")
    finally:
        toolchain.reset()
