"""The converters under faults, end to end on a tiny random Qwen2 (CPU, one gloo rank in this process).

- ``--out`` is an input, lies inside one or contains one: exit code 2 with both paths named, even with
  --force, and every input file byte-identical afterwards.
- A full disk: simulated (the writer raises ENOSPC or KeyboardInterrupt) and for real on a 128 KiB tmpfs
  (up front: the free-space check; during the write: with that check switched off, so the write itself
  fails). Exit code 2 and "no space left" naming --out, no .NAME.tmp left, the previous output at --out
  byte-identical.
- A stale .NAME.tmp (folder or file) from a killed run is removed with an info line; the run succeeds.
- Through the command line (``python -m megatron_entcov convert`` and ``tools/``): a crafted ``.metadata`` runs
  no code, a truncated shard, a malformed or cut safetensors file (also as a run's ``model.hf_dir``) and a
  read-only ``--out`` are one line naming the file (exit code 2); an ``--out`` that is a step of, or lies
  inside, another checkpoint is refused and that checkpoint still converts.
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
from dist_utils import TINY_STEP, set_args

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


# --------------------------------------------------------------------------------------------------
# Through the command line: crafted and damaged inputs, --out inside another checkpoint, read-only --out
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, tool: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The converter as a user runs it: ``python -m megatron_entcov convert DIRECTION ...`` or, with ``tool``,
    ``python tools/convert_<direction>.py ...`` (args[0] is the direction)."""
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    direction, rest = args[0], list(args[1:])
    if tool:
        cmd = [sys.executable, str(ROOT / "tools" / f"convert_{direction.replace('-', '_')}.py"), *rest]
    else:
        cmd = [sys.executable, "-m", "megatron_entcov", "convert", direction, *rest]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The single ``error:`` line of a failed converter run, holding every needle; no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class _WritesMarker:
    """Unpickling this object creates ``path``: what a crafted checkpoint would do instead (os.system ...)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("entry", ["cli", "tool"])
def test_crafted_dist_checkpoint_metadata_runs_no_code(src, tmp_path, entry):
    """A step whose model/.metadata is a pickle that runs code when loaded: megatron-to-hf used to unpickle it
    with plain pickle.load (the code ran). Now it is refused by the same allow-list check as train --resume."""
    import pickle

    ckpt = tmp_path / "ckpt"
    shutil.copytree(src.mcore, ckpt)
    marker = tmp_path / "code_ran"
    metadata = ckpt / "step_000000" / "model" / ".metadata"
    metadata.write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    proc = _cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), tool=entry == "tool")
    assert not marker.exists(), "the crafted checkpoint ran code"
    _one_error_line(proc, str(metadata), "not a safe DCP metadata file")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_truncated_dist_checkpoint_shard_is_named(src, tmp_path):
    """A truncated shard gave EOFError (a traceback) in megatron-to-hf; now one line naming the shard."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src.mcore, ckpt)
    shard = ckpt / "step_000000" / "model" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    _one_error_line(_cli("megatron-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")),
                    f"shard {str(shard)!r} is truncated")


@pytest.mark.parametrize("where", ["step", "inside_step", "inside_root", "new_step"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_out_inside_another_checkpoint_is_refused(src, tmp_path, capsys, direction, where):
    """--out <checkpoint root>/step_000000 --force used to replace that step with a nested checkpoint root (exit
    0) and the outer checkpoint no longer loaded. A step of another checkpoint, or anything below a checkpoint
    root or step, is refused (even with --force), naming --out and the checkpoint."""
    outer = tmp_path / "outer"
    shutil.copytree(src.mcore, outer)
    out = {"step": outer / "step_000000", "inside_step": outer / "step_000000" / "model" / "x",
           "inside_root": outer / "export", "new_step": outer / "step_000007"}[where]
    before = _snapshot(outer)
    assert _run(direction, src, out, "--force") == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r}" in err and str(outer) in err and "checkpoint" in err, err
    assert err.count("\n") == 1, err
    assert _snapshot(outer) == before, "the outer checkpoint changed"


def test_out_on_a_step_through_the_cli_keeps_the_outer_checkpoint_loadable(src, tmp_path):
    """The reported command, end to end: refused with exit code 2, and the outer checkpoint still converts."""
    outer = tmp_path / "outer"
    shutil.copytree(src.mcore, outer)
    step = outer / "step_000000"
    proc = _cli("hf-to-megatron", "--hf-dir", str(src.hf), "--out", str(step), "--force")
    _one_error_line(proc, f"--out {str(step)!r}", f"checkpoint root {str(outer)!r}")
    assert sorted(p.name for p in outer.iterdir()) == ["latest", "step_000000"]
    assert not (step / "latest").exists() and not (step / "step_000000").exists()
    export = _cli("megatron-to-hf", "--ckpt", str(outer), "--out", str(tmp_path / "export"))
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()


def _broken_safetensors(hf: Path, how: str) -> Path:
    """Damage the model.safetensors of ``hf`` (a copy): a header that is not JSON, or a file cut in half."""
    import struct

    file = hf / "model.safetensors"
    raw = file.read_bytes()
    if how == "malformed_header":
        (n,) = struct.unpack("<Q", raw[:8])
        file.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    else:
        file.write_bytes(raw[:len(raw) // 2])
    return file


@pytest.mark.parametrize("how", ["malformed_header", "truncated"])
def test_broken_safetensors_is_one_line_naming_the_file(src, tmp_path, how):
    """A safetensors file with a malformed header (or cut short) gave a SafetensorError traceback."""
    hf = tmp_path / "hf"
    shutil.copytree(src.hf, hf)
    file = _broken_safetensors(hf, how)
    line = _one_error_line(_cli("hf-to-megatron", "--hf-dir", str(hf), "--out", str(tmp_path / "out")), str(file))
    assert "not a readable safetensors file" in line, line
    assert not (tmp_path / "out").exists()


def test_broken_safetensors_in_model_hf_dir_is_one_line(src, tmp_path):
    """The same file as model.hf_dir of a run: one line naming it, exit code 2, no traceback."""
    import sys

    from megatron_entcov.tasks.tokenizer import build_char_tokenizer

    hf = tmp_path / "hf"
    shutil.copytree(src.hf, hf)
    build_char_tokenizer(hf)
    file = _broken_safetensors(hf, "malformed_header")
    args = ["train", "--set", f"output_dir={tmp_path}", "--set", "name=run", "--set", f"model.hf_dir={hf}",
            "--set", "steps=1", "--set", "metrics.tensorboard=false", *set_args(*TINY_STEP)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "megatron_entcov", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-entcov train: error:")]
    assert len(lines) == 1 and str(file) in lines[0] and "not a readable safetensors file" in lines[0], proc.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be created in: a read-only bind mount as root (chmod does not stop root),
    else a directory without write permission."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root, where chmod does not make a directory read-only, and a read-only bind "
                    f"mount failed: {mounted.stderr.strip()}")
    try:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if ro.returncode != 0:
            pytest.skip(f"cannot remount {path} read-only: {ro.stderr.strip()}")
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_read_only_out_is_one_line_naming_it(src, read_only_dir, direction):
    """--out in a read-only directory gave a PermissionError/OSError traceback; now one line, exit code 2."""
    out = read_only_dir / "out"
    inputs = ["--hf-dir", str(src.hf)] if direction == "hf-to-megatron" else ["--ckpt", str(src.mcore)]
    line = _one_error_line(_cli(direction, *inputs, "--out", str(out)), f"--out {str(out)!r}")
    assert "cannot write" in line and ("Read-only file system" in line or "Permission denied" in line), line
    assert not out.exists()
