"""The classes a dist checkpoint's ``.metadata`` pickle may reference (run/checkpoint.py metadata_globals).

Before the fix the allow-list was a hand list written from torch 2.13's DCP classes: a torch whose DCP pickles
another of its own metadata classes (one of the planner's, or a new enum) had its own checkpoints refused at
``--resume``. Now the list is derived from the installed torch's DCP modules (their dataclasses and enums) plus
a fixed few; anything that runs code on unpickling stays out.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from megatron_entcov.run.checkpoint import CheckpointError, check_dist_checkpoint, metadata_globals

OLD_HAND_LIST = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
}
"""The list as written from torch 2.13 (kept here to check nothing it allowed is lost)."""


def _save(directory: Path) -> None:
    """A DCP checkpoint written by the installed torch, with the files Megatron adds beside it."""
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(6.0, dtype=torch.bfloat16).reshape(2, 3), "steps": torch.tensor([3], dtype=torch.int64),
             "mask": torch.ones(2, dtype=torch.bool), "layer._extra_state": {"note": "x"}}
    dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save({}, directory / "common.pt")
    (directory / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')


def _globals_in(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a pickle references (one the installed torch just wrote, so loading it is safe)."""
    found = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    Recording(io.BytesIO(data)).load()
    return found


def test_a_checkpoint_the_installed_torch_writes_passes(tmp_path):
    _save(tmp_path)
    raw = (tmp_path / ".metadata").read_bytes()
    referenced = {g for g in _globals_in(raw) if not (g[0] == "torch" and isinstance(getattr(torch, g[1]), torch.dtype))}
    assert referenced and referenced <= metadata_globals()
    metadata = check_dist_checkpoint(tmp_path)
    assert tuple(metadata.state_dict_metadata["w"].size) == (2, 3)
    assert metadata.state_dict_metadata["w"].properties.dtype == torch.bfloat16


def test_other_dcp_metadata_classes_of_the_installed_torch_pass(tmp_path):
    """A planner may store its own DCP objects in Metadata.planner_data: the planner's load plan and read items,
    the filesystem's prefix and serialization format; the hand list refused them."""
    from torch.distributed.checkpoint import filesystem, planner
    from torch.distributed.checkpoint.metadata import MetadataIndex

    _save(tmp_path)
    metadata = check_dist_checkpoint(tmp_path)
    item = planner.ReadItem(type=planner.LoadItemType.TENSOR, dest_index=MetadataIndex("w"),
                            dest_offsets=torch.Size([0, 0]), storage_index=MetadataIndex("w"),
                            storage_offsets=torch.Size([0, 0]), lengths=torch.Size([2, 3]))
    metadata.planner_data = {"plan": planner.LoadPlan([item]), "prefix": filesystem._StoragePrefix("__0_"),
                             "format": list(filesystem.SerializationFormat)}
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))

    again = check_dist_checkpoint(tmp_path)
    assert again.planner_data["plan"].items == [item]
    assert again.planner_data["format"] == list(filesystem.SerializationFormat)


class _Runs:
    """Unpickles as a call of ``func`` with ``args``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, name", [(os.system, "system"), (builtins.eval, "builtins.eval")])
def test_a_metadata_pickle_that_would_run_code_is_refused(tmp_path, func, name):
    _save(tmp_path)
    marker = tmp_path / "ran"
    code = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w')"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Runs(func, code)))
    with pytest.raises(CheckpointError, match=rf"\.metadata' is not a safe DCP metadata file .*{name}, which is "
                                              "not a DCP metadata class"):
        check_dist_checkpoint(tmp_path)
    assert not marker.exists()


def test_the_derived_list_keeps_every_class_of_the_hand_list_and_holds_only_data_classes():
    import dataclasses
    import enum
    import importlib

    derived = metadata_globals()
    existing = {(m, n) for m, n in OLD_HAND_LIST if hasattr(importlib.import_module(m), n)}
    assert existing <= derived
    for module, name in derived:
        obj = getattr(importlib.import_module(module), name)
        if module.startswith("torch.distributed.checkpoint."):
            assert dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum), (module, name)
        else:
            assert (module, name) in OLD_HAND_LIST or (obj.__module__, obj.__qualname__) in derived, (module, name)
