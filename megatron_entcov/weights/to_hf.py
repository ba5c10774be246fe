"""Offline tool Megatron dist checkpoint (saved at any layout) -> Hugging Face safetensors directory.

:func:`convert_megatron_to_hf` writes safetensors shards of bounded size, their index, config.json and the
tokenizer files, streaming one layer at a time straight from the checkpoint files (no process group, no model).
:func:`resolve_megatron_checkpoint` and :func:`load_checkpoint_model_config` find the dist checkpoint and its
ModelConfig from a model/ dir, a step dir or a checkpoints root. Output-directory rules:
:mod:`megatron_entcov.weights.convert_output`; the other direction: :mod:`megatron_entcov.weights.to_megatron`.

Example (``tools/convert_megatron_to_hf.py`` and ``megatron-entcov convert megatron-to-hf`` call
:func:`main_megatron_to_hf`):
    convert_megatron_to_hf("/ckpts/qwen7b", "/models/qwen7b-rl", dtype="bfloat16")
    python tools/convert_megatron_to_hf.py --ckpt /ckpts/qwen7b --out /models/qwen7b-rl

Design notes (memory): docs/design/weights.md
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
import yaml

from megatron_entcov.config import ModelConfig
from megatron_entcov.config.dtypes import torch_dtype
from megatron_entcov.config.hf import to_hf_config
from megatron_entcov.monitor.metrics import iter_progress
from megatron_entcov.weights.convert_output import (
    MODEL_CONFIG_FILE,
    check_free_space,
    check_output,
    converter_parser,
    copy_hf_side_files,
    run_converter,
    writing_output,
)
from megatron_entcov.weights.hf_checkpoint import load_hf_model_config
from megatron_entcov.weights.hf_map import (
    EMBEDDING_RULE,
    active_rules,
    checkpoint_location,
    checkpoint_shape,
    expected_hf_shapes,
    layer_slots,
    to_hf,
)

logger = logging.getLogger(__name__)

__all__ = ["convert_megatron_to_hf", "resolve_megatron_checkpoint", "load_checkpoint_model_config",
           "main_megatron_to_hf"]


# --------------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------------


def resolve_megatron_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(dist checkpoint dir, step dir or None) for a model/ dir, a step dir or a checkpoints root (latest)."""
    from megatron_entcov.run.checkpoint import resolve_model_dir

    return resolve_model_dir(path, field="--ckpt")


def _model_config_candidates(model_dir: Path, step_dir: Path | None, model_config: str | Path | None) -> list[Path]:
    candidates = [Path(model_config)] if model_config else []
    for base in filter(None, (step_dir, model_dir)):
        candidates.append(base / MODEL_CONFIG_FILE)
    if step_dir is not None:
        candidates.append(step_dir.parent.parent / "resolved_config.yaml")  # <run>/checkpoints/step_x
    return candidates


def load_checkpoint_model_config(model_dir: Path, step_dir: Path | None, *, model_config: str | Path | None = None,
                                 hf_config_dir: str | Path | None = None) -> ModelConfig:
    """The ModelConfig of a checkpoint: ``model_config`` (a YAML with a ``model:`` section), else
    model_config.yaml of the step, else the run's resolved_config.yaml, else ``hf_config_dir``'s config.json."""
    candidates = _model_config_candidates(model_dir, step_dir, model_config)
    for file in candidates:
        if file.is_file():
            data = yaml.safe_load(file.read_text()) or {}
            if not isinstance(data.get("model"), dict):
                raise ValueError(f"{str(file)!r} has no 'model' section")
            logger.info("convert: model config from %s", file)
            return ModelConfig(**data["model"])
    if hf_config_dir is not None:
        return load_hf_model_config(hf_config_dir)
    raise ValueError(f"no model config for {str(model_dir)!r}: looked for {[str(c) for c in candidates]}; "
                     "pass --model-config or --hf-config-dir")


class _DistCheckpointReader:
    """Reads any box of a tensor from a Megatron torch_dist checkpoint, without a process group or a model.

    Megatron writes torch.distributed.checkpoint files; their metadata lists every saved chunk (one per
    layer and TP shard), so one layer of a stacked [L, ...] tensor is read alone.
    """

    def __init__(self, directory: Path):
        from torch.distributed.checkpoint import FileSystemReader

        from megatron_entcov.run.checkpoint import check_dist_checkpoint

        try:
            meta = json.loads((directory / "metadata.json").read_text())
        except ValueError as exc:
            raise ValueError(f"{str(directory / 'metadata.json')!r} is not JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("sharded_backend") != "torch_dist":
            backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
            raise ValueError(f"{str(directory)!r}: sharded_backend={backend!r}; only "
                             "'torch_dist' (Megatron's default) is supported")
        # The metadata as the safety check unpickled it (an allow-list): never DCP's read_metadata(), a plain
        # pickle.load that would run whatever a crafted .metadata holds.
        self.metadata = check_dist_checkpoint(directory)
        self.reader = FileSystemReader(str(directory))
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.directory = directory

    def keys(self) -> set[str]:
        return set(self.metadata.state_dict_metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        md = self.metadata.state_dict_metadata[key]
        full = tuple(md.size)
        start = (layer,) + (0,) * (len(full) - 1) if layer is not None else (0,) * len(full)
        sizes = (1,) + full[1:] if layer is not None else full
        out = torch.empty(sizes, dtype=md.properties.dtype)
        items, covered = [], 0
        for chunk in md.chunks:
            lo = [max(s, c) for s, c in zip(start, chunk.offsets)]
            hi = [min(s + n, c + m) for s, n, c, m in zip(start, sizes, chunk.offsets, chunk.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            lengths = torch.Size(h - low for low, h in zip(lo, hi))
            items.append(ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(key, start),
                                  dest_offsets=torch.Size(low - s for low, s in zip(lo, start)),
                                  storage_index=MetadataIndex(key, tuple(chunk.offsets)),
                                  storage_offsets=torch.Size(low - c for low, c in zip(lo, chunk.offsets)),
                                  lengths=lengths))
            covered += lengths.numel()
        if covered != out.numel():
            raise ValueError(f"checkpoint {str(self.directory)!r} is incomplete: tensor {key!r}"
                             f"{'' if layer is None else f' layer {layer}'} has {covered} of {out.numel()} values")
        self.reader.read_data(LoadPlan(items), _ReadInto(out)).wait()
        return out[0] if layer is not None else out


class _ReadInto:
    """The two LoadPlanner methods FileSystemReader.read_data calls: where each read chunk lands."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item) -> torch.Tensor:
        view = self.out
        for dim, (off, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, off, length)
        return view

    def commit_tensor(self, item, tensor) -> None:
        pass


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r} is invalid: use e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


class _ShardedSafetensorsWriter:
    """Writes tensors into safetensors files of at most ``max_bytes`` each (a larger tensor gets its own)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.directory / f"shard-{len(self.files):05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.directory / "shard-00000.tmp", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _tensor_order(cfg: ModelConfig, experts: bool = False) -> list:
    """(rule, layer) of every Megatron tensor in checkpoint order (embedding, layers, final norm, head); with
    ``experts``, (rule, layer, expert) with one entry per expert."""
    rules = active_rules(cfg)
    order = [(r, None, None) for r in rules if r.megatron.startswith("embedding.")]
    for layer in range(cfg.num_layers):
        slots = layer_slots(cfg, layer)
        order += [(r, layer, e) for r, e in slots] if experts else [(r, layer, None) for r, e in slots if e in (None, 0)]
    order += [(r, None, None) for r in rules if not r.per_layer and not r.megatron.startswith("embedding.")]
    return order if experts else [(r, layer) for r, layer, _ in order]


def _check_megatron_checkpoint(reader: _DistCheckpointReader, cfg: ModelConfig) -> int:
    """Every tensor the config needs is in the checkpoint with its shape; returns the padded vocabulary."""
    keys = reader.keys()
    wanted = {checkpoint_location(rule, cfg, layer, 0)[0]: rule for rule, layer in _tensor_order(cfg)}
    for key, rule in wanted.items():
        if key not in keys:
            raise ValueError(f"missing tensor {key!r} in the Megatron checkpoint {str(reader.directory)!r}"
                             + (" (the model config says tie_word_embeddings=false)" if rule.when == "untied" else ""))
    padded = reader.shape(EMBEDDING_RULE.ckpt_key)[0]
    if padded < cfg.vocab_size:
        raise ValueError(f"shape mismatch: the checkpoint's vocabulary has {padded} rows < vocab_size={cfg.vocab_size}")
    for key, rule in wanted.items():
        expected = checkpoint_shape(rule, cfg, padded)
        got = reader.shape(key)
        if got != expected:
            raise ValueError(f"shape mismatch for {key!r}: the checkpoint has {got}, the model config "
                             f"implies {expected}")
    if cfg.tie_word_embeddings and "output_layer.weight" in keys:
        logger.warning("convert: the checkpoint has output_layer.weight but the model config ties embeddings; ignored")
    return padded


def convert_megatron_to_hf(ckpt: str | Path, out: str | Path, *, dtype: str | None = None,
                           max_shard_size: str | int = "5GB", hf_config_dir: str | Path | None = None,
                           model_config: str | Path | None = None, force: bool = False,
                           progress: bool = True) -> Path:
    """Convert a Megatron dist checkpoint (any layout) to a Hugging Face directory at ``out``; returns ``out``.

    ``ckpt`` is a model/ dist checkpoint dir, a step dir or a checkpoints root (its latest complete step).
    config.json and tokenizer files come from ``hf_config_dir``, else from the hf/ copy the import stored
    in the step dir, else config.json is generated from the ModelConfig. ``dtype`` None keeps the
    checkpoint's dtype. Not collective: call it on one process. Raises ValueError for an unsupported
    architecture, a missing tensor, a shape mismatch, an ``out`` that is, contains or lies inside an input
    (``ckpt``, ``hf_config_dir`` or the hf/ copy used, the model config file read; even with ``force``) or an
    output directory that already holds a checkpoint (unless ``force``); NoSpaceLeft (an OSError, errno
    ENOSPC) when the filesystem of ``out`` is too small, up front or during the write. A failed write leaves
    ``out`` as it was.
    """
    model_dir, step_dir = resolve_megatron_checkpoint(ckpt)
    out = Path(out)
    config_file = next((f for f in _model_config_candidates(model_dir, step_dir, model_config) if f.is_file()), None)
    explicit_hf_config = hf_config_dir is not None
    if hf_config_dir is None and step_dir is not None and (step_dir / "hf" / "config.json").is_file():
        hf_config_dir = step_dir / "hf"
    inputs = [("--ckpt", ckpt), ("dist checkpoint of --ckpt", model_dir),
              ("--hf-config-dir" if explicit_hf_config else "hf/ config copy of --ckpt", hf_config_dir),
              ("--model-config", model_config),
              ("model config of --ckpt", config_file if config_file is not None and model_config is None else None)]
    check_output(out, force, inputs=inputs)
    cfg = load_checkpoint_model_config(model_dir, step_dir, model_config=model_config,
                                       hf_config_dir=hf_config_dir if explicit_hf_config else None)
    if hf_config_dir is not None:
        hf_cfg = load_hf_model_config(hf_config_dir)
        keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "add_qkv_bias", "tie_word_embeddings", "qk_layernorm", "num_experts",
                "moe_ffn_hidden_size", "moe_layer_freq", "moe_dense_layers")
        diff = {k: (getattr(hf_cfg, k), getattr(cfg, k)) for k in keys if getattr(hf_cfg, k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"--hf-config-dir {str(hf_config_dir)!r} describes another model: (hf, checkpoint) = {diff}")
    reader = _DistCheckpointReader(model_dir)
    _check_megatron_checkpoint(reader, cfg)
    out_dtype = torch_dtype(dtype) if dtype else reader.dtype(EMBEDDING_RULE.ckpt_key)
    max_bytes = _parse_size(max_shard_size)
    needed = sum(math.prod(shape) for shape in expected_hf_shapes(cfg).values()) * out_dtype.itemsize
    check_free_space(out, needed)

    dtype_name = str(out_dtype).removeprefix("torch.")
    # Written into .NAME.tmp, renamed to out once complete; removed on any failure (out stays as it was).
    with writing_output(out, needed=needed) as tmp:
        writer = _ShardedSafetensorsWriter(tmp, max_bytes)
        order = _tensor_order(cfg, experts=True)
        for rule, layer, expert in iter_progress(order, len(order), "megatron -> hf", progress):
            full = reader.read(*checkpoint_location(rule, cfg, layer, expert))
            for name, tensor in zip(rule.hf_names(layer, expert), to_hf(rule, full, cfg)):
                writer.add(name, tensor.to(out_dtype))
        writer.finish()
        if hf_config_dir is not None:
            copy_hf_side_files(Path(hf_config_dir), tmp, config=True)
            raw = json.loads((tmp / "config.json").read_text())
            raw.pop("torch_dtype", None)
            raw["dtype"] = dtype_name
            (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        else:
            to_hf_config(cfg, torch_dtype=dtype_name).save_pretrained(tmp)
    logger.info("convert: wrote %s (%s, %d files)", out, dtype_name, len(writer.files))
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main_megatron_to_hf(argv: list[str] | None = None) -> int:
    """``megatron-entcov convert megatron-to-hf``: returns the exit code (2 on a bad input)."""
    parser = converter_parser("megatron-to-hf", "Megatron dist checkpoint (any tp/pp) -> Hugging Face safetensors",
                              out_help="output Hugging Face directory")
    parser.add_argument("--ckpt", required=True, help="model/ dist checkpoint, step dir, or checkpoints root")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--hf-config-dir", default=None, help="copy config.json and tokenizer files from here")
    parser.add_argument("--model-config", default=None, help="YAML with a model: section, if the checkpoint has none")
    args = parser.parse_args(argv)
    return run_converter(lambda: convert_megatron_to_hf(
        args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
        hf_config_dir=args.hf_config_dir, model_config=args.model_config, force=args.force))
