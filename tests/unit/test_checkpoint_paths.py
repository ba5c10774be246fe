"""checkpoint.resolve_model_dir: the three accepted spellings of a checkpoint and the error for anything else."""

import pytest

from megatron_entcov.checkpoint import resolve_model_dir


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
