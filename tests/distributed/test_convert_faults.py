"""The converters under faults, end to end on a tiny random Qwen2 (CPU, one gloo rank in this process).

- ``--out`` is an input, lies inside one or contains one: exit code 2 with both paths named, even with
  --force, and every input file byte-identical afterwards.
- A full disk: simulated (the writer raises ENOSPC or KeyboardInterrupt) and for real on a 128 KiB tmpfs
  (up front: the free-space check; during the write: with that check switched off, so the write itself
  fails). Exit code 2 and "no space left" naming --out, no .NAME.tmp left, the previous output at --out
  byte-identical.
- A stale .NAME.tmp (folder or file) from a killed run is removed with an info line; the run succeeds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.distributed

DIRECTIONS = ["hf-to-megatron", "megatron-to-hf"]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    import transformers

    from megatron_entcov.weights.to_megatron import convert_hf_to_megatron

    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    tmp = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    hf = tmp / "src" / "qwen_hf"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(hf)
    (hf / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    mcore = tmp / "src" / "qwen_mcore"
    convert_hf_to_megatron(hf, mcore, progress=False)
    yield SimpleNamespace(tmp=tmp, hf=hf, mcore=mcore)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run(direction: str, src, out: Path, *extra: str) -> int:
    from megatron_entcov.weights.to_hf import main_megatron_to_hf
    from megatron_entcov.weights.to_megatron import main_hf_to_megatron

    if direction == "hf-to-megatron":
        return main_hf_to_megatron(["--hf-dir", str(src.hf), "--out", str(out), *extra])
    return main_megatron_to_hf(["--ckpt", str(src.mcore), "--out", str(out), *extra])


def _fake_checkpoint(out: Path) -> None:
    """A small previous output (a checkpoint marker plus 8 KiB) that --force may replace."""
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"previous": true}')
    (out / "model.safetensors").write_bytes(os.urandom(8192))


# --------------------------------------------------------------------------------------------------
# --out is never an input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "contains", "link"])
def test_hf_to_megatron_never_removes_its_input(src, capsys, where):
    out = {"same": src.hf, "inside": src.hf / "mcore", "contains": src.hf.parent, "link": src.tmp / "link"}[where]
    if where == "link":
        out.symlink_to(src.hf)
    before = _snapshot(src.tmp / "src")
    assert _run("hf-to-megatron", src, out, "--force") == 2
    err = capsys.readouterr().err
    assert str(out) in err and f"--hf-dir {str(src.hf)!r}" in err and "choose another --out" in err, err
    assert _snapshot(src.tmp / "src") == before, "an input file changed"


@pytest.mark.parametrize("where", ["same", "inside", "contains", "hf_config_dir", "model_config"])
def test_megatron_to_hf_never_removes_its_inputs(src, capsys, where):
    from megatron_entcov.weights.to_hf import main_megatron_to_hf

    cfg_dir = src.tmp / "cfgs"
    if not cfg_dir.exists():  # a config YAML in a folder that looks like a checkpoint (config.json)
        cfg_dir.mkdir()
        shutil.copy(src.mcore / "step_000000" / "model_config.yaml", cfg_dir / "model.yaml")
        (cfg_dir / "config.json").write_text("{}")
    argv = ["--ckpt", str(src.mcore), "--force"]
    out, label = {"same": (src.mcore, "--ckpt"), "inside": (src.mcore / "step_000000" / "export", "--ckpt"),
                  "contains": (src.tmp / "src", "--ckpt"), "hf_config_dir": (src.hf, "--hf-config-dir"),
                  "model_config": (cfg_dir, "--model-config")}[where]
    if where == "hf_config_dir":
        argv += ["--hf-config-dir", str(src.hf)]
    if where == "model_config":
        argv += ["--model-config", str(cfg_dir / "model.yaml")]
    before = _snapshot(src.tmp / "src"), _snapshot(cfg_dir)
    assert main_megatron_to_hf(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and f"input {label} " in err and "choose another --out" in err, err
    assert (_snapshot(src.tmp / "src"), _snapshot(cfg_dir)) == before, "an input file changed"


# --------------------------------------------------------------------------------------------------
# Failed writes: simulated disk full and Ctrl-C
# --------------------------------------------------------------------------------------------------


def _fail_writes(monkeypatch, direction: str, failure: str) -> None:
    """Make the converter's tensor writer write a partial file, then raise ENOSPC (or KeyboardInterrupt)."""

    def fail(path: Path):
        path.write_bytes(b"\0" * 1000)
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    if direction == "megatron-to-hf":
        monkeypatch.setattr("safetensors.torch.save_file", lambda tensors, filename, metadata=None: fail(Path(filename)))
    else:
        monkeypatch.setattr("megatron_entcov.run.checkpoint.save_model",
                            lambda chunks, directory: fail(Path(directory) / "__0_0.distcp"))


@pytest.mark.parametrize("failure", ["enospc", "interrupt"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_failed_write_keeps_the_previous_output_and_leaves_no_tmp(src, capsys, monkeypatch, direction, failure):
    out = src.tmp / f"prev_{direction}_{failure}" / "out"
    assert _run(direction, src, out) == 0
    before = _snapshot(out)
    _fail_writes(monkeypatch, direction, failure)
    capsys.readouterr()
    if failure == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            _run(direction, src, out, "--force")
    else:
        assert _run(direction, src, out, "--force") == 2
        err = capsys.readouterr().err
        assert "no space left" in err and str(out) in err and "existing checkpoint at --out is unchanged" in err, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "a temporary folder was left behind"
    assert _snapshot(out) == before, "the previous output changed"


# --------------------------------------------------------------------------------------------------
# A real full disk: a 128 KiB tmpfs (the model is ~310 KB)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tinyfs(tmp_path):
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill a disk for real ({exc}); the simulated ENOSPC tests cover it")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill a disk for real (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}; "
                    "the simulated ENOSPC tests cover it")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("when", ["up_front", "during_write"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_real_full_disk(src, tinyfs, capsys, monkeypatch, direction, when):
    from megatron_entcov.weights import to_hf, to_megatron

    out = tinyfs / "out"
    _fake_checkpoint(out)
    before = _snapshot(out)
    if when == "during_write":  # let the write start, so that the filesystem itself runs full
        monkeypatch.setattr(to_hf, "check_free_space", lambda out, needed: None, raising=False)
        monkeypatch.setattr(to_megatron, "check_free_space", lambda out, needed: None, raising=False)
    capsys.readouterr()
    assert _run(direction, src, out, "--force") == 2
    err = capsys.readouterr().err
    assert "no space left" in err and str(out) in err and "choose another --out" in err, err
    if when == "up_front":
        assert "nothing was written" in err and "both must fit" in err, err
    else:
        assert f"The unfinished {str(tinyfs / '.out.tmp')!r} was removed" in err, err
    assert sorted(p.name for p in tinyfs.iterdir()) == ["out"], "a temporary folder was left behind"
    assert _snapshot(out) == before, "the previous output changed"


# --------------------------------------------------------------------------------------------------
# A stale .NAME.tmp from a killed run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stale", ["folder", "file"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_stale_tmp_is_removed_and_the_run_succeeds(src, caplog, direction, stale):
    caplog.set_level(logging.INFO, logger="megatron_entcov.weights.convert_output")
    parent = src.tmp / f"stale_{direction}_{stale}"
    parent.mkdir()
    tmp = parent / ".out.tmp"
    if stale == "folder":
        (tmp / "step_000000").mkdir(parents=True)
        (tmp / "shard-00000.tmp").write_bytes(b"partial")
    else:
        tmp.write_bytes(b"partial")
    assert _run(direction, src, parent / "out") == 0
    assert any(f"removing {tmp}, left by an earlier conversion" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in parent.iterdir()) == ["out"]
    marker = "latest" if direction == "hf-to-megatron" else "model.safetensors"
    assert (parent / "out" / marker).is_file()
