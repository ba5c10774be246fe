"""What this node's GPU toolchain can run, probed once per process: Transformer Engine and Megatron's jit_fuser.

- :func:`guard_transformer_engine` (run when ``megatron_entcov.compat`` is imported, before any Megatron import of
  the command): an installed TE whose ``transformer_engine.pytorch`` does not import is hidden from the process,
  so Megatron-Core, which would fail at its own import, sees no TE and uses its local layers.
- :func:`transformer_engine`: a CUDA device, ``transformer_engine.pytorch`` and Megatron's TE layer spec import.
- :func:`jit_fuser`: Megatron's ``megatron.core.jit.jit_fuser`` (torch.compile, i.e. Triton on a GPU) compiles
  and runs a tiny SwiGLU on the device and gives eager's values.
Each answers a :class:`Probe` (ok, and why, for a log line), cached; policy/model.py decides and logs.

Example:
    te = transformer_engine()                  # Probe(ok=False, reason="transformer_engine.pytorch does not ...")
    fuser = jit_fuser(torch.device("cuda", 0), torch.bfloat16)
Design notes: docs/design/compat.md
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Probe", "guard_transformer_engine", "transformer_engine", "jit_fuser", "reset"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """The answer of a probe: whether the thing works here, and why (or why not), for a log or error line."""

    ok: bool
    reason: str


_TE: Probe | None = None
_FUSER: dict[tuple[str, torch.dtype], Probe] = {}
_GUARDED = False
_HIDDEN: str | None = None
"""Why Transformer Engine was hidden from this process (None: it was not)."""


def reset() -> None:
    """Forget every cached answer (tests; a process asks once). A hidden TE stays hidden in sys.modules."""
    global _TE, _GUARDED, _HIDDEN
    _TE, _GUARDED, _HIDDEN = None, False, None
    _FUSER.clear()


def _brief(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters (import errors can be pages long)."""
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def guard_transformer_engine() -> None:
    """Once per process: if Transformer Engine is installed but ``transformer_engine.pytorch`` does not import
    (its CUDA libraries do not load), hide it (``sys.modules['transformer_engine'] = None``: every later
    ``import transformer_engine`` raises ImportError, which Megatron-Core catches) and say so in one warning.
    Megatron-Core imports ``transformer_engine.pytorch`` unguarded at its own import once the top-level package
    imports (megatron/core/fp8_utils.py), so this must run before Megatron is imported. Costs nothing without TE."""
    global _GUARDED, _HIDDEN
    if _GUARDED:
        return
    _GUARDED = True
    if "transformer_engine" in sys.modules:
        if sys.modules["transformer_engine"] is None:
            return                                          # hidden (or blocked) by someone already
    else:
        try:
            if importlib.util.find_spec("transformer_engine") is None:
                return                                      # not installed
        except (ImportError, ValueError):
            return
    try:
        importlib.import_module("transformer_engine")
        importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # noqa: BLE001 - a TE whose CUDA libraries fail raises OSError, RuntimeError, ...
        _HIDDEN = f"transformer_engine.pytorch does not import ({_brief(exc)})"
        for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
            del sys.modules[name]
        sys.modules["transformer_engine"] = None
        late = " (Megatron-Core was imported before this check)" if "megatron.core" in sys.modules else ""
        logger.warning("Transformer Engine is installed but %s: hidden from Megatron-Core for this process%s, "
                       "which uses the local layer spec and torch's optimizers", _HIDDEN, late)


def transformer_engine() -> Probe:
    """Whether Megatron's Transformer Engine layer spec can be built here (cached for the process)."""
    global _TE
    if _TE is None:
        guard_transformer_engine()
        _TE = _probe_transformer_engine()
    return _TE


def _probe_transformer_engine() -> Probe:
    if _HIDDEN is not None:
        return Probe(False, _HIDDEN)
    if not torch.cuda.is_available():
        return Probe(False, "no CUDA device (Transformer Engine's kernels are GPU-only)")
    try:
        te_pytorch = importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # noqa: BLE001 - not installed (the guard hid a broken one)
        if isinstance(exc, ModuleNotFoundError) and exc.name == "transformer_engine":
            return Probe(False, "transformer_engine is not installed")
        return Probe(False, f"transformer_engine.pytorch does not import ({_brief(exc)})")
    names = ("megatron.core.extensions.transformer_engine", "megatron.core.extensions.transformer_engine_spec_provider",
             "megatron.core.models.gpt.gpt_layer_specs")
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            return Probe(False, f"Megatron's TE layer spec does not import: {name} ({_brief(exc)})")
        if getattr(module, "HAVE_TE", True) is not True:
            return Probe(False, f"{name} found no Transformer Engine (HAVE_TE=False: its own import of TE failed)")
    version = getattr(importlib.import_module("transformer_engine"), "__version__",
                      getattr(te_pytorch, "__version__", "unknown version"))
    return Probe(True, f"transformer_engine {version}: transformer_engine.pytorch and Megatron's TE layer spec import")


def _swiglu(y: torch.Tensor) -> torch.Tensor:
    # What Megatron's bias_activation_fusion compiles for a gated SiLU MLP (megatron/core/fusions/fused_bias_swiglu).
    y_1, y_2 = torch.chunk(y, 2, -1)
    return F.silu(y_1) * y_2


def jit_fuser(device: torch.device, dtype: torch.dtype = torch.float32) -> Probe:
    """Whether Megatron's jit_fuser compiles and runs on ``device`` (cached per device and dtype). A compiler
    that fails (no working Triton or C++ toolchain) fails on its first call, which is this probe's call."""
    key = (str(device), dtype)
    if key not in _FUSER:
        _FUSER[key] = _probe_jit_fuser(device, dtype)
    return _FUSER[key]


def _probe_jit_fuser(device: torch.device, dtype: torch.dtype) -> Probe:
    from megatron.core import jit

    fuser = jit.jit_fuser
    name = f"Megatron's jit_fuser ({getattr(fuser, '__module__', '?')}.{getattr(fuser, '__name__', fuser)})"
    if fuser is jit.noop_decorator:
        return Probe(True, f"{name} compiles nothing here")
    y = torch.linspace(-4.0, 4.0, 64, device=device).reshape(4, 16).to(dtype)
    try:
        out = fuser(_swiglu)(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - inductor/Triton raise many types
        return Probe(False, f"{name} fails on {device} ({_brief(exc)})")
    if not torch.allclose(out.float(), _swiglu(y).float(), rtol=1e-2, atol=1e-2):
        return Probe(False, f"{name} gives values on {device} that differ from eager")
    return Probe(True, f"{name} compiles and runs on {device}")
