"""Checkpoint conversion Hugging Face <-> Megatron dist checkpoint, and HF-named weights for rollout engines.

The key map is declarative (:mod:`megatron_entcov.convert_map`); this module does the I/O around it:

- :func:`convert_hf_to_megatron`: Hugging Face safetensors -> a checkpoint root (``latest``,
  ``step_000000/{model/, model_config.yaml, hf/, trainer_state.json, COMPLETE}``) that
  ``checkpoint.load`` / :class:`~megatron_entcov.checkpoint.Checkpointer` accept. The model is built at tp=1,
  pp=1 on the ``meta`` device, allocated without initialisation and filled tensor by tensor from the
  safetensors files, then saved as a Megatron dist checkpoint. A dist checkpoint is layout-free (global
  keys, layers stacked, TP shards as offsets), so it loads at any tp/pp; ``--tp`` only fixes the vocabulary
  padding (``ModelConfig.padded_vocab_size(tp)``) and is checked against the head/layer counts with ``--pp``.
  Peak host memory: one copy of the model plus a few copies of the largest tensor (docs/conversion.md).
- :func:`convert_megatron_to_hf`: any Megatron dist checkpoint (saved at any layout) -> safetensors shards of
  bounded size, index, config.json, tokenizer files. Streams one layer at a time straight from the
  checkpoint files (torch.distributed.checkpoint's reader, no process group, no model): peak memory is about
  two output shards plus a few copies of the largest tensor, whatever the model size.
- :func:`load_hf_weights`: Hugging Face weights into this rank's shards of a built model (any tp/pp/vpp).
- :func:`iter_hf_weights`: this model's weights as (hf_name, full tensor) buckets, gathered over tp and pp,
  for weight sync to rollout engines.

Example:
    convert_hf_to_megatron("/models/Qwen2.5-7B", "/ckpts/qwen7b", tp=4, pp=1)
    convert_megatron_to_hf("/ckpts/qwen7b", "/models/qwen7b-rl", dtype="bfloat16")
    for bucket in iter_hf_weights(chunks, cfg.model, ps, bucket_bytes=1 << 30):   # every tp x pp rank
        send(bucket)                                    # [(hf_name, full tensor), ...]

Command line (``tools/convert_*.py`` and ``megatron-entcov convert ...`` call the ``main_*`` functions):
    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen2.5-7B --out /ckpts/qwen7b --tp 4 --pp 1
    python tools/convert_megatron_to_hf.py --ckpt /ckpts/qwen7b --out /models/qwen7b-rl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import yaml

from megatron_entcov.config import ModelConfig, ParallelConfig
from megatron_entcov.convert_map import (RULES, WeightRule, active_rules, expected_hf_shapes, match_megatron_name,
                                         megatron_shape, tp_shard, tp_unshard, to_hf, to_megatron)
from megatron_entcov.hf_config import SUPPORTED_ARCHITECTURES, model_fields_from_hf, to_hf_config

if TYPE_CHECKING:
    from megatron_entcov.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = [
    "HFCheckpoint", "load_hf_model_config", "check_hf_checkpoint", "load_hf_weights", "iter_hf_weights", "convert_hf_to_megatron",
    "convert_megatron_to_hf", "resolve_megatron_checkpoint", "load_checkpoint_model_config",
    "main_hf_to_megatron", "main_megatron_to_hf",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
_STEP_DIR = "step_000000"
_MODEL_CONFIG_FILE = "model_config.yaml"


def _dtype_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = _DTYPE_ALIASES.get(str(name), str(name)).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported: choose one of {', '.join(_DTYPES)}")
    return name


def _progress(iterable, total: int, desc: str, enabled: bool = True):
    """tqdm when installed, else a log line every ~10%."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(total // 10, 1)
        for i, item in enumerate(iterable):
            if i % step == 0:
                logger.info("%s: %d/%d", desc, i, total)
            yield item
        return
    yield from tqdm(iterable, total=total, desc=desc, unit="tensor", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Hugging Face side
# --------------------------------------------------------------------------------------------------


class HFCheckpoint:
    """Lazy reader of a Hugging Face safetensors checkpoint (one file, or shards with an index).

    Shapes and dtypes come from the file headers; :meth:`get` reads one tensor at a time.
    """

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
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
        from safetensors import safe_open

        if self._headers is None:
            self._headers = {}
            for file in sorted(set(self.weight_map.values())):
                path = self.dir / file
                if not path.is_file():
                    continue  # reported by _path() for the tensors that are needed
                with safe_open(path, framework="pt") as f:
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
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ValueError(f"missing tensor {name!r} in the Hugging Face checkpoint {str(self.dir)!r}")
        with safe_open(self._path(name), framework="pt") as f:
            return f.get_tensor(name)


def load_hf_model_config(hf_dir: str | Path, *, dtype: str | None = None,
                         make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig of a Hugging Face directory; ValueError for an unsupported architecture.

    ``dtype`` None keeps the checkpoint's dtype (config.json ``dtype``/``torch_dtype``, else float32).
    """
    hf_dir = Path(hf_dir)
    cfg_file = hf_dir / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"--hf-dir {str(hf_dir)!r} has no config.json")
    raw = json.loads(cfg_file.read_text())
    archs = raw.get("architectures") or []
    if not (set(archs) & set(SUPPORTED_ARCHITECTURES) or raw.get("model_type") in SUPPORTED_ARCHITECTURES.values()):
        raise ValueError(f"unsupported architecture {archs or raw.get('model_type')!r} in {str(cfg_file)!r}: "
                         f"supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    if raw.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true in {str(cfg_file)!r} is not supported (Megatron attends to the "
                         "whole context)")
    from transformers import AutoConfig

    fields = model_fields_from_hf(AutoConfig.from_pretrained(hf_dir))
    source = raw.get("dtype") or raw.get("torch_dtype")
    params_dtype = _dtype_name(dtype) or (source if source in _DTYPES else "float32")
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


def _check_layout(cfg: ModelConfig, tp: int, pp: int) -> None:
    for name, value in (("--tp", tp), ("--pp", pp)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    for field in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(cfg, field) % tp:
            raise ValueError(f"--tp={tp} must divide {field}={getattr(cfg, field)}")
    if cfg.num_layers % pp:
        raise ValueError(f"--pp={pp} must divide num_layers={cfg.num_layers}")


# --------------------------------------------------------------------------------------------------
# Megatron model side: HF weights into a built model, HF-named weights out of it
# --------------------------------------------------------------------------------------------------


def _local_entries(chunks, cfg: ModelConfig, *, skip_tied_output: bool):
    """(rule, global layer or None, param) for every parameter of this rank's chunks."""
    from megatron_entcov.model import unwrap_model

    entries = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            match = match_megatron_name(name)
            if match is None:
                raise ValueError(f"no Hugging Face mapping for Megatron parameter {name!r}")
            rule, local = match
            if rule.megatron == "output_layer.weight" and cfg.tie_word_embeddings and skip_tied_output:
                continue  # the last stage's copy of the tied embedding (pp > 1)
            # Layer indices in names are local to the chunk; layer_number (1-based) is global.
            layer = model.decoder.layers[local].layer_number - 1 if rule.per_layer else None
            entries.append((rule, layer, param))
    return entries


def _embedding_rule() -> WeightRule:
    return RULES[0]


@torch.no_grad()
def load_hf_weights(chunks, model_cfg: ModelConfig, hf: HFCheckpoint | str | Path, ps: "ParallelState", *,
                    progress: bool = False) -> None:
    """Copy Hugging Face weights into this rank's model shards (any tp/pp/vpp layout; not collective).

    Each Hugging Face tensor is read whole, combined (fused QKV, [gate; up], vocab padding) and sliced for
    this tp rank. Raises ValueError for a missing tensor or a shape mismatch.
    """
    hf = hf if isinstance(hf, HFCheckpoint) else HFCheckpoint(hf)
    entries = _local_entries(chunks, model_cfg, skip_tied_output=False)
    for rule, layer, param in _progress(entries, len(entries), "hf -> megatron", progress):
        names = rule.hf_names(layer)
        if rule.megatron == "output_layer.weight" and model_cfg.tie_word_embeddings:
            names = _embedding_rule().hf_names()
        padded = param.shape[0] * ps.tp_size if rule.kind == "vocab" else 0
        full = to_megatron(rule, [hf.get(n) for n in names], model_cfg, padded)
        shard = tp_shard(rule, full, ps.tp_rank, ps.tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch for {rule.megatron_name(layer)!r} from {names}: got {tuple(shard.shape)} "
                             f"for tp rank {ps.tp_rank}, the model has {tuple(param.shape)}")
        param.copy_(shard)


def _gather_tp(rule: WeightRule, local: torch.Tensor, ps: "ParallelState") -> torch.Tensor:
    if rule.tp_dim is None or ps.tp_size == 1:
        return local
    import torch.distributed as dist

    shards = [torch.empty_like(local) for _ in range(ps.tp_size)]
    dist.all_gather(shards, local.contiguous(), group=ps.tp_group)
    return tp_unshard(rule, shards)


@torch.no_grad()
def iter_hf_weights(chunks, model_cfg: ModelConfig, ps: "ParallelState", *, bucket_bytes: int = 1 << 30,
                    dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This model's weights under Hugging Face names, as full tensors, in buckets of at most ``bucket_bytes``.

    Collective over the model-parallel group: call it on every rank of a tp x pp replica (each data-parallel
    replica runs independently). Every rank receives every tensor: TP shards are all-gathered within the tp
    group, then each pipeline stage broadcasts its layers (global layer numbers) over the pp group, stage by
    stage. Memory is bounded by one bucket plus one tensor. Tensors are on the parameters' device in their
    dtype (or ``dtype``), vocabulary padding stripped; they may alias the parameters: do not modify them.
    A tensor larger than ``bucket_bytes`` comes alone in its bucket. Tied embeddings yield no lm_head.weight.

    Yields:
        lists of (hf_name, tensor), in checkpoint order within each pipeline stage.
    """
    import torch.distributed as dist

    local = _local_entries(chunks, model_cfg, skip_tied_output=True)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for stage in range(ps.pp_size):
        src = dist.get_global_rank(ps.pp_group, stage) if ps.pp_size > 1 else None
        mine = ps.pp_rank == stage
        if mine:
            meta = []
            for rule, layer, param in local:
                shape = list(param.shape)
                if rule.tp_dim is not None:
                    shape[rule.tp_dim] *= ps.tp_size
                meta.append((RULES.index(rule), layer, tuple(shape), str(param.dtype).removeprefix("torch.")))
        if ps.pp_size > 1:
            box = [meta if mine else None]
            dist.broadcast_object_list(box, src=src, group=ps.pp_group)
            meta = box[0]
        for i, (rule_index, layer, shape, dtype_name) in enumerate(meta):
            rule = RULES[rule_index]
            if mine:
                full = _gather_tp(rule, local[i][2].detach(), ps)
            else:
                full = torch.empty(shape, dtype=getattr(torch, dtype_name), device=ps.device)
            if ps.pp_size > 1:
                full = full.contiguous()
                dist.broadcast(full, src=src, group=ps.pp_group)
            for name, tensor in zip(rule.hf_names(layer), to_hf(rule, full, model_cfg)):
                if dtype is not None:
                    tensor = tensor.to(dtype)
                nbytes = tensor.numel() * tensor.element_size()
                if bucket and size + nbytes > bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append((name, tensor))
                size += nbytes
    if bucket:
        yield bucket


# --------------------------------------------------------------------------------------------------
# Output directories: never overwrite silently; write to a temporary sibling and rename
# --------------------------------------------------------------------------------------------------


def _holds_checkpoint(path: Path) -> bool:
    markers = ("config.json", "model.safetensors", "model.safetensors.index.json", "latest", "metadata.json",
               "COMPLETE", "model")
    return any((path / m).exists() for m in markers) or any(path.glob("*.safetensors")) or any(path.glob("step_*"))


def _check_output(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not _holds_checkpoint(out):
        raise ValueError(f"--out {str(out)!r} is a non-empty directory that holds no checkpoint; refusing to "
                         "replace it (even with --force): choose a new or empty directory")
    if not force:
        raise ValueError(f"--out {str(out)!r} already holds a checkpoint; pass --force to replace it")


def _tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def _finish_output(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _copy_hf_side_files(src: Path, dst: Path, *, config: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES + (("config.json",) if config else ()):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------------------------------------------------
# HF -> Megatron
# --------------------------------------------------------------------------------------------------


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                           dtype: str | None = None, make_vocab_size_divisible_by: int = 128,
                           force: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face directory into a Megatron checkpoint root at ``out``; returns ``out``.

    The dist checkpoint is written at tp=1, pp=1 and loads at any layout whose padded vocabulary equals
    ``ModelConfig.padded_vocab_size(tp)`` (always the case for tp' dividing ``tp`` when the vocabulary is
    already a multiple of ``make_vocab_size_divisible_by * tp``; Megatron loads vocabulary tensors with
    ``allow_shape_mismatch``, so other paddings load too). Runs in one process; when torch.distributed is
    already initialised it is collective: every rank builds the whole model, the write is shared, and
    Megatron's parallel state is left at tp=1, pp=1 (call ``init_parallel`` again afterwards).
    Raises ValueError for an unsupported architecture, a missing tensor, a shape mismatch, a bad layout or
    an output directory that already holds a checkpoint (unless ``force``).
    """
    import torch.distributed as dist

    from megatron_entcov.checkpoint import save_model
    from megatron_entcov.model import build_model
    from megatron_entcov.parallel import destroy_parallel, init_parallel

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = load_hf_model_config(hf_dir, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    _check_layout(cfg, tp, pp)
    hf = HFCheckpoint(hf_dir)
    check_hf_checkpoint(hf, cfg)
    _check_output(out, force)

    own_group = not dist.is_initialized()
    parallel = ParallelConfig(backend="gloo")
    ps = init_parallel(parallel, seed=0)
    try:
        padded = cfg.padded_vocab_size(tp)
        # The local spec (checkpoint keys are the same for both specs); padding fixed for the target tp.
        build_cfg = dataclasses.replace(cfg, transformer_impl="local",
                                        make_vocab_size_divisible_by=make_vocab_size_divisible_by * tp)
        # Built on the meta device, then allocated without initialisation: no random init of a 32B model,
        # and at most one copy of it in memory.
        with torch.device("meta"):
            chunks = build_model(build_cfg, parallel, dataclasses.replace(ps, device=torch.device("meta")))
        chunks = [c.to_empty(device="cpu") for c in chunks]
        load_hf_weights(chunks, build_cfg, hf, ps, progress=progress and ps.is_rank0)
        tmp = _tmp_dir(out)
        step = tmp / _STEP_DIR
        if ps.is_rank0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (step / "model").mkdir(parents=True)
        if dist.get_world_size() > 1:
            dist.barrier()
        save_model(chunks, step / "model")
        del chunks
        if ps.is_rank0:
            info = {"source": str(hf_dir), "tp": tp, "pp": pp, "padded_vocab_size": padded}
            (step / _MODEL_CONFIG_FILE).write_text(
                "# ModelConfig of this checkpoint (written by megatron_entcov.convert)\n"
                + yaml.safe_dump({"model": dataclasses.asdict(cfg), "conversion": info}, sort_keys=False))
            _copy_hf_side_files(hf_dir, step / "hf", config=True)
            (step / "trainer_state.json").write_text(json.dumps({"step": 0, "converted_from": str(hf_dir)}, indent=1))
            (step / "COMPLETE").write_text("")
            (tmp / "latest").write_text(_STEP_DIR)
            _finish_output(tmp, out)
            logger.info("convert: wrote %s (%d layers, vocab %d padded to %d for tp=%d, %s)", out, cfg.num_layers,
                        cfg.vocab_size, padded, tp, cfg.params_dtype)
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        if own_group:
            destroy_parallel()
    return out


# --------------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------------


def resolve_megatron_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(dist checkpoint dir, step dir or None) for a model/ dir, a step dir or a checkpoints root (latest)."""
    from megatron_entcov.checkpoint import resolve_model_dir

    return resolve_model_dir(path, field="--ckpt")


def load_checkpoint_model_config(model_dir: Path, step_dir: Path | None, *, model_config: str | Path | None = None,
                                 hf_config_dir: str | Path | None = None) -> ModelConfig:
    """The ModelConfig of a checkpoint: ``model_config`` (a YAML with a ``model:`` section), else
    model_config.yaml of the step, else the run's resolved_config.yaml, else ``hf_config_dir``'s config.json."""
    candidates = [Path(model_config)] if model_config else []
    for base in filter(None, (step_dir, model_dir)):
        candidates.append(base / _MODEL_CONFIG_FILE)
    if step_dir is not None:
        candidates.append(step_dir.parent.parent / "resolved_config.yaml")  # <run>/checkpoints/step_x
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

        meta = json.loads((directory / "metadata.json").read_text())
        if meta.get("sharded_backend") != "torch_dist":
            raise ValueError(f"{str(directory)!r}: sharded_backend={meta.get('sharded_backend')!r}; only "
                             "'torch_dist' (Megatron's default) is supported")
        self.reader = FileSystemReader(str(directory))
        self.metadata = self.reader.read_metadata()
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


def _check_megatron_checkpoint(reader: _DistCheckpointReader, cfg: ModelConfig) -> int:
    """Every tensor the config needs is in the checkpoint with its shape; returns the padded vocabulary."""
    keys = reader.keys()
    for rule in active_rules(cfg):
        if rule.ckpt_key not in keys:
            raise ValueError(f"missing tensor {rule.ckpt_key!r} in the Megatron checkpoint {str(reader.directory)!r}"
                             + (" (the model config says tie_word_embeddings=false)" if rule.when == "untied" else ""))
    padded = reader.shape(_embedding_rule().ckpt_key)[0]
    if padded < cfg.vocab_size:
        raise ValueError(f"shape mismatch: the checkpoint's vocabulary has {padded} rows < vocab_size={cfg.vocab_size}")
    for rule in active_rules(cfg):
        expected = megatron_shape(rule, cfg, padded)
        if rule.per_layer:
            expected = (cfg.num_layers,) + expected
        got = reader.shape(rule.ckpt_key)
        if got != expected:
            raise ValueError(f"shape mismatch for {rule.ckpt_key!r}: the checkpoint has {got}, the model config "
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
    architecture, a missing tensor, a shape mismatch or an output directory that already holds a checkpoint.
    """
    model_dir, step_dir = resolve_megatron_checkpoint(ckpt)
    out = Path(out)
    cfg = load_checkpoint_model_config(model_dir, step_dir, model_config=model_config, hf_config_dir=hf_config_dir)
    if hf_config_dir is None and step_dir is not None and (step_dir / "hf" / "config.json").is_file():
        hf_config_dir = step_dir / "hf"
    if hf_config_dir is not None:
        hf_cfg = load_hf_model_config(hf_config_dir)
        keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "add_qkv_bias", "tie_word_embeddings")
        diff = {k: (getattr(hf_cfg, k), getattr(cfg, k)) for k in keys if getattr(hf_cfg, k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"--hf-config-dir {str(hf_config_dir)!r} describes another model: (hf, checkpoint) = {diff}")
    reader = _DistCheckpointReader(model_dir)
    _check_megatron_checkpoint(reader, cfg)
    out_dtype = _DTYPES[_dtype_name(dtype)] if dtype else reader.dtype(_embedding_rule().ckpt_key)
    max_bytes = _parse_size(max_shard_size)
    _check_output(out, force)

    tmp = _tmp_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writer = _ShardedSafetensorsWriter(tmp, max_bytes)
    rules = active_rules(cfg)
    order = [(r, None) for r in rules if r.megatron.startswith("embedding.")]
    order += [(r, layer) for layer in range(cfg.num_layers) for r in rules if r.per_layer]
    order += [(r, None) for r in rules if not r.per_layer and not r.megatron.startswith("embedding.")]
    for rule, layer in _progress(order, len(order), "megatron -> hf", progress):
        full = reader.read(rule.ckpt_key, layer)
        for name, tensor in zip(rule.hf_names(layer), to_hf(rule, full, cfg)):
            writer.add(name, tensor.to(out_dtype))
    writer.finish()

    dtype_name = str(out_dtype).removeprefix("torch.")
    if hf_config_dir is not None:
        _copy_hf_side_files(Path(hf_config_dir), tmp, config=True)
        raw = json.loads((tmp / "config.json").read_text())
        raw.pop("torch_dtype", None)
        raw["dtype"] = dtype_name
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    else:
        to_hf_config(cfg, torch_dtype=dtype_name).save_pretrained(tmp)
    _finish_output(tmp, out)
    logger.info("convert: wrote %s (%s, %d files)", out, dtype_name, len(writer.files))
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main_hf_to_megatron(argv: list[str] | None = None) -> int:
    """``megatron-entcov convert hf-to-megatron``: returns the exit code (2 on a bad input)."""
    parser = argparse.ArgumentParser(prog="megatron-entcov convert hf-to-megatron",
                                     description="Hugging Face (Qwen2/Qwen2.5, Llama) -> Megatron dist checkpoint")
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json, safetensors)")
    parser.add_argument("--out", required=True, help="output checkpoint root (latest, step_000000/model/ ...)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train at (vocab padding)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train at (checked only)")
    parser.add_argument("--dtype", default=None, help="float32|bfloat16|float16; default: the checkpoint's")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                               make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main_megatron_to_hf(argv: list[str] | None = None) -> int:
    """``megatron-entcov convert megatron-to-hf``: returns the exit code (2 on a bad input)."""
    parser = argparse.ArgumentParser(prog="megatron-entcov convert megatron-to-hf",
                                     description="Megatron dist checkpoint (any tp/pp) -> Hugging Face safetensors")
    parser.add_argument("--ckpt", required=True, help="model/ dist checkpoint, step dir, or checkpoints root")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    parser.add_argument("--dtype", default=None, help="float32|bfloat16|float16; default: the checkpoint's")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--hf-config-dir", default=None, help="copy config.json and tokenizer files from here")
    parser.add_argument("--model-config", default=None, help="YAML with a model: section, if the checkpoint has none")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        convert_megatron_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               hf_config_dir=args.hf_config_dir, model_config=args.model_config, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
