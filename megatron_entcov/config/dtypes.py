"""The parameter dtypes the project supports, by name: one table for the model, the engines and the converters.

Example:
    torch_dtype("bfloat16")      # torch.bfloat16
    dtype_name("bf16")           # 'bfloat16' (aliases and 'torch.' prefixes accepted)
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_name", "torch_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Supported parameter dtypes (ModelConfig.params_dtype, converter --dtype, engine dtype)."""

_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(name: str | torch.dtype | None, *, field: str = "--dtype") -> str | None:
    """The canonical name of a dtype given by name, alias or torch dtype; None stays None.

    Raises ValueError naming ``field`` for anything unsupported."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        for key, value in DTYPES.items():
            if value == name:
                return key
        raise ValueError(f"{field}={name} is not supported: choose one of {', '.join(DTYPES)}")
    canon = _ALIASES.get(str(name), str(name)).removeprefix("torch.")
    if canon not in DTYPES:
        raise ValueError(f"{field} {canon!r} is not supported: choose one of {', '.join(DTYPES)}")
    return canon


def torch_dtype(name: str | torch.dtype, *, field: str = "--dtype") -> torch.dtype:
    """The torch dtype for a supported name, alias or torch dtype (ValueError naming ``field`` otherwise)."""
    return DTYPES[dtype_name(name, field=field)]
