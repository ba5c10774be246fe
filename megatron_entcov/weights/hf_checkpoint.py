"""Reading Hugging Face checkpoints: safetensors tensors, config.json as a ModelConfig, and their checks.

Read lazily: :class:`HFCheckpoint` takes shapes and dtypes from the safetensors headers and reads one tensor at
a time (one file, or shards with an index), :func:`load_hf_model_config` turns config.json into a
:class:`~megatron_entcov.config.ModelConfig` (ValueError for an unsupported architecture), and
:func:`check_hf_checkpoint` checks every tensor the map needs against the shapes config.json implies. No
Megatron code here.

Example:
    cfg = load_hf_model_config("/models/Qwen2.5-7B", dtype="bfloat16")
    hf = HFCheckpoint("/models/Qwen2.5-7B")
    check_hf_checkpoint(hf, cfg)                        # ValueError: missing tensor / shape mismatch
    embed = hf.get("model.embed_tokens.weight")         # one tensor, read on demand

Design notes: docs/design/weights.md
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from megatron_entcov.config import ModelConfig
from megatron_entcov.config.dtypes import DTYPES, dtype_name
from megatron_entcov.config.hf import read_hf_model_fields
from megatron_entcov.weights.hf_map import expected_hf_shapes

logger = logging.getLogger(__name__)

__all__ = ["HFCheckpoint", "load_hf_model_config", "check_hf_checkpoint", "open_safetensors"]

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFCheckpoint:
    """Lazy reader of a Hugging Face safetensors checkpoint (one file, or shards with an index).

    Shapes and dtypes come from the file headers; :meth:`get` reads one tensor at a time.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_weight_map(index)
        elif (self.dir / "model.safetensors").is_file():
            with open_safetensors(self.dir / "model.safetensors") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        elif list(self.dir.glob("pytorch_model*.bin")):
            raise ValueError(f"{str(self.dir)!r} holds PyTorch .bin weights; only safetensors are supported "
                             "(re-save with save_pretrained(..., safe_serialization=True))")
        else:
            raise ValueError(f"{str(self.dir)!r} holds no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[tuple[int, ...], str]] | None = None

    def _path(self, name: str) -> Path:
        path = self.dir / self.weight_map[name]
        if not path.is_file():
            raise ValueError(f"missing tensor {name!r}: the index names {path.name!r}, which is not in {str(self.dir)!r}")
        return path

    def _header(self, name: str) -> tuple[tuple[int, ...], str]:
        if self._headers is None:
            self._headers = {}
            for file in sorted(set(self.weight_map.values())):
                path = self.dir / file
                if not path.is_file():
                    continue  # reported by _path() for the tensors that are needed
                with open_safetensors(path) as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self._headers[key] = (tuple(sl.get_shape()), sl.get_dtype())
        if name not in self._headers:
            self._path(name)
            raise ValueError(f"missing tensor {name!r}: the index names a file that does not hold it")
        return self._headers[name]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        code = self._header(name)[1]
        if code not in _ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {code}; supported: {', '.join(_ST_DTYPES)}")
        return _ST_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """One tensor. The file is opened for this read only: an open safetensors handle keeps every page
        it has read mapped, so keeping shards open would hold a second copy of the model in this process."""
        if name not in self.weight_map:
            raise ValueError(f"missing tensor {name!r} in the Hugging Face checkpoint {str(self.dir)!r}")
        with open_safetensors(self._path(name)) as f:
            return f.get_tensor(name)


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open(path)``; a file that is not readable safetensors (a malformed header, a file cut short, an
    unreadable file) is a ValueError naming it, not safetensors' traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({' '.join(str(exc).split())[:200]}); "
                         "download or save it again") from exc


def _read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a model.safetensors.index.json: tensor name -> file name."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{str(index)!r} is not a safetensors index (JSON with a weight_map): {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{str(index)!r} has no weight_map of tensor names to file names")
    return weight_map


def load_hf_model_config(hf_dir: str | Path, *, dtype: str | None = None,
                         make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig of a Hugging Face directory; ValueError for an unsupported architecture.

    ``dtype`` None keeps the checkpoint's dtype (config.json ``dtype``/``torch_dtype``, else float32).
    """
    hf_dir = Path(hf_dir)
    fields = read_hf_model_fields(hf_dir, field="--hf-dir")       # the same fields a run's config derives
    raw = json.loads((hf_dir / "config.json").read_text())
    source = raw.get("dtype") or raw.get("torch_dtype")
    params_dtype = dtype_name(dtype) or (source if source in DTYPES else "float32")
    return ModelConfig(**fields, params_dtype=params_dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def check_hf_checkpoint(hf: HFCheckpoint, cfg: ModelConfig) -> None:
    """Every tensor the model needs is there with the shape config.json implies; ValueError otherwise."""
    expected = expected_hf_shapes(cfg)
    missing = [n for n in expected if n not in hf.weight_map]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0]!r}{more} in the Hugging Face checkpoint {str(hf.dir)!r}")
    for name, shape in expected.items():
        got = hf.shape(name)
        if got != shape:
            raise ValueError(f"shape mismatch for {name!r}: the checkpoint has {got}, config.json implies {shape}")
        hf.dtype(name)
    extra = sorted(set(hf.weight_map) - set(expected))
    if extra:
        logger.warning("convert: ignoring %d tensor(s) not in the map, e.g. %s", len(extra), extra[:3])
