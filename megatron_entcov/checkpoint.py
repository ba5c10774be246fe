"""Checkpoints: Megatron dist checkpoint of the model (and optimizer) plus trainer state, written atomically.

Layout of a run's checkpoint root::

    checkpoints/
      latest                  text file naming the newest *complete* checkpoint (moved last, atomically)
      step_000010/
        model/                Megatron dist checkpoint (sharded tensors, layout-independent)
        optimizer/            optional: optimizer state as a dist checkpoint (resharded like the model)
        trainer_state.json    step, data cursor, weight version, scheduler state, entropy-law points, ...
        rng/rank_00000.pt     per-rank RNG states (bit-for-bit resume on the same layout)
        COMPLETE              marker written last inside the directory

A checkpoint is written under ``step_000010.tmp`` and renamed when every rank has finished; ``latest`` is
replaced only after the rename. A process killed at any point leaves either the previous checkpoint as
``latest`` or the new one complete: :func:`find_latest` never returns a partial directory.

Example:
    ckpt = Checkpointer(run_dir / "checkpoints", ps, keep_last=2)
    ckpt.save(step, chunks, optimizer=opt, trainer_state={"step": step, ...})
    path = ckpt.find_latest()
    state = ckpt.load(path, chunks, optimizer=opt)        # returns trainer_state, restores RNG
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_entcov.parallel import ParallelState

logger = logging.getLogger(__name__)

__all__ = ["Checkpointer", "model_sharded_state_dict", "save_model", "load_model", "find_latest",
           "resolve_model_dir"]

_STEP_FMT = "step_{:06d}"


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """One sharded state dict over all model chunks. Sharded tensor keys are global (layer numbers with
    pipeline offsets, full TP shapes), so a checkpoint loads into any tp/pp/vpp layout."""
    from megatron_entcov.policy.model import unwrap_model

    if len(chunks) == 1:
        return unwrap_model(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Save the model as a Megatron dist checkpoint into an existing empty ``directory`` (collective)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))


def load_model(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Load a model dist checkpoint saved under any tp/pp layout into ``chunks`` (collective).

    Raises ValueError when the directory holds no dist checkpoint or its tensors do not fit the model.
    """
    from megatron.core import dist_checkpointing
    from megatron_entcov.policy.model import unwrap_model

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise ValueError(f"checkpoint directory {str(directory)!r} holds no Megatron dist checkpoint "
                         "(metadata.json missing); pass a step directory's model/ folder")
    sharded = model_sharded_state_dict(chunks)
    try:
        state = dist_checkpointing.load(sharded, str(directory), strict="raise_all")
    except Exception as exc:  # megatron raises CheckpointingException and others with useful text
        raise ValueError(f"cannot load {str(directory)!r} into this model: {exc}") from exc
    if len(chunks) == 1:
        unwrap_model(chunks[0]).load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            unwrap_model(c).load_state_dict(state[f"model{i}"], strict=True)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (per ``latest``, checked for COMPLETE), or None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "COMPLETE").is_file():
            return path
        logger.warning("checkpoint: %s names %s, which is not complete; scanning", pointer, path)
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "COMPLETE").is_file()
                      and not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


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


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": _tracker_states(),
    }


def _tracker_states():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    return tracker.get_states() if tracker is not None and tracker.is_initialized() else None


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None and mrandom._CUDA_RNG_STATE_TRACKER is not None:
        mrandom._CUDA_RNG_STATE_TRACKER.set_states(state["tracker"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Saves and loads complete checkpoints under one root; see the module docstring for the layout.

    Every method is collective: call it on all ranks.
    """

    def __init__(self, root: str | Path, ps: "ParallelState", *, keep_last: int = 2):
        self.root = Path(root)
        self.ps = ps
        self.keep_last = keep_last

    def save(self, step: int, chunks, *, optimizer=None, trainer_state: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` atomically and move ``latest`` to it. Returns the final directory."""
        from megatron.core import dist_checkpointing

        final = self.root / _STEP_FMT.format(step)
        tmp = self.root / (final.name + ".tmp")
        if self.ps.is_rank0:
            if tmp.exists():  # left by a run killed mid-save
                shutil.rmtree(tmp)
            for sub in ("rng", "model", "optimizer"):
                (tmp / sub).mkdir(parents=True)
        _barrier()
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp / "model"))
        if optimizer is not None:
            dist_checkpointing.save(optimizer.sharded_state_dict(model_sharded_state_dict(chunks)),
                                    str(tmp / "optimizer"))
        torch.save(_rng_state(), tmp / "rng" / f"rank_{self.ps.rank:05d}.pt")
        _barrier()
        if self.ps.is_rank0:
            meta = dict(trainer_state or {})
            meta["world_size"] = self.ps.world_size
            meta["layout"] = {"tp": self.ps.tp_size, "pp": self.ps.pp_size, "dp": self.ps.dp_size}
            _write_atomic(tmp / "trainer_state.json", json.dumps(meta, indent=1, sort_keys=True))
            _write_atomic(tmp / "COMPLETE", "")
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", final.name)
            self._prune()
        _barrier()
        logger.info("checkpoint: saved %s", final)
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def find_latest(self) -> Path | None:
        return find_latest(self.root)

    def load(self, path: str | Path, chunks, *, optimizer=None, restore_rng: bool = True) -> dict:
        """Load model (+ optimizer) from a complete checkpoint directory; returns its trainer state.

        RNG states are restored only when the layout (world size, tp, pp) matches the saving run.
        """
        from megatron.core import dist_checkpointing

        path = Path(path)
        if not (path / "COMPLETE").is_file():
            raise ValueError(f"checkpoint {str(path)!r} is not complete (no COMPLETE marker); "
                             f"use find_latest() or pass a complete step directory")
        load_model(chunks, path / "model")
        meta = json.loads((path / "trainer_state.json").read_text())
        if optimizer is not None:
            if not (path / "optimizer" / "metadata.json").is_file():
                raise ValueError(f"checkpoint {str(path)!r} has no optimizer state; load it without one")
            sd = optimizer.sharded_state_dict(model_sharded_state_dict(chunks), is_loading=True)
            optimizer.load_state_dict(dist_checkpointing.load(sd, str(path / "optimizer")))
        same_layout = meta.get("layout") == {"tp": self.ps.tp_size, "pp": self.ps.pp_size, "dp": self.ps.dp_size}
        rng_file = path / "rng" / f"rank_{self.ps.rank:05d}.pt"
        if restore_rng and same_layout and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        elif restore_rng:
            logger.warning("checkpoint: layout changed (%s -> tp=%d pp=%d dp=%d); RNG streams restart from "
                           "the seed", meta.get("layout"), self.ps.tp_size, self.ps.pp_size, self.ps.dp_size)
        _barrier()
        logger.info("checkpoint: loaded %s (step %s)", path, meta.get("step"))
        return meta
