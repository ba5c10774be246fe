"""Helpers shared by the SGLang tests (imported as `sglang_utils`: this directory is on sys.path)."""

from __future__ import annotations

from pathlib import Path


def load_state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def buckets(state_dict: dict, size: int = 3) -> list[list]:
    """The state dict as buckets of ``size`` tensors (what WeightSync hands an engine)."""
    items = sorted(state_dict.items())
    return [items[i:i + size] for i in range(0, len(items), size)]
