"""Checkpoints: Megatron dist checkpoint of the model (and optimizer) plus trainer state, written atomically,
loaded safely, with a fall-back to the previous step when the newest one is damaged.

``checkpoints/latest`` names the newest complete ``step_000010/``. A save writes ``step_000010.tmp``, renames it
when every rank has finished and replaces ``latest`` last; a failed save raises :class:`CheckpointError` and
leaves the previous checkpoint untouched. Loads are collective; :meth:`Checkpointer.load_latest` falls back past
damaged steps and stops with :class:`CheckpointMismatch` (naming the settings) at an intact step saved under
other settings. Every reader of a dist checkpoint (loads, the converter) gets its metadata from
:func:`check_dist_checkpoint`, which refuses any pickled object beyond DCP's own before DCP opens a file.

Example:
    ckpt = Checkpointer(run_dir / "checkpoints", ps, keep_last=2, run_id=run.run_id)
    ckpt.save(step, chunks, optimizer=opt, trainer_state={"step": step, ...})
    loaded = ckpt.load_latest(chunks, optimizer=opt)       # (path, trainer_state) or None; restores RNG
    state = ckpt.load(path, chunks, optimizer=opt)          # one given step; CheckpointError if it cannot load

Design notes (layout, failure and trust rules): docs/design/run.md
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_entcov.distributed import collectives
from megatron_entcov.run.disk import nearest_existing_dir, no_space_in

if TYPE_CHECKING:
    from megatron_entcov.distributed.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatch", "model_sharded_state_dict",
           "optimizer_sharded_state_dict", "save_model", "load_model", "find_latest", "list_complete_steps",
           "resolve_model_dir", "check_dist_checkpoint"]

_STEP_FMT = "step_{:06d}"
_STEP_RE = re.compile(r"^step_(\d+)$")
_RNG_FORMAT = 2
_MSG_BYTES = 2048            # longest error text shared between ranks


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the path, the cause and the fix.
    A ValueError, so the command line prints it as one line (exit code 2)."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that does not fit this run's settings (model shapes, optimizer): nothing to fall back
    from or set aside; the message names the settings and the ways on."""


def _checkpoint_exception_type() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a failed save or load raises: DCP's CheckpointException derives from BaseException, not Exception."""
    return (Exception, _checkpoint_exception_type())


def _describe(exc: BaseException, limit: int = 400) -> str:
    """One line for an exception: DCP's per-rank failures (its str() is every rank's whole traceback) or the
    first line of the message, with the errno name of any OSError in the chain."""
    if isinstance(exc, _checkpoint_exception_type()):
        return _by_rank([(r, _describe(e, limit)) for r, (e, _) in sorted(exc._failures.items())], None)[:limit]
    full = str(exc).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|\. Please use|$)", full, re.S)
    if unpickler:  # torch's text is a paragraph of advice to load with weights_only=False: keep the reason
        text = "weights-only unpickling refused: " + " ".join(unpickler.group(1).split())
    else:
        text = full.splitlines()[0] if full else ""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"no such file {exc.filename}"
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and len(out) < limit:
        out += f" (from {_describe(cause, limit - len(out))})"
    return out[:limit]


def _by_rank(errors: list[tuple[int, str]], world: int | None) -> str:
    """Per-rank error texts as one line: identical texts grouped; no rank prefix when all ``world`` ranks
    report the same."""
    groups: dict[str, list[int]] = {}
    for rank, text in errors:
        groups.setdefault(text, []).append(rank)
    if len(groups) == 1 and world is not None and len(errors) == world:
        return errors[0][1]
    return "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}: {text}"
                     for text, ranks in groups.items())


def _agree(error: str | None, device: torch.device | None = None) -> str | None:
    """Collective over the world: every failing rank's error text (one line, identical texts grouped), or None
    when no rank failed. ``device``: where the collective's buffer lives (default: the process group's)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return error
    rank = dist.get_rank()
    buf = torch.zeros(world, _MSG_BYTES, dtype=torch.int32, device=device or collectives.group_device())
    if error is not None:
        raw = error.encode()[:_MSG_BYTES] or b"?"
        buf[rank, :len(raw)] = torch.tensor(list(raw), dtype=torch.int32, device=buf.device)
    collectives.all_reduce(buf)       # SUM: each row is written by one rank only
    rows = buf.cpu()
    errors = []
    for r in range(world):
        n = int((rows[r] != 0).sum())
        if n:
            errors.append((r, bytes(rows[r, :n].tolist()).decode(errors="replace")))
    return _by_rank(errors, world) if errors else None


def _raise_agreed(error: BaseException | None, device: torch.device | None = None) -> None:
    """Collective: raise on every rank when any rank failed: CheckpointMismatch when a rank's failure was one
    (the checkpoint is intact), else CheckpointError; the message holds every failing rank's text."""
    text = None if error is None else str(error) if isinstance(error, CheckpointError) else _describe(error)
    message = _agree(text, device)
    if message is None:
        return
    mismatch = collectives.reduce_values([float(isinstance(error, CheckpointMismatch))], op="max")[0] > 0
    raise (CheckpointMismatch if mismatch else CheckpointError)(message) from error


# ---------------------------------------------------------------------------------------------------- steps
def list_complete_steps(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete ``step_N`` directory under ``root``, oldest first. Partial
    (``.tmp``) and set-aside (``.unloadable``) directories are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "COMPLETE").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _marker(path: Path) -> dict:
    """The COMPLETE marker's content ({} for the empty markers of checkpoints written before run ids)."""
    try:
        text = (path / "COMPLETE").read_text().strip()
        data = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None. The COMPLETE markers decide, not the ``latest``
    pointer: a process killed between renaming a complete step into place and moving the pointer leaves the
    pointer one step behind, and that newer step is still a valid checkpoint."""
    complete = list_complete_steps(root)
    return complete[-1][1] if complete else None


def resolve_model_dir(path: str | Path, *, field: str = "checkpoint") -> tuple[Path, Path | None]:
    """(dist checkpoint dir, step dir or None) for a model/ dir, a step dir, or a checkpoints root (its
    ``latest`` complete step). ValueError naming ``field`` when ``path`` is none of these."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path, path.parent
    if (path / "model" / "metadata.json").is_file():
        return path / "model", path
    latest = find_latest(path) if path.is_dir() else None
    if latest is not None and (latest / "model" / "metadata.json").is_file():
        return latest / "model", latest
    raise ValueError(f"{field} {str(path)!r} is not a Megatron checkpoint: pass a dist checkpoint (model/) dir, "
                     "a step directory or a checkpoints root with a complete step")


# ---------------------------------------------------------------------------------------------------- safety
# The globals a DCP ``.metadata`` pickle may reference, derived from the installed torch (so a checkpoint it
# writes always loads, whatever its version): the dataclasses and enums defined in DCP's metadata, planner and
# filesystem modules, plus the few non-DCP classes they hold (torch.Size, OrderedDict, paths) and the layout
# helper; dtypes are checked by type. Unpickling any of them only builds the object: no code beyond that runs.
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                         "torch.distributed.checkpoint.filesystem")


@functools.cache
def metadata_globals() -> frozenset[tuple[str, str]]:
    """(module, name) of every global :func:`check_dist_checkpoint` lets a ``.metadata`` pickle reference
    (derived on first use: importing DCP's filesystem module takes a while)."""
    import collections
    import dataclasses
    import enum
    import importlib
    import pathlib

    found = {("torch.serialization", "_get_layout")}
    for cls in (torch.Size, collections.OrderedDict, pathlib.PosixPath, pathlib.PurePosixPath):
        # Where the class lives and where its package exports it (pathlib's classes moved within it in 3.13).
        found |= {(cls.__module__, cls.__qualname__), (cls.__module__.split(".")[0], cls.__qualname__)}
    for module_name in _DCP_METADATA_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and obj.__module__ == module_name
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                found.add((module_name, name))
    return frozenset(found)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in metadata_globals() or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not a DCP metadata class")


def check_dist_checkpoint(directory: str | Path):
    """Check a dist checkpoint directory before torch DCP opens it: its files exist and are long enough, its
    pickled ``.metadata`` and byte items hold only what a checkpoint needs (loaded without running code).
    Returns the DCP ``Metadata`` it unpickled: readers use it instead of DCP's own ``read_metadata()`` (a plain
    ``pickle.load``). Raises CheckpointError naming the file and the problem."""
    directory = Path(directory)
    meta_file = directory / ".metadata"
    for needed in (directory / "metadata.json", meta_file, directory / "common.pt"):
        if not needed.is_file():
            raise CheckpointError(f"{str(needed)!r} is missing: the dist checkpoint {str(directory)!r} is incomplete")
    try:
        with open(meta_file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{str(meta_file)!r} is not a safe DCP metadata file ({exc}); not loaded, as "
                              "unpickling it could run code or fail midway") from exc
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CheckpointError(f"{str(meta_file)!r} holds {type(metadata).__name__}, not DCP Metadata with "
                              "storage data")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        file = directory / info.relative_path
        if info.relative_path not in sizes:
            if not file.is_file() or file.resolve().parent != directory.resolve():
                raise CheckpointError(f"shard {str(file)!r} named by {str(meta_file)!r} is missing")
            sizes[info.relative_path] = file.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(f"shard {str(file)!r} is truncated: {sizes[info.relative_path]} bytes, "
                                  f"{index.fqn!r} needs bytes {info.offset}..{info.offset + info.length}")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if info.transform_descriptors:
                raise CheckpointError(f"byte item {index.fqn!r} in {str(file)!r} is stored with transforms "
                                      f"{info.transform_descriptors}, which this check cannot read")
            with open(file, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            try:
                torch.load(io.BytesIO(raw), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure means DCP's unsafe load must not see it
                raise CheckpointError(f"byte item {index.fqn!r} in {str(file)!r} does not load with "
                                      f"weights_only=True ({_describe(exc, 200)}); not loaded, as DCP unpickles "
                                      "byte items without restriction") from exc
    try:
        torch.load(directory / "common.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{str(directory / 'common.pt')!r} does not load with weights_only=True "
                              f"({_describe(exc, 200)})") from exc
    return metadata


# ---------------------------------------------------------------------------------------------------- model
def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """One sharded state dict over all model chunks. Sharded tensor keys are global (layer numbers with
    pipeline offsets, full TP shapes), so a checkpoint loads into any tp/pp/vpp layout."""
    from megatron_entcov.policy.model import unwrap_model

    if len(chunks) == 1:
        return unwrap_model(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


# The distributed optimizer's state format in a dist checkpoint. Without it, megatron-core 0.16's
# DistributedOptimizer.sharded_state_dict defaults to the deprecated 'fully_sharded_model_space', whose
# ShardedTensors carry a flattened_range that the same version's ShardedTensor refuses at save ("ShardedTensor.
# flattened_range is not supported"). 'dp_reshardable' is Megatron-LM's own default: each rank writes its shard
# without any gather (memory-bounded at any scale); it reshards across data-parallel sizes, not tp/pp (Megatron-LM's
# opt-in 'fully_reshardable' does, by gathering a whole optimizer state per data-parallel group: ~12 bytes per
# parameter of a tp/pp shard, at save and on every rank at load). The other Megatron optimizers ignore this metadata.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _no_optimizer_state(opt, config=None) -> None:
    """The state initialiser of an optimizer without per-parameter state (SGD without momentum, as
    policy/optimizer.py builds it). Megatron leaves SGD's ``init_state_fn`` None and its
    ``sharded_state_dict(is_loading=True)`` calls it: without this, no SGD checkpoint loaded."""


def optimizer_sharded_state_dict(optimizer, chunks: list[torch.nn.Module], *, is_loading: bool = False) -> dict:
    """The optimizer's sharded state dict for a dist checkpoint save (or, with ``is_loading``, a load)."""
    if is_loading:
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            if hasattr(part, "init_state_fn") and part.init_state_fn is None:
                part.init_state_fn = _no_optimizer_state
    return optimizer.sharded_state_dict(model_sharded_state_dict(chunks), is_loading=is_loading,
                                        metadata=dict(_OPTIMIZER_METADATA))


def _optimizer_format(optimizer) -> str:
    """'distributed' (Megatron's distributed optimizer: state in data-parallel shards of buckets) or
    'per_parameter' (the other Megatron optimizers: state keyed like the model's tensors, any layout)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(p, DistributedOptimizer) for p in parts) else "per_parameter"


def _optimizer_kind(optimizer) -> str | None:
    """The ``optim.optimizer`` of a built Megatron optimizer ('adam' or 'sgd'); None when it cannot tell."""
    kinds = {"adam" if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else
             "sgd" if isinstance(inner, torch.optim.SGD) else None
             for inner in (getattr(p, "optimizer", None) for p in getattr(optimizer, "chained_optimizers", [optimizer]))}
    return kinds.pop() if len(kinds) == 1 else None


def _setting(value) -> str:
    """A config value as ``--set`` takes it (booleans in lower case)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _shortened(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _model_settings(shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """The model settings a set of global tensor shapes implies (those it can tell; keys as in the config)."""
    out: dict[str, object] = {}
    norm, emb = shapes.get("decoder.final_layernorm.weight"), shapes.get("embedding.word_embeddings.weight")
    if norm is not None or emb is not None:
        out["model.hidden_size"] = norm[0] if norm is not None else emb[1]
    fc2 = shapes.get("decoder.layers.mlp.linear_fc2.weight")
    if fc2 is not None and len(fc2) == 3:                     # [layers, hidden, ffn]
        out["model.num_layers"], out["model.ffn_hidden_size"] = fc2[0], fc2[2]
    if emb is not None:
        out["model.tie_word_embeddings"] = "output_layer.weight" not in shapes
    if "decoder.layers.self_attention.linear_qkv.weight" in shapes:
        out["model.add_qkv_bias"] = "decoder.layers.self_attention.linear_qkv.bias" in shapes
    return out


def _model_tensor_shapes(chunks: list[torch.nn.Module]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Collective: key -> (global shape, whether its shape may differ: vocabulary padding) of every sharded
    tensor of the model, over all ranks (a pipeline stage holds only its own tensors)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    local = {}
    for value in nested_values(model_sharded_state_dict(chunks)):
        built = value.build() if isinstance(value, ShardedTensorFactory) else value
        for t in nested_values(built) if isinstance(built, (dict, list)) else [built]:
            if isinstance(t, ShardedTensor):
                local[t.key] = (tuple(t.global_shape), bool(t.allow_shape_mismatch))
    world = dist.get_world_size() if dist.is_initialized() else 1
    merged: dict[str, tuple[tuple[int, ...], bool]] = {}
    for part in collectives.all_gather_object([None] * world, local):
        merged.update(part)
    return merged


def _check_model_fits(chunks: list[torch.nn.Module], directory: Path, metadata, ways_on: str | None) -> None:
    """Collective: CheckpointMismatch on every rank when the checkpoint's tensors are not this model's (names,
    global shapes), naming the settings that differ, the tensors (a shortened list) and ``ways_on`` (the fix;
    default: take the checkpoint's settings or another checkpoint)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    model = _model_tensor_shapes(chunks)
    saved = {k: tuple(md.size) for k, md in metadata.state_dict_metadata.items()
             if isinstance(md, TensorStorageMetadata)}
    differ = [f"{k} {saved[k]} in the checkpoint vs {model[k][0]} in this model" for k in sorted(set(saved) & set(model))
              if saved[k] != model[k][0] and not model[k][1]]
    only_model, only_saved = sorted(set(model) - set(saved)), sorted(set(saved) - set(model))
    if not (differ or only_model or only_saved):
        return
    theirs, ours = _model_settings(saved), _model_settings({k: v[0] for k, v in model.items()})
    settings = [k for k in theirs if k in ours and theirs[k] != ours[k]]
    parts = [f"{k}={_setting(theirs[k])} in the checkpoint vs {k}={_setting(ours[k])} in this run" for k in settings]
    parts += [f"tensors of other shapes: {_shortened(differ)}"] if differ else []
    parts += [f"only in this model: {_shortened(only_model)}"] if only_model else []
    parts += [f"only in the checkpoint: {_shortened(only_saved)}"] if only_saved else []
    with_its = (" ".join(f"--set {k}={_setting(theirs[k])}" for k in settings) if settings
                else "the model.* settings it was saved with")
    ways_on = (ways_on or "use the checkpoint's settings ({with_its}), or load a checkpoint of this model"
               ).replace("{with_its}", with_its)
    raise CheckpointMismatch(f"checkpoint {str(directory)!r} holds a model of other settings than this run's "
                             f"({'; '.join(parts)}): {ways_on}")


def _load_optimizer(optimizer, chunks: list[torch.nn.Module], directory: Path) -> None:
    """Load an optimizer dist checkpoint (collective). Under no_grad: with float32 params the distributed
    optimizer's main params are views of the model's leaf Parameters, and its load copies into them in place,
    which autograd refuses otherwise ("a view of a leaf Variable that requires grad is being used in an
    in-place operation"); nothing in a load is meant to be differentiated."""
    from megatron.core import dist_checkpointing

    sd = optimizer_sharded_state_dict(optimizer, chunks, is_loading=True)
    state = dist_checkpointing.load(sd, str(directory))
    with torch.no_grad():
        optimizer.load_state_dict(state)


def _barrier() -> None:
    collectives.barrier()


def save_model(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Save the model as a Megatron dist checkpoint into an existing empty ``directory`` (collective)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))


def load_model(chunks: list[torch.nn.Module], directory: str | Path, *, ways_on: str | None = None) -> None:
    """Load a model dist checkpoint saved under any tp/pp layout into ``chunks`` (collective).

    Raises on every rank CheckpointError (a ValueError) when the directory holds no dist checkpoint, fails the
    safety check (:func:`check_dist_checkpoint`) or cannot be read, and CheckpointMismatch when its tensors are
    not this model's (naming the settings, the tensors and ``ways_on``, the fix to suggest; ``{with_its}`` in
    it becomes the ``--set`` options of the checkpoint's settings).
    """
    from megatron.core import dist_checkpointing

    from megatron_entcov.policy.model import unwrap_model

    directory = Path(directory)
    metadata, error = None, None
    try:
        if not (directory / "metadata.json").is_file():
            raise CheckpointError(f"checkpoint directory {str(directory)!r} holds no Megatron dist checkpoint "
                                  "(metadata.json missing); pass a step directory's model/ folder")
        metadata = check_dist_checkpoint(directory)
    except CheckpointError as exc:
        error = exc
    _raise_agreed(error)
    _check_model_fits(chunks, directory, metadata, ways_on)
    try:
        state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(directory), strict="raise_all")
        if len(chunks) == 1:
            unwrap_model(chunks[0]).load_state_dict(state, strict=True)
        else:
            for i, c in enumerate(chunks):
                unwrap_model(c).load_state_dict(state[f"model{i}"], strict=True)
    except _load_errors() as exc:
        error = CheckpointError(f"cannot load {str(directory)!r} into this model: {_describe(exc, 600)}")
    _raise_agreed(error)


# ---------------------------------------------------------------------------------------------------- RNG
def _rng_state() -> dict:
    """This process's RNG states as tensors, ints and floats only (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "format": _RNG_FORMAT,
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": _tracker_states(),
    }


def _tracker_states():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    return tracker.get_states() if tracker is not None and tracker.is_initialized() else None


def _load_rng_file(path: Path) -> dict:
    """An RNG file with ``weights_only=True``; files written before format 2 hold numpy arrays, which load
    through numpy's array reconstructor only (torch's documented allow-list for numpy)."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype,
               (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError(f"holds {type(state).__name__} without the python/numpy/torch states")
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    if state.get("format") == _RNG_FORMAT:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # before format 2: the tuples of random.getstate() / np.random.get_state()
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None and mrandom._CUDA_RNG_STATE_TRACKER is not None:
        mrandom._CUDA_RNG_STATE_TRACKER.set_states(state["tracker"])


# ---------------------------------------------------------------------------------------------------- files
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Checkpointer:
    """Saves and loads complete checkpoints under one root; see the module docstring for the layout.

    Every method is collective: call it on all ranks.

    Args:
        root: the checkpoints directory of one run.
        ps: this process's parallel state.
        keep_last: complete checkpoints of this run kept after a save (older ones of this run are deleted).
        run_id: the run's id (run_dir.RunDir); recorded in each checkpoint; pruning deletes only checkpoints
            with this id. None: checkpoints without an id (SFT warm starts, tools).
    """

    def __init__(self, root: str | Path, ps: "ParallelState", *, keep_last: int = 2, run_id: str | None = None):
        self.root = Path(root)
        self.ps = ps
        self.keep_last = keep_last
        self.run_id = run_id

    # ------------------------------------------------------------------ agreement
    def _agree(self, error: str | None) -> str | None:
        """Collective over the world: every failing rank's error text, or None (:func:`_agree`)."""
        return _agree(error, self.ps.device)

    # ------------------------------------------------------------------ save
    def save(self, step: int, chunks, *, optimizer=None, trainer_state: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` atomically and move ``latest`` to it. Returns the final directory.

        Raises CheckpointError on every rank when any rank fails (naming a full disk when that is the cause),
        after removing ``step_N.tmp``; the previous checkpoint and ``latest`` are left as they were.
        """
        from megatron.core import dist_checkpointing

        final = self.root / _STEP_FMT.format(step)
        tmp = self.root / (final.name + ".tmp")
        error = None
        if self.ps.is_rank0:
            try:
                self._check_space(step)
                if tmp.exists():  # left by a run killed mid-save
                    shutil.rmtree(tmp)
                for sub in ("rng", "model", "optimizer"):
                    (tmp / sub).mkdir(parents=True)
            except (OSError, CheckpointError) as exc:
                error = exc
        message = self._agree(None if error is None else str(error) if isinstance(error, CheckpointError)
                              else _describe(error))
        if message is not None:  # nothing written yet: the space check refused, or the directory failed
            if self.ps.is_rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            raise CheckpointError(f"checkpoint step {step} not written: {message}") from error
        try:
            dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp / "model"))
            if optimizer is not None:
                dist_checkpointing.save(optimizer_sharded_state_dict(optimizer, chunks), str(tmp / "optimizer"))
            torch.save(_rng_state(), tmp / "rng" / f"rank_{self.ps.rank:05d}.pt")
        except _load_errors() as exc:
            error = exc
        self._agree_saved(step, tmp, error)
        if self.ps.is_rank0:
            try:
                meta = dict(trainer_state or {})
                meta["run_id"] = self.run_id
                meta["world_size"] = self.ps.world_size
                meta["layout"] = self.ps.layout
                if optimizer is not None:
                    meta["optimizer_format"] = _optimizer_format(optimizer)
                    meta["optimizer"] = _optimizer_kind(optimizer)
                _write_atomic(tmp / "trainer_state.json", json.dumps(meta, indent=1, sort_keys=True))
                _write_atomic(tmp / "COMPLETE", json.dumps({"run_id": self.run_id, "step": step}))
                if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except OSError as exc:
                error = exc
        self._agree_saved(step, tmp, error)
        if self.ps.is_rank0:
            try:
                _write_atomic(self.root / "latest", final.name)
            except OSError as exc:  # the step is complete; find_latest() scans when the pointer is stale
                logger.warning("checkpoint: saved %s but could not move %s to it: %s", final, self.root / "latest",
                               _describe(exc))
            self._prune(step)
        _barrier()
        logger.info("checkpoint: saved %s", final)
        return final

    def _agree_saved(self, step: int, tmp: Path, error: BaseException | None) -> None:
        """Collective: when any rank failed a part of the save, fail it on every rank (``_fail_save``)."""
        message = self._agree(None if error is None else _describe(error))
        if message is not None:
            self._fail_save(step, tmp, message, error)

    def _check_space(self, step: int) -> None:
        """Refuse before writing when the disk has less free space than this run's newest checkpoint took (a
        save that runs out of space midway can leave ranks in different collectives)."""
        ours = [p for s, p in list_complete_steps(self.root) if s != step and _marker(p).get("run_id") == self.run_id]
        if not ours:
            return
        need = _tree_bytes(ours[-1])
        free = shutil.disk_usage(nearest_existing_dir(self.root)).free
        if free < need:
            raise CheckpointError(
                f"not enough space in {str(self.root)!r}: {_mib(free)} free, the previous checkpoint "
                f"{ours[-1].name} took {_mib(need)}; free space on that file system or set output_dir to a larger "
                f"one, then resume with --resume ({ours[-1].name} and latest are intact)")

    def _fail_save(self, step: int, tmp: Path, message: str, error: BaseException | None) -> None:
        """Every rank: remove the partial directory (rank 0), then raise CheckpointError naming the cause."""
        full = False
        usage = None
        try:
            usage = shutil.disk_usage(nearest_existing_dir(tmp))
        except OSError:
            pass
        if error is not None:
            full = no_space_in(error)[0]
        full = full or "No space left on device" in message or "ENOSPC" in message or (
            usage is not None and usage.free < max(2**20, usage.total // 1000))
        _barrier()
        if self.ps.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        latest = find_latest(self.root)
        kept = f"latest still names {latest.name}" if latest is not None else "no earlier checkpoint exists"
        if full:
            where = f" ({_mib(usage.free)} free of {_mib(usage.total)})" if usage is not None else ""
            raise CheckpointError(
                f"checkpoint step {step}: no space left on the device holding {str(self.root)!r}{where}; removed "
                f"{tmp.name}, {kept}; free space there or set output_dir to a larger file system, then resume "
                f"with --resume. Cause: {message}") from error
        raise CheckpointError(f"checkpoint step {step}: saving to {str(tmp)!r} failed: {message}; removed {tmp.name}, "
                              f"{kept}") from error

    def _prune(self, saved: int) -> None:
        """Delete this run's complete checkpoints older than the newest ``keep_last`` (the one just saved
        included). Checkpoints of other runs, newer steps, partial and set-aside directories are left."""
        ours = [(s, p) for s, p in list_complete_steps(self.root)
                if s < saved and _marker(p).get("run_id") == self.run_id]
        for _, old in ours[:max(len(ours) - (self.keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def find_latest(self) -> Path | None:
        return find_latest(self.root)

    def load(self, path: str | Path, chunks, *, optimizer=None, restore_rng: bool = True) -> dict:
        """Load model (+ optimizer) from a complete checkpoint directory; returns its trainer state.

        Raises CheckpointError on every rank when any rank cannot load it (a missing or truncated shard, a
        corrupt trainer_state.json, a file that fails the safety check), CheckpointMismatch when it is intact but
        saved under other settings (model shapes, optimizer kind or format), naming them. RNG states are
        restored when the layout (world size, tp, pp) matches the saving run and every rank's RNG file loads;
        otherwise every rank keeps its seeded streams, with a warning saying why.
        """
        path = Path(path)
        meta: dict = {}
        error = None
        try:
            if not (path / "COMPLETE").is_file():
                raise CheckpointError(f"checkpoint {str(path)!r} is not complete (no COMPLETE marker); "
                                      "use find_latest() or pass a complete step directory")
            meta = self._read_trainer_state(path)
            if self.run_id is not None and meta.get("run_id") not in (None, self.run_id):
                raise CheckpointError(f"{str(path)!r} belongs to run {meta['run_id']}, not to this run "
                                      f"{self.run_id}")
            if optimizer is not None and not (path / "optimizer" / "metadata.json").is_file():
                raise CheckpointError(f"checkpoint {str(path)!r} has no optimizer state; load it without one")
            check_dist_checkpoint(path / "model")
            if optimizer is not None:
                self._check_optimizer_fits(path, meta, optimizer, check_dist_checkpoint(path / "optimizer"))
        except CheckpointError as exc:
            error = exc
        _raise_agreed(error, self.ps.device)
        load_model(chunks, path / "model", ways_on="resume with the checkpoint's settings ({with_its}), or start a "
                                                   "new run under another name (--set name=<new name>)")
        if optimizer is not None:
            try:
                _load_optimizer(optimizer, chunks, path / "optimizer")
            except _load_errors() as exc:
                error = CheckpointError(f"cannot load {str(path / 'optimizer')!r}: {_describe(exc, 600)}")
            _raise_agreed(error, self.ps.device)
        if restore_rng:
            self._restore_rng(path, meta)
        _barrier()
        logger.info("checkpoint: loaded %s (step %s)", path, meta.get("step"))
        return meta

    def _check_optimizer_fits(self, path: Path, meta: dict, optimizer, metadata) -> None:
        """CheckpointMismatch naming the way out when the saved optimizer state cannot load into ``optimizer``:
        another optim.optimizer (recorded at save; older checkpoints: Adam's moments found in ``metadata``), the
        other format, or the distributed optimizer's shards of another tp/pp layout. (Checkpoints written before
        the format was recorded hold the per-parameter kind: the distributed one could not save.)"""
        weights_only = (f"or start a new run under another name from its weights alone, with a fresh optimizer "
                        f"state (--set name=<new name> --set checkpoint.load={str(path)!r})")
        saved_kind = meta.get("optimizer") or (
            "adam" if any(".exp_avg" in key for key in metadata.state_dict_metadata) else None)
        current_kind = _optimizer_kind(optimizer)
        if saved_kind and current_kind and saved_kind != current_kind:
            raise CheckpointMismatch(
                f"{str(path)!r} holds the optimizer state of optim.optimizer={saved_kind!r}, this run has "
                f"optim.optimizer={current_kind!r}: resume with --set optim.optimizer={saved_kind}, {weights_only}")
        saved, current = meta.get("optimizer_format", "per_parameter"), _optimizer_format(optimizer)
        flag = {"distributed": "true", "per_parameter": "false"}
        if saved not in flag:
            raise CheckpointError(f"{str(path)!r} holds optimizer state of unknown format {saved!r} (this version "
                                  f"writes {sorted(flag)})")
        if saved != current:
            raise CheckpointMismatch(
                f"{str(path)!r} holds the optimizer state of parallel.use_distributed_optimizer={flag[saved]}, this "
                f"run has use_distributed_optimizer={flag[current]}: resume with "
                f"parallel.use_distributed_optimizer={flag[saved]}, {weights_only}")
        layout = meta.get("layout") or {}
        here = {"tp": self.ps.tp_size, "pp": self.ps.pp_size}
        if current == "distributed" and any(layout.get(k) != v for k, v in here.items()):
            raise CheckpointMismatch(
                f"{str(path)!r} holds distributed-optimizer shards of tp={layout.get('tp')} pp={layout.get('pp')}, "
                f"which load only at that tp and pp (any data-parallel size), not at tp={here['tp']} pp={here['pp']}: "
                f"resume with parallel.tensor_model_parallel_size={layout.get('tp')} and "
                f"parallel.pipeline_model_parallel_size={layout.get('pp')}, {weights_only}")

    @staticmethod
    def _read_trainer_state(path: Path) -> dict:
        file = path / "trainer_state.json"
        try:
            meta = json.loads(file.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{str(file)!r} is missing") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{str(file)!r} is corrupt: {_describe(exc, 200)}") from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"{str(file)!r} holds {type(meta).__name__}, not an object")
        return meta

    def _restore_rng(self, path: Path, meta: dict) -> None:
        layout = self.ps.layout
        if meta.get("layout") != layout:
            if self.ps.is_rank0:
                logger.warning("checkpoint: layout changed (%s -> %s); RNG streams restart from the seed",
                               meta.get("layout"), layout)
            return
        rng_file = path / "rng" / f"rank_{self.ps.rank:05d}.pt"
        state, error = None, None
        if not rng_file.is_file():
            error = f"{str(rng_file)!r} is missing"
        else:
            try:
                state = _load_rng_file(rng_file)
            except Exception as exc:  # noqa: BLE001 - weights_only refusals are UnpicklingError, truncation others
                error = f"{str(rng_file)!r} does not load with weights_only=True ({_describe(exc, 200)})"
        # All or none: ranks whose streams must match (tensor-parallel dropout) stay in step either way.
        message = self._agree(error)
        if message is None:
            _set_rng_state(state)
        elif self.ps.is_rank0:
            logger.warning("checkpoint: RNG states of %s not restored on any rank: %s; RNG streams restart from the "
                           "seed (the run continues, not bit-for-bit)", path.name, message)

    def load_latest(self, chunks, *, optimizer=None) -> tuple[Path, dict] | None:
        """Load the newest complete checkpoint of this run that loads; None when the root holds none.

        A newer step that fails is reported (warning: the step and why), moved aside to ``<step>.unloadable``
        once an older step has loaded, and ``latest`` is pointed at the loaded one. CheckpointError when no
        step loads, listing each step's reason; CheckpointMismatch at once (nothing moved) at an intact step
        saved under other settings than this run's.
        """
        candidates = [p for _, p in reversed(list_complete_steps(self.root))]
        if self.run_id is not None:
            foreign = [p for p in candidates if _marker(p).get("run_id") not in (None, self.run_id)]
            for p in foreign:
                if self.ps.is_rank0:
                    logger.warning("checkpoint: skipping %s: it belongs to run %s, not %s", p, _marker(p)["run_id"],
                                   self.run_id)
            candidates = [p for p in candidates if p not in foreign]
        if not candidates:
            return None
        failures: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                state = self.load(path, chunks, optimizer=optimizer)
            except CheckpointMismatch:
                raise                     # intact, saved under other settings: an older step would not fit either
            except CheckpointError as exc:
                failures.append((path, str(exc)))
                if self.ps.is_rank0:
                    logger.warning("checkpoint: %s does not load, trying the previous step: %s", path.name, exc)
                continue
            if failures:
                self._set_aside(failures, path)
            return path, state
        listing = "; ".join(f"{p.name}: {why}" for p, why in failures)
        raise CheckpointError(f"no checkpoint in {str(self.root)!r} loads ({listing}); fix or remove them, or start "
                              "a new run without --resume (another --set name=...)")

    def _set_aside(self, failures: list[tuple[Path, str]], loaded: Path) -> None:
        if self.ps.is_rank0:
            for path, why in failures:
                aside = path.with_name(path.name + ".unloadable")
                try:
                    if aside.exists():
                        shutil.rmtree(aside)
                    os.replace(path, aside)
                    (aside / "UNLOADABLE.txt").write_text(why + "\n")
                except OSError as exc:
                    logger.warning("checkpoint: could not move %s aside: %s", path, exc)
                    continue
                logger.warning("checkpoint: resumed from %s instead of %s, which did not load; moved it to %s "
                               "(kept for inspection; delete it when done)", loaded.name, path.name, aside)
            _write_atomic(self.root / "latest", loaded.name)
        _barrier()
