"""checkpoint.py without a process group: resolve_model_dir's three spellings of a checkpoint and its error;
pruning that keeps the step just saved and other runs' checkpoints; partial and set-aside steps never found;
RNG files that load with weights_only=True (old ones too); crafted RNG, DCP .metadata and byte-item files that
run no code through our loads; truncated and missing files named."""

import os

import pytest

from megatron_entcov.run.checkpoint import resolve_model_dir


def _step(root, name):
    step = root / name
    (step / "model").mkdir(parents=True)
    (step / "model" / "metadata.json").write_text("{}")
    (step / "COMPLETE").write_text("")
    return step


def test_model_dir_step_dir_and_root(tmp_path):
    _step(tmp_path, "step_000001")
    newest = _step(tmp_path, "step_000002")
    (tmp_path / "latest").write_text("step_000002")
    assert resolve_model_dir(newest / "model") == (newest / "model", newest)
    assert resolve_model_dir(newest) == (newest / "model", newest)
    assert resolve_model_dir(tmp_path) == (newest / "model", newest)


def test_not_a_checkpoint_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint.load '.*' is not a Megatron checkpoint"):
        resolve_model_dir(tmp_path, field="checkpoint.load")
    (tmp_path / "step_000003.tmp" / "model").mkdir(parents=True)  # a partial save is never picked
    with pytest.raises(ValueError, match="is not a Megatron checkpoint"):
        resolve_model_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Pruning, step listing, RNG files and the safety check: no process group (world size 1).
import json
import logging
import pickle
import random
from types import SimpleNamespace

import numpy as np
import torch

from megatron_entcov.run.checkpoint import (
    Checkpointer,
    CheckpointError,
    _load_rng_file,
    _rng_state,
    _set_rng_state,
    check_dist_checkpoint,
    find_latest,
    list_complete_steps,
)

# DCP in one process (no_dist) warns that it assumes a single process: that is the intent here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

PS = SimpleNamespace(is_rank0=True, rank=0, world_size=1, tp_size=1, pp_size=1, dp_size=1, device=torch.device("cpu"),
                     layout={"tp": 1, "pp": 1, "dp": 1})  # ParallelState.layout of one process (cp 1: not recorded)


def _marked(root, name, run_id):
    step = root / name
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"run_id": run_id, "step": int(name.split("_")[1].split(".")[0])})
                                   if run_id else "")
    return step


def test_prune_keeps_the_step_just_saved_and_never_touches_another_runs_checkpoints(tmp_path):
    """The issue: a second run saved step 3 into a directory holding steps 100 and 150 of an earlier run; prune
    sorted all steps, kept 100/150 and deleted step 3. Now it deletes only this run's older steps."""
    for name in ("step_000100", "step_000150"):
        _marked(tmp_path, name, "old-run")
    _marked(tmp_path, "step_000090", None)                # written before run ids: never pruned
    for name in ("step_000001", "step_000002", "step_000003"):
        _marked(tmp_path, name, "new-run")
    Checkpointer(tmp_path, PS, keep_last=2, run_id="new-run")._prune(3)
    assert [p.name for _, p in list_complete_steps(tmp_path)] == [
        "step_000002", "step_000003", "step_000090", "step_000100", "step_000150"]
    Checkpointer(tmp_path, PS, keep_last=1, run_id="new-run")._prune(2)  # a newer step of the run is left too
    assert [s for s, _ in list_complete_steps(tmp_path)] == [2, 3, 90, 100, 150]


def test_partial_and_set_aside_steps_are_never_listed_or_found(tmp_path):
    _marked(tmp_path, "step_000001", "r")
    _marked(tmp_path, "step_000002.unloadable", "r")     # moved aside after a failed load
    _marked(tmp_path, "step_000003.tmp", "r")            # a save in progress
    (tmp_path / "latest").write_text("step_000002.unloadable")
    assert [p.name for _, p in list_complete_steps(tmp_path)] == ["step_000001"]
    assert find_latest(tmp_path).name == "step_000001"


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_file_loads_with_weights_only_and_restores_every_stream(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()              # cached Gaussians are part of the state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    torch.load(tmp_path / "rng.pt", weights_only=True)  # tensors, ints, floats, strings only
    _set_rng_state(_load_rng_file(tmp_path / "rng.pt"))
    assert _draws() == expected


def test_rng_file_of_older_checkpoints_still_restores(tmp_path):
    """Before format 2 the file held random.getstate() and np.random.get_state() tuples (numpy arrays)."""
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": None, "tracker": None}, tmp_path / "rng.pt")
    expected = _draws()
    _set_rng_state(_load_rng_file(tmp_path / "rng.pt"))
    assert _draws() == expected


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_crafted_rng_file_runs_no_code(tmp_path, caplog):
    marker = tmp_path / "pwned"
    evil = tmp_path / "step_000001" / "rng" / "rank_00000.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"python": _CreatesFile(marker), "numpy": None, "torch": torch.get_rng_state()}, evil)
    torch.load(evil, weights_only=False)["python"].close()  # the file is really malicious: a plain load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError, match="io.open"):
        _load_rng_file(evil)
    ckpt = Checkpointer(tmp_path, PS, run_id="r")
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="megatron_entcov.run.checkpoint"):
        ckpt._restore_rng(evil.parent.parent, {"layout": {"tp": 1, "pp": 1, "dp": 1}})
    assert not marker.exists()
    assert torch.equal(torch.get_rng_state(), before)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "rank_00000.pt' does not load with weights_only=True" in message and "GLOBAL io.open" in message
    assert "\n" not in message and "layout changed" not in message


def _dist_checkpoint(directory, extra_state):
    """A torch DCP directory as Megatron writes it: a tensor, one byte item (an ``_extra_state`` object, which
    DCP stores pickled), common.pt and metadata.json."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"weight": torch.arange(4.0), "layer._extra_state": extra_state}, checkpoint_id=str(directory),
             no_dist=True)
    torch.save({}, directory / "common.pt")
    (directory / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')


def test_the_safety_check_passes_a_normal_dist_checkpoint_and_returns_its_metadata(tmp_path):
    """The metadata the check unpickled is what the readers use (the converter never calls read_metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    _dist_checkpoint(tmp_path, [None])
    metadata = check_dist_checkpoint(tmp_path)
    assert tuple(metadata.state_dict_metadata["weight"].size) == (4,)
    assert metadata.storage_data.keys() == FileSystemReader(str(tmp_path)).read_metadata().storage_data.keys()


def test_crafted_dcp_metadata_and_byte_items_run_no_code(tmp_path):
    """torch DCP unpickles .metadata and byte items without restriction; the check refuses both first."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    evil_bytes = tmp_path / "evil_bytes"
    _dist_checkpoint(evil_bytes, _CreatesFile(marker))
    assert not marker.exists()
    loaded = {"weight": torch.zeros(4), "layer._extra_state": None}
    dcp.load(loaded, checkpoint_id=str(evil_bytes), no_dist=True)
    assert marker.exists(), "DCP itself should run the byte item's code (the threat this check is for)"
    loaded["layer._extra_state"].close()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"byte item 'layer._extra_state' .* does not load with weights_only"):
        check_dist_checkpoint(evil_bytes)
    assert not marker.exists()

    evil_meta = tmp_path / "evil_meta"
    _dist_checkpoint(evil_meta, [None])
    (evil_meta / ".metadata").write_bytes(pickle.dumps(_CreatesFile(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata' is not a safe DCP metadata file .*io.open"):
        check_dist_checkpoint(evil_meta)
    assert not marker.exists()


def test_a_truncated_or_missing_file_is_named(tmp_path):
    _dist_checkpoint(tmp_path, [None])
    shard = next(tmp_path.glob("*.distcp"))
    os.truncate(shard, 10)
    with pytest.raises(CheckpointError, match=rf"shard '.*{shard.name}' is truncated: 10 bytes"):
        check_dist_checkpoint(tmp_path)
    (tmp_path / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=r"common.pt' is missing"):
        check_dist_checkpoint(tmp_path)


def test_a_lagging_latest_pointer_does_not_hide_a_newer_complete_step(tmp_path):
    # A process killed between renaming step 2 into place and moving `latest` leaves the pointer at step 1.
    _marked(tmp_path, "step_000001", "r")
    _marked(tmp_path, "step_000002", "r")
    (tmp_path / "latest").write_text("step_000001")
    assert find_latest(tmp_path).name == "step_000002"
