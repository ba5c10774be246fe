"""The converters' output rules (megatron_entcov/weights/convert_output.py), on plain files: --out is never an
input, a failed write leaves --out as it was and no .NAME.tmp behind, a full disk is named, stale temporary
folders do not break the next run. The converters themselves: tests/distributed/test_convert_faults.py."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from megatron_entcov.weights import convert_output as co
from megatron_entcov.weights.convert_output import (
    NoSpaceLeft,
    check_free_space,
    check_output,
    finish_output,
    prepare_tmp,
    run_converter,
    writing_output,
)


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under root (the link itself, not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
    return out


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    return path


# --------------------------------------------------------------------------------------------------
# --out against the inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "contains", "link_to_input", "via_linked_parent"])
def test_out_overlapping_an_input_is_refused_even_with_force(tmp_path, where):
    hf = _model_dir(tmp_path / "models" / "qwen")
    (tmp_path / "models_link").symlink_to(tmp_path / "models")
    out = {"same": hf, "inside": hf / "mcore", "contains": tmp_path / "models",
           "link_to_input": tmp_path / "link", "via_linked_parent": tmp_path / "models_link" / "qwen"}[where]
    if where == "link_to_input":
        out.symlink_to(hf)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        check_output(out, True, inputs=[("--hf-dir", hf)])
    msg = str(info.value)
    assert str(out) in msg and str(hf) in msg and "--hf-dir" in msg, msg
    assert "choose another --out" in msg and "even with --force" in msg, msg
    assert {"same": " is the input", "inside": " is inside ", "contains": " contains ", "link_to_input": " is the input",
            "via_linked_parent": " is the input"}[where] in msg, msg
    if where in ("link_to_input", "via_linked_parent"):
        assert f"real path {str(hf)!r}" in msg, msg
    assert _snapshot(tmp_path) == before


def test_out_containing_the_real_file_behind_a_linked_input_is_refused(tmp_path):
    """A Hugging Face cache snapshot links every file to ../../blobs/: --out blobs would remove the weights."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc123").write_bytes(b"weights")
    snap = tmp_path / "hub" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blobs / "abc123")
    with pytest.raises(ValueError, match=r"contains the input --hf-dir entry 'model.safetensors'"):
        check_output(blobs, True, inputs=[("--hf-dir", snap)])
    assert (blobs / "abc123").read_bytes() == b"weights"


def test_temporary_sibling_that_is_an_input_is_refused(tmp_path):
    """Writing --out X first removes a stale .X.tmp: an input there must stop the run instead."""
    src = _model_dir(tmp_path / ".out.tmp")
    with pytest.raises(ValueError, match=r"temporary folder .*\.out\.tmp.* which is the input --ckpt"):
        check_output(tmp_path / "out", False, inputs=[("--ckpt", src)])
    assert (src / "config.json").is_file()


def test_siblings_and_prefixes_are_not_inputs(tmp_path):
    """Path components, not string prefixes: 'qwen_mcore' is not inside 'qwen'; a file input only forbids
    --out equal to it or containing it, so an output next to a --model-config YAML is fine."""
    hf = _model_dir(tmp_path / "qwen")
    cfg = tmp_path / "variant.yaml"
    cfg.write_text("model: {}\n")
    check_output(tmp_path / "qwen_mcore", False, inputs=[("--hf-dir", hf), ("--model-config", cfg), ("none", None)])
    with pytest.raises(ValueError, match="contains the input --model-config"):
        check_output(tmp_path, True, inputs=[("--model-config", cfg)])


def test_existing_output_rules_unchanged(tmp_path):
    out = _model_dir(tmp_path / "out")
    with pytest.raises(ValueError, match="already holds a checkpoint; pass --force"):
        check_output(out, False)
    check_output(out, True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no checkpoint; refusing"):
        check_output(other, True)


def _checkpoint_root(root: Path, *steps: str) -> Path:
    """A checkpoint root as the converter and the trainer write it: ``latest`` and complete step directories."""
    for step in steps:
        (root / step / "model").mkdir(parents=True)
        (root / step / "model" / "metadata.json").write_text("{}")
        (root / step / "COMPLETE").write_text("")
    (root / "latest").write_text(steps[-1])
    return root


@pytest.mark.parametrize("where", ["step", "older_step", "inside_step", "inside_model", "inside_root", "new_step",
                                   "set_aside_step", "root_of_root"])
def test_out_in_another_checkpoint_is_refused_even_with_force(tmp_path, where):
    """Replacing a step of a checkpoint root (or writing anything inside a root or a step) breaks that
    checkpoint: a step replaced by a nested root no longer loads. Refused, naming --out and the checkpoint."""
    root = _checkpoint_root(tmp_path / "ckpts", "step_000001", "step_000002")
    out = {"step": root / "step_000002", "older_step": root / "step_000001", "inside_step": root / "step_000002" / "hf",
           "inside_model": root / "step_000002" / "model" / "x", "inside_root": root / "export",
           "new_step": root / "step_000003", "set_aside_step": root / "step_000002.unloadable",
           "root_of_root": root / "step_000002" / "ckpts"}[where]
    before = _snapshot(root)
    with pytest.raises(ValueError, match="checkpoint root") as err:
        check_output(out, True)
    assert f"--out {str(out)!r}" in str(err.value) and str(root) in str(err.value), err.value
    assert "\n" not in str(err.value) and "choose an --out outside any checkpoint" in str(err.value)
    assert _snapshot(root) == before


def test_a_checkpoint_root_itself_and_its_neighbours_may_be_replaced(tmp_path):
    """--out that is a whole checkpoint root is replaced with --force (as before); a sibling is no checkpoint's."""
    root = _checkpoint_root(tmp_path / "ckpts", "step_000000")
    check_output(root, True)
    check_output(tmp_path / "step_000001", True)          # a step-like name outside any root
    check_output(tmp_path / "ckpts_export", True)


def test_unwritable_out_is_named_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Creating .NAME.tmp fails (read-only file system): NotWritable naming --out and the path; exit code 2."""
    out = tmp_path / "out"

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(Path, "mkdir", read_only)

    def convert():
        with writing_output(out):
            raise AssertionError("nothing is written")

    with pytest.raises(co.NotWritable, match="cannot write --out") as err:
        convert()
    assert err.value.errno == errno.EROFS and str(tmp_path / ".out.tmp") in str(err.value)
    assert run_converter(convert) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: cannot write --out {str(out)!r}: Read-only file system") and "\n" not in line


# --------------------------------------------------------------------------------------------------
# Writing aside, failures, full disks
# --------------------------------------------------------------------------------------------------


def test_success_replaces_the_previous_output(tmp_path):
    out = _model_dir(tmp_path / "out")
    with writing_output(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert (out / "model.safetensors").read_bytes() == b"new" and not (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Opaque(RuntimeError):
    pass


class _WrappedFailures(BaseException):
    """Like torch's CheckpointException: a BaseException with per-rank (exception, traceback) failures."""

    def __init__(self, failures):
        super().__init__("write", failures)
        self.failures = failures


@pytest.mark.parametrize("failure", ["enospc", "enospc_chained", "wrapped", "safetensors_text", "opaque_full",
                                     "opaque_room", "value_error", "interrupt"])
def test_failed_write_leaves_out_and_no_tmp(tmp_path, monkeypatch, failure):
    out = _model_dir(tmp_path / "out")
    before = _snapshot(out)
    if failure == "opaque_full":  # torch.save on a full disk: 'unexpected pos 704 vs 598', no errno
        monkeypatch.setattr(co, "free_bytes", lambda path: 4096)
    else:
        monkeypatch.setattr(co, "free_bytes", lambda path: 10 << 30)

    def fail(tmp):
        (tmp / "half.safetensors").write_bytes(b"x" * 100)
        enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp / "half.safetensors"))
        if failure == "enospc":
            raise enospc
        if failure == "enospc_chained":
            raise RuntimeError("save failed") from enospc
        if failure == "wrapped":
            raise _WrappedFailures({0: (RuntimeError("Worker failure"), None), 1: (enospc, None)})
        if failure == "safetensors_text":
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        if failure in ("opaque_full", "opaque_room"):
            raise _Opaque("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        if failure == "value_error":
            raise ValueError("bad input")
        raise KeyboardInterrupt

    expected = {"opaque_room": _Opaque, "value_error": ValueError, "interrupt": KeyboardInterrupt}.get(failure,
                                                                                                    NoSpaceLeft)
    with pytest.raises(expected) as info:
        with writing_output(out, needed=123_000) as tmp:
            fail(tmp)
    assert _snapshot(out) == before, "the previous output changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary folder was left behind"
    if expected is NoSpaceLeft:
        msg = str(info.value)
        assert "no space left" in msg and str(out) in msg and "choose another --out" in msg, msg
        assert "existing checkpoint at --out is unchanged" in msg and "123.0 kB" in msg, msg
        assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)


def test_no_space_up_front(tmp_path, monkeypatch):
    out = _model_dir(tmp_path / "out")
    monkeypatch.setattr(co, "free_bytes", lambda path: 1_000)
    with pytest.raises(NoSpaceLeft) as info:
        check_free_space(out, 2_500_000)
    msg = str(info.value)
    assert "no space left" in msg and str(out) in msg and "2.5 MB" in msg and "1.0 kB free" in msg, msg
    assert "both must fit" in msg and "choose another --out" in msg, msg
    check_free_space(out, 999)


def test_stale_temporary_folders_are_removed_with_an_info_line(tmp_path, caplog):
    """A crash leaves .out.tmp (a folder, a file, or a link: the link is removed, never its target)."""
    caplog.set_level(logging.INFO, logger=co.__name__)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    for stale in ("folder", "file", "link"):
        tmp = tmp_path / ".out.tmp"
        if stale == "folder":
            tmp.mkdir()
            (tmp / "shard-00000.tmp").write_bytes(b"partial")
        elif stale == "file":
            tmp.write_bytes(b"partial")
        else:
            tmp.symlink_to(keep)
        caplog.clear()
        assert prepare_tmp(tmp_path / "out") == tmp and tmp.is_dir() and not tmp.is_symlink()
        assert not any(tmp.iterdir())
        assert any("left by an earlier conversion" in r.getMessage() for r in caplog.records), stale
        tmp.rmdir()
    assert (keep / "precious").read_text() == "x"


def test_finish_output_puts_the_previous_output_back_when_the_rename_fails(tmp_path, monkeypatch):
    out = _model_dir(tmp_path / "out")
    before = _snapshot(out)
    (tmp_path / ".out.old").mkdir()  # stale, from a run killed between the two renames
    tmp = prepare_tmp(out)
    (tmp / "model.safetensors").write_bytes(b"new")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == tmp:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(co.os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        finish_output(tmp, out)
    assert _snapshot(out) == before and not (tmp_path / ".out.old").exists()


def test_run_converter_reports_a_full_disk_with_exit_code_2(tmp_path, capsys):
    def convert():
        raise NoSpaceLeft(f"no space left for --out {str(tmp_path)!r}: ...; choose another --out", tmp_path)

    assert run_converter(convert) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left") and str(tmp_path) in err
