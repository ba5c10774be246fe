"""The one-GPU check's CPU-testable parts (tools/gpu_check.py, tools/gpu_check.sh, tests/gpu/conftest.py): the
report and its exit rule, phase time-outs (the whole process group killed, partial figures kept), JUnit counts
of real pytest output, the wheelhouse pins, names and size limit, the GPU set-up on an image Python without pip,
the GPU tests' skip-or-fail rule run through real pytest sessions and the process group their ranks get, and the
dry run end to end (vocab_op and the Qwen path's phases, listed with their planned checks, here; every phase in
the slow test), the nccl phase against a stand-in SGLang venv, the two-process payload round trip's receiver.
Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[3]


gc = load_script("gpu_check_tool", ROOT / "tools" / "gpu_check.py")
req = load_script("gpu_require_conftest", ROOT / "tests" / "gpu" / "conftest.py")
ipc = load_script("gpu_check_ipc", ROOT / "tools" / "gpu_check_ipc.py")


# ---------------------------------------------------------------------------------------------- report

def _phases(*statuses):
    return {f"p{i}": gc.PhaseResult(f"p{i}", s, duration_s=1.5) for i, s in enumerate(statuses)}


@pytest.mark.parametrize("statuses, ok", [(("passed", "skipped"), True), (("passed", "failed"), False),
                                          (("passed", "timeout"), False), (("passed", "not_run"), False),
                                          ((), False)])
def test_report_is_ok_only_without_failed_timed_out_or_unrun_phases(statuses, ok, tmp_path):
    report = gc.build_report("gpu", _phases(*statuses), started=100.0, finished=130.25, budget_s=480, notes=["n"])
    assert report["ok"] is ok
    path = tmp_path / "report.json"
    gc.write_json(path, report)
    back = json.loads(path.read_text())
    assert back["schema"] == gc.REPORT_SCHEMA == 1 and back["mode"] == "gpu" and back["duration_s"] == 30.25
    assert back["shapes"]["vocab_op"] == [8192, 152064] and back["notes"] == ["n"]
    assert [p["status"] for p in back["phases"].values()] == list(statuses)
    for phase in back["phases"].values():
        assert set(phase) == {"name", "status", "duration_s", "timeout_s", "figures", "checks", "reason", "error",
                              "log", "log_tail"}


def test_report_is_strict_json_and_keeps_non_finite_figures_as_text(tmp_path):
    phases = {"rl": gc.PhaseResult("rl", "failed", figures={"loss": float("nan"), "gn": [1.0, float("inf")]})}
    report = gc.build_report("cpu-dry-run", phases, started=0.0, finished=1.0, budget_s=10, notes=[])
    gc.write_json(tmp_path / "r.json", report)

    def reject(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=reject)
    assert back["phases"]["rl"]["figures"] == {"loss": "nan", "gn": [1.0, "inf"]}
    assert back["shapes"]["vocab_op"] == [256, 4096]


def test_bad_status_mode_and_phases_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="status 'ok' is not one of"):
        gc.PhaseResult("env", "ok")
    with pytest.raises(ValueError, match="mode: expected 'gpu' or 'cpu-dry-run', got 'cpu'"):
        gc.build_report("cpu", {}, started=0, finished=0, budget_s=1, notes=[])
    with pytest.raises(ValueError, match=r"--phases: \['rll'\]; choose from setup, env, vocab_op, cuda_ipc, nccl, rl, rl_qwen, gpu_tests"):
        gc.run_check(tmp_path, dry_run=True, phases=("rll",))
    with pytest.raises(ValueError, match="--budget-s: expected > 0 seconds, got 0"):
        gc.Budget(0)


def test_budget_caps_each_phase_and_leaves_none_below_the_minimum():
    now = [0.0]
    budget = gc.Budget(100.0, clock=lambda: now[0])
    assert budget.allot(60.0) == 60.0
    now[0] = 70.0
    assert budget.allot(60.0) == 30.0
    now[0] = 100.0 - gc.MIN_PHASE_S + 0.5
    assert budget.allot(60.0) is None


# ---------------------------------------------------------------------------------------------- time-outs

def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_phase_past_its_timeout_is_killed_with_its_children_and_keeps_its_figures(tmp_path):
    out_json, pids = tmp_path / "phase.json", tmp_path / "pids"
    script = textwrap.dedent(f"""
        import json, subprocess, sys, time
        json.dump({{"figures": {{"clone_ms": 1.25}}, "checks": [], "status": None}}, open({str(out_json)!r}, "w"))
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pids)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    t0 = time.monotonic()
    res = gc.run_phase_process("vocab_op", [sys.executable, "-c", script], timeout_s=3.0, out_json=out_json,
                               log_path=tmp_path / "log")
    assert time.monotonic() - t0 < 3.0 + gc.KILL_GRACE_S
    assert res.status == "timeout" and "ran past its 3 s time-out" in res.error
    assert res.figures == {"clone_ms": 1.25} and res.timeout_s == 3.0 and res.duration_s >= 3.0
    grandchild = int(pids.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the phase's child outlived the time-out"


@pytest.mark.parametrize("doc, code, status, error", [
    (None, 3, "failed", "exited 3 without reporting a status"),
    ({"status": "passed", "figures": {}, "checks": []}, 1, "failed", "reported passed but exited 1"),
    ({"status": "skipped", "reason": "skipped (no CUDA)", "figures": {}, "checks": []}, 0, "skipped", None),
    ({"status": "failed", "error": "Traceback ... boom", "figures": {"a": 1}, "checks": []}, 1, "failed",
     "Traceback ... boom"),
])
def test_a_phase_result_follows_its_report_and_its_exit_code(doc, code, status, error, tmp_path):
    out_json = tmp_path / "phase.json"
    write = f"import json; json.dump({doc!r}, open({str(out_json)!r}, 'w')); " if doc is not None else ""
    cmd = [sys.executable, "-c", f"{write}print('last words'); raise SystemExit({code})"]
    res = gc.run_phase_process("env", cmd, timeout_s=60, out_json=out_json, log_path=tmp_path / "log")
    assert res.status == status and res.error == error
    assert (res.log_tail is None) == (status == "passed" or status == "skipped")
    if res.log_tail is not None:
        assert "last words" in res.log_tail


# ---------------------------------------------------------------------------------------------- junit

def _pytest(cwd: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_junit_counts_match_a_real_pytest_session(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_mix.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_ok(): pass
        def test_bad(): assert 1 == 2
        def test_skip(): pytest.skip("no CUDA here")
        @pytest.mark.xfail(reason="known")
        def test_xfail(): assert False
        def test_error(broken): pass
    """))
    _pytest(tmp_path, str(tmp_path), f"--junitxml={tmp_path / 'j.xml'}")
    res = gc.parse_junit(tmp_path / "j.xml")
    assert {k: res[k] for k in ("passed", "failed", "errors", "skipped", "xfailed")} == \
        {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "xfailed": 1}
    outcome = {t["id"].split("::")[-1]: (t["outcome"], t["message"]) for t in res["tests"]}
    assert outcome["test_skip"] == ("skipped", "no CUDA here") and outcome["test_ok"] == ("passed", None)
    assert "assert 1 == 2" in outcome["test_bad"][1] and "fixture broke" in outcome["test_error"][1]


# ---------------------------------------------------------------------------------------------- wheelhouse

def test_wheelhouse_pins_come_from_the_cpu_requirements(tmp_path):
    pins = gc.wheelhouse_pins()
    assert pins[0] == "megatron-core==0.16.1" and "math-verify==0.9.0" in pins and "psutil==7.2.2" in pins
    assert len(pins) == len(gc.WHEELHOUSE_FROM_CPU_PINS) + len(gc.WHEELHOUSE_EXTRA_PINS)
    fake = tmp_path / "cpu.txt"
    fake.write_text("# c\nmegatron_core == 9.9 ; python_version>='3'\nmath-verify==1.0\n")
    with pytest.raises(ValueError, match=r"no exact pin \(name==version\) for \['latex2sympy2_extended', "):
        gc.wheelhouse_pins(fake)
    fake.write_text("".join(f"{n.upper()}==1.{i}\n" for i, n in enumerate(gc.WHEELHOUSE_FROM_CPU_PINS)))
    assert gc.wheelhouse_pins(fake)[:2] == ["MEGATRON-CORE==1.0", "MATH-VERIFY==1.1"]


def test_wheel_names_and_what_the_image_keeps():
    wheels = [Path("megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl"),
              Path("Pillow-13.0.0-cp312-cp312-manylinux_2_28_x86_64.whl"), Path("pytest-9.2.0-py3-none-any.whl")]
    assert [gc.wheel_dist(w) for w in wheels] == [("megatron-core", "0.16.1"), ("pillow", "13.0.0"),
                                                  ("pytest", "9.2.0")]
    todo, kept = gc.select_wheels(wheels, {"pillow": "11.1.0", "torch": "2.11.0"})
    assert [w.name for w in todo] == [wheels[0].name, wheels[2].name] and kept == {"pillow": "11.1.0"}
    with pytest.raises(ValueError, match="'megatron-core.tar.gz' is not a wheel file name"):
        gc.wheel_dist(Path("megatron-core.tar.gz"))


def test_wheelhouse_over_its_size_limit_is_refused_naming_the_largest(tmp_path):
    for name, mib in (("a-1-py3-none-any.whl", 1), ("b-1-py3-none-any.whl", 2)):
        (tmp_path / name).write_bytes(b"\0" * (mib * 2**20))
    assert gc.check_wheelhouse_size(tmp_path, 4) == 3.0
    with pytest.raises(ValueError, match=r"holds 3\.0 MiB > the 2\.5 MiB limit \(largest: b-1-py3-none-any\.whl 2\.0 "
                                         r"MiB, a-1-py3-none-any\.whl 1\.0 MiB\)"):
        gc.check_wheelhouse_size(tmp_path, 2.5)


def _fake_wheel(directory: Path, name: str, requires_python: str = ">=3.8") -> Path:
    """A minimal pure-Python wheel: module ``name`` with VALUE = 42."""
    dist = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nRequires-Python: "
                                 f"{requires_python}\n\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    path = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_gpu_setup_makes_a_venv_installs_offline_and_puts_the_checkout_on_its_path(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    _fake_wheel(house, "entcov_fake_a")
    res, python = gc.setup_phase("gpu", house, 120.0, tmp_path / "logs", tmp_path / "venv")
    assert res.status == "passed", (res.error, res.log_tail)
    assert python == str(tmp_path / "venv" / "bin" / "python")
    assert res.figures["installed"] == ["entcov_fake_a-1.0-py3-none-any.whl"] and res.figures["kept_from_image"] == {}
    # torch is only in the venv this test runs in (a venv itself, as on uv-style images), not in its base
    # Python: the new venv must see it through the parent's site-packages.
    out = subprocess.run([python, "-c", "import entcov_fake_a, megatron_entcov, sys, torch; "
                          "print(entcov_fake_a.VALUE, megatron_entcov.__file__, sys.prefix, torch.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert out[:3] == ["42", str(ROOT / "megatron_entcov" / "__init__.py"), str(tmp_path / "venv")]
    import torch

    assert out[3] == torch.__file__


def _pipless_base(tmp: Path) -> Path:
    """A Python installation with this interpreter's standard library but an empty site-packages and no ensurepip,
    as on a Debian-style image without python3-pip and python3-venv: the binary copied (it finds its prefix here
    by the standard library's landmark), the standard library and shared libraries linked. Returns its python."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    real, base = Path(sys.base_prefix), tmp / "base"
    (base / "bin").mkdir(parents=True)
    (base / "lib" / ver / "site-packages").mkdir(parents=True)
    for entry in (real / "lib" / ver).iterdir():
        if entry.name not in ("site-packages", "dist-packages", "ensurepip"):
            (base / "lib" / ver / entry.name).symlink_to(entry)
    for lib in (real / "lib").glob("libpython*"):
        (base / "lib" / lib.name).symlink_to(lib)
    python = base / "bin" / ver
    shutil.copy2(Path(getattr(sys, "_base_executable", sys.executable)).resolve(), python)
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, sys; "
                            "print(sys.prefix, u.find_spec('pip') is None, u.find_spec('ensurepip') is None)"],
                           capture_output=True, text=True, timeout=60)
    if probe.stdout.split() != [str(base), "True", "True"]:
        pytest.skip(f"cannot make a Python without pip from {sys.base_prefix}: {probe.stdout}{probe.stderr}")
    return python


def _stub_torch(site: Path) -> None:
    """The image's torch, as far as the set-up and the env phase ask: a version, no CUDA."""
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("from types import SimpleNamespace\n__version__ = '0.0.1+stub'\n"
                                                "version = SimpleNamespace(cuda=None)\n"
                                                "cuda = SimpleNamespace(is_available=lambda: False)\n")
    (site / "torch-0.0.1+stub.dist-info").mkdir()
    (site / "torch-0.0.1+stub.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\n"
                                                                  "Version: 0.0.1+stub\n\n")


@pytest.mark.parametrize("image", ["base", "venv"])
def test_gpu_setup_works_on_an_image_without_pip_and_the_phases_run_in_its_venv(image, tmp_path):
    """The image's Python has no pip, nor ensurepip: 'base', a plain installation (the check unpacks the wheels
    itself); 'venv', a venv of that Python holding torch and pip (uv-style; its pip is found once the new venv
    sees the image venv's packages). Either way the set-up passes and the env phase runs in the new venv, seeing
    the image's torch and the wheelhouse's package."""
    import pip

    base_python = _pipless_base(tmp_path)
    ver = base_python.name
    if image == "base":
        python, site = base_python, base_python.parent.parent / "lib" / ver / "site-packages"
    else:
        subprocess.run([str(base_python), "-m", "venv", "--without-pip", str(tmp_path / "image")], check=True,
                       timeout=120)
        python, site = tmp_path / "image" / "bin" / "python", tmp_path / "image" / "lib" / ver / "site-packages"
        pip_dir = Path(pip.__file__).parent
        for entry in [pip_dir, *pip_dir.parent.glob("pip-*.dist-info")]:
            (site / entry.name).symlink_to(entry)
    _stub_torch(site)
    house, venv, out = tmp_path / "house", tmp_path / "venv", tmp_path / "out"
    house.mkdir()
    _fake_wheel(house, "psutil")                      # a package of PACKAGES and IMPORTS the image lacks
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([str(python), str(ROOT / "tools" / "gpu_check.py"), "run", str(out), "--phases", "setup,env",
                           "--wheelhouse", str(house), "--venv", str(venv), "--budget-s", "300"],
                          capture_output=True, text=True, env=env, timeout=400)
    report = json.loads((out / "report.json").read_text())
    setup, env_phase = report["phases"]["setup"], report["phases"]["env"]
    assert setup["status"] == "passed", (proc.stdout, setup["error"], setup["log_tail"])
    assert setup["figures"]["installer"] == ("the image's pip" if image == "venv" else
                                             "unpacked by the check (no pip in the image)")
    assert setup["figures"]["installed"] == ["psutil-1.0-py3-none-any.whl"]
    figures = env_phase["figures"]
    assert figures["python"] == str(venv / "bin" / "python"), (env_phase["error"], env_phase["log_tail"])
    assert (figures["packages"]["torch"], figures["packages"]["psutil"]) == ("0.0.1+stub", "1.0")
    failed_imports = next(c for c in env_phase["checks"] if c["name"].startswith("every module"))["detail"]
    assert "torch" not in failed_imports and "psutil" not in failed_imports and "megatron.core" in failed_imports


def test_a_wheel_unpacked_without_pip_lands_where_pip_puts_it(tmp_path):
    purelib, prefix = tmp_path / "venv" / "site", tmp_path / "venv"
    wheel = tmp_path / "tool-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tool/__init__.py", "VALUE = 1\n")
        z.writestr("tool-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tool\nVersion: 1.0\n\n")
        z.writestr("tool-1.0.data/platlib/tool_ext.py", "EXT = 2\n")
        z.writestr("tool-1.0.data/scripts/tool-run", "#!python\nprint('hi')\n")
        z.writestr("tool-1.0.data/data/share/tool.txt", "data\n")
    gc.unpack_wheel(wheel, purelib, prefix)
    assert (purelib / "tool" / "__init__.py").read_text() == "VALUE = 1\n"
    assert (purelib / "tool_ext.py").read_text() == "EXT = 2\n" and (prefix / "share" / "tool.txt").is_file()
    script = prefix / "bin" / "tool-run"
    assert script.read_text() == f"#!{prefix / 'bin' / 'python'}\nprint('hi')\n" and os.access(script, os.X_OK)
    assert (purelib / "tool-1.0.dist-info" / "INSTALLER").read_text() == "gpu_check\n"
    bad = tmp_path / "bad-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../escape.py", "")
    with pytest.raises(ValueError, match=r"bad-1.0-py3-none-any.whl: member '../escape.py' leaves the install "
                                         r"directory; rebuild the wheelhouse \(make gpu-wheelhouse\)"):
        gc.unpack_wheel(bad, purelib, prefix)
    assert not (tmp_path / "venv" / "escape.py").exists()


def test_gpu_setup_without_a_wheelhouse_fails_naming_the_fix(tmp_path):
    res, _ = gc.setup_phase("gpu", tmp_path / "none", 120.0, tmp_path / "logs", tmp_path / "venv")
    assert res.status == "failed" and "run `make gpu-wheelhouse` on a machine with PyPI" in res.error


def test_dry_run_setup_checks_the_wheels_for_python_3_12(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    _fake_wheel(house, "entcov_fake_b")
    res, _ = gc.setup_phase("cpu-dry-run", house, 120.0, tmp_path / "logs", None)
    assert res.status == "passed" and [c["ok"] for c in res.checks] == [True, True], res.checks
    _fake_wheel(house, "entcov_fake_c", requires_python=">=3.13")
    res, _ = gc.setup_phase("cpu-dry-run", house, 120.0, tmp_path / "logs", None)
    assert res.status == "failed"
    assert res.checks[0]["detail"] == {"entcov_fake_c-1.0-py3-none-any.whl": ">=3.13"}
    res, _ = gc.setup_phase("cpu-dry-run", tmp_path / "none", 120.0, tmp_path / "logs", None)
    assert res.status == "skipped" and res.reason.startswith("no wheelhouse (make gpu-wheelhouse)")


def test_the_rl_run_configs_are_valid_for_both_modes(tmp_path):
    from megatron_entcov.config import load_config

    for gpu in (True, False):
        cfg = load_config(None, gc.rl_overrides(gpu, tmp_path, ["steps=4"])).resolve(1)
        m = cfg.model
        assert (m.add_qkv_bias, m.tie_word_embeddings, m.num_query_groups < m.num_attention_heads) == (True, False, True)
        assert m.params_dtype == ("bfloat16" if gpu else "float32") and cfg.steps == 4
        assert cfg.loss.entropy_coef > 0 and cfg.checkpoint.save_interval == gc.RL_STEPS
        assert m.vocab_size == (151936 if gpu else 4096)
        # bf16 training vs the float32 embedded engine: the post-sync probe needs the Qwen configs' tolerance.
        assert cfg.weight_sync.verify_tol == (0.1 if gpu else 1e-3)


def test_the_qwen_run_config_is_valid_and_packs_shards_and_compiles(tmp_path):
    from megatron_entcov.config import load_config

    cfg = load_config(None, gc.rl_qwen_overrides(tmp_path, ["steps=3"])).resolve(1)
    longest = cfg.rollout.max_prompt_len + cfg.sampling.max_new_tokens
    assert cfg.optim.max_tokens_per_micro_batch == 512 and longest == 96
    assert cfg.parallel.use_distributed_optimizer and cfg.optim.optimizer == "adam"
    assert cfg.loss.compile_logprob_kernels and cfg.model.params_dtype == "bfloat16"
    assert cfg.model.vocab_size == 151936 and cfg.checkpoint.save_interval == gc.RL_QWEN_STEPS == 2
    assert cfg.name == "gpu-check-qwen" and cfg.output_dir == str(tmp_path)
    # --rl-set values win over both runs' settings, in place (the loader refuses a key given twice).
    merged = gc.rl_qwen_overrides(tmp_path, ["optim.max_tokens_per_micro_batch=1024"])
    assert [o for o in merged if o.startswith("optim.max_tokens_per_micro_batch=")] == [
        "optim.max_tokens_per_micro_batch=1024"]
    assert gc.merge_overrides(["a=1", "b=2"], ["a=3", "c=x=y"]) == ["a=3", "b=2", "c=x=y"]


def _fake_sglang_python(tmp_path: Path, version: str) -> Path:
    """A 'python' that answers transports' NCCL probe as an SGLang venv with NCCL ``version`` would."""
    py = tmp_path / "sglang-venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(f"#!/bin/sh\necho \"'{version}' nvidia-nccl-cu12\"\n")
    py.chmod(0o755)
    return py


@pytest.mark.parametrize("servers, ok", [("2.29.7", True), ("2.30.7", False)])
def test_the_nccl_phase_sets_the_image_and_sglang_versions_side_by_side(servers, ok, tmp_path, monkeypatch):
    from megatron_entcov.rollout.sglang import transports

    monkeypatch.setenv("SGLANG_PY", str(_fake_sglang_python(tmp_path, servers)))
    monkeypatch.setattr(transports, "trainer_nccl_version", lambda: "2.29.7")
    rec = gc.Recorder(tmp_path / "nccl.json")
    gc.phase_nccl(rec, gpu=True)
    side = rec.doc["figures"]["nccl"]
    assert (side["image_torch"], side["sglang_venv"], side["sglang_nccl_wheel"]) == ("2.29.7", servers,
                                                                                      "nvidia-nccl-cu12")
    (check,) = rec.doc["checks"]
    assert check["ok"] is ok and rec.doc["status"] is None      # run_phase_child turns the checks into the status
    if not ok:
        assert "image 2.29.7 vs SGLang venv 2.30.7: make gpu-nccl-align" in check["detail"]


def test_the_nccl_phase_skips_without_an_sglang_venv_and_fails_a_cuda_torch_without_nccl(tmp_path, monkeypatch):
    from megatron_entcov.rollout.sglang import transports

    monkeypatch.setenv("SGLANG_PY", str(tmp_path / "nowhere" / "python"))
    monkeypatch.setattr(transports, "trainer_nccl_version", lambda: "2.29.7")
    rec = gc.Recorder(tmp_path / "a.json")
    gc.phase_nccl(rec, gpu=True)
    assert rec.doc["status"] == "skipped" and rec.doc["checks"] == []
    assert rec.doc["reason"] == f"no SGLang venv at {tmp_path / 'nowhere' / 'python'} (set SGLANG_PY, or make " \
                                "sglang-env-gpu)"
    assert rec.doc["figures"]["nccl"]["image_torch"] == "2.29.7"
    monkeypatch.setattr(transports, "trainer_nccl_version", lambda: None)
    rec = gc.Recorder(tmp_path / "b.json")
    gc.phase_nccl(rec, gpu=True)
    assert [c["ok"] for c in rec.doc["checks"]] == [False] and rec.doc["status"] is None


def test_the_ipc_receiver_compares_bytes_with_its_own_draw(tmp_path):
    """A payload of another seed is found unequal tensor by tensor: the comparison is not trivially true."""
    import torch

    from megatron_entcov.rollout.sglang.transports import TensorTransport

    torch.multiprocessing.set_sharing_strategy("file_system")
    other = ipc.make_bucket(seed=ipc.SEED + 1)
    (tmp_path / "p.b64").write_text(TensorTransport.serialize(other))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check_ipc.py"), "receive", str(tmp_path / "p.b64"),
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["names_ok"] and got["devices"] == ["cpu"]
    assert got["bytes_equal"] == {name: False for name, _, _ in ipc.BUCKET}
    assert [str(t.dtype) for _, t in other] == [f"torch.{d}" for _, _, d in ipc.BUCKET]


def test_the_ipc_receiver_maps_a_gpu_uuid_to_its_own_device_index(monkeypatch):
    """SGLang's rebuild: argument 6 of rebuild_cuda_tensor is the GPU's UUID, looked up among this process's
    devices (here two fake ones); an index passes through; a UUID not seen here is an error naming it."""
    import types

    import torch

    uuids = ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=uuids[i]))
    calls = []
    rebuild = ipc._uuid_rebuild(lambda *args: calls.append(args))
    rebuild(0, 1, 2, 3, 4, 5, "GPU-bbbb", 7)
    rebuild(0, 1, 2, 3, 4, 5, 0, 7)
    assert calls == [(0, 1, 2, 3, 4, 5, 1, 7), (0, 1, 2, 3, 4, 5, 0, 7)]
    with pytest.raises(RuntimeError, match="names GPU GPU-cccc, which this process does not see"):
        rebuild(0, 1, 2, 3, 4, 5, "GPU-cccc", 7)


# ---------------------------------------------------------------------------------------------- skip-or-fail rule

def test_required_dependencies_parse_and_reject_unknown_names():
    assert req.required_deps({}) == frozenset()
    assert req.required_deps({req.REQUIRE_ENV: " te , sglang"}) == {"cuda", "te", "sglang"}
    assert req.required_deps({req.REQUIRE_ENV: "cuda"}) == {"cuda"}
    with pytest.raises(ValueError, match=r"ENTCOV_GPU_REQUIRE='cuda,tee': unknown \['tee'\]; use a comma-separated "
                                         r"subset of cuda, te, sglang"):
        req.required_deps({req.REQUIRE_ENV: "cuda,tee"})


def test_need_skips_an_optional_dependency_and_fails_a_required_one():
    assert req.need("te", None, environ={req.REQUIRE_ENV: "te"}) is None
    with pytest.raises(pytest.skip.Exception, match=r"^\[optional dependency missing\] te: no TE"):
        req.need("te", "no TE", environ={req.REQUIRE_ENV: "cuda"})
    with pytest.raises(pytest.fail.Exception, match=r"te is required \(ENTCOV_GPU_REQUIRE=cuda,te\) but no TE"):
        req.need("te", "no TE", environ={req.REQUIRE_ENV: "cuda,te"})
    with pytest.raises(ValueError, match="unknown dependency 'apex'"):
        req.need("apex", "no apex", environ={})


@pytest.fixture
def gpu_suite(tmp_path):
    """A copy of tests/gpu/conftest.py with three GPU tests: one skipped the way tests/conftest.py skips GPU tests
    without CUDA, one needing TE (missing), one passing; and a CPU test."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: gpu\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "gpu" / "conftest.py").read_text())
    gpu = "import pytest\n\npytestmark = pytest.mark.gpu\n\n"
    (tmp_path / "test_cuda.py").write_text(gpu + "@pytest.mark.skip(reason='needs a CUDA GPU')\ndef test_cuda():\n"
                                                 "    pass\n")
    (tmp_path / "test_te.py").write_text(gpu + "def test_te(gpu_need):\n    gpu_need('te', 'transformer_engine "
                                               "missing')\n")
    (tmp_path / "test_op.py").write_text(gpu + "def test_op():\n    assert True\n")
    (tmp_path / "test_cpu.py").write_text("def test_cpu():\n    assert True\n")
    return tmp_path


def _session(path: Path, require: str | None, *files: str, extra=()):
    env = {k: v for k, v in os.environ.items() if k != req.REQUIRE_ENV}
    if require is not None:
        env[req.REQUIRE_ENV] = require
    args = [str(path / f) for f in files] + [f"--junitxml={path / 'j.xml'}", *extra]
    proc = _pytest(path, *args, env=env)
    counts = gc.parse_junit(path / "j.xml") if (path / "j.xml").is_file() else None
    return proc, counts


def test_without_requirements_missing_dependencies_skip(gpu_suite):
    proc, res = _session(gpu_suite, None, "test_cuda.py", "test_te.py", "test_op.py")
    assert proc.returncode == 0, proc.stdout
    assert (res["passed"], res["skipped"], res["failed"] + res["errors"]) == (1, 2, 0)


def test_required_cuda_turns_the_cuda_skip_into_a_failure_and_leaves_optional_te_skipped(gpu_suite):
    proc, res = _session(gpu_suite, "cuda", "test_cuda.py", "test_te.py", "test_op.py")
    assert proc.returncode == 1
    outcome = {t["id"].split("::")[-1]: t["outcome"] for t in res["tests"]}
    assert outcome == {"test_cuda": "errors", "test_te": "skipped", "test_op": "passed"}
    assert "GPU tests may not skip; this one skipped: needs a CUDA GPU" in proc.stdout


def test_required_te_fails_the_te_test(gpu_suite):
    proc, res = _session(gpu_suite, "te", "test_te.py", "test_op.py")
    assert proc.returncode == 1 and (res["passed"], res["failed"]) == (1, 1)
    assert "te is required (ENTCOV_GPU_REQUIRE=te) but transformer_engine missing" in proc.stdout


def test_a_required_gpu_session_in_which_no_gpu_test_passed_fails(gpu_suite):
    proc, res = _session(gpu_suite, "cuda", "test_te.py")
    assert (res["skipped"], res["passed"]) == (1, 0)
    assert proc.returncode == 1 and "no GPU test passed" in proc.stdout
    assert _session(gpu_suite, None, "test_te.py")[0].returncode == 0
    proc, res = _session(gpu_suite, "cuda", "test_te.py", extra=["-m", "gpu and not gpu"])   # selects nothing
    assert proc.returncode == 1 and "no GPU test passed" in proc.stdout
    proc, res = _session(gpu_suite, "cuda", "test_te.py", "test_cpu.py")             # not a GPU session
    assert proc.returncode == 0 and (res["skipped"], res["passed"]) == (1, 1)


def test_a_misspelt_requirement_stops_the_session_naming_it(gpu_suite):
    proc, _ = _session(gpu_suite, "cuda,sglng", "test_op.py")
    assert proc.returncode != 0 and "unknown ['sglng']" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- GPU tests' groups

def _backend_of_rank(rank, world_size):
    import torch.distributed as dist

    return dist.get_backend()


def test_gpu_tests_get_the_process_group_their_device_needs(monkeypatch):
    """init_parallel keeps a group it finds and builds on the device that group implies: a GPU test on a gloo
    group would build its bf16 model on the CPU (Megatron's fp16 optimizer then refuses it). The parent picks the
    backend (CUDA faked there); the worker reports the group it got, or refuses nccl it cannot have."""
    import torch
    from dist_utils import run_workers, worker_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_workers(_backend_of_rank, 2, backend="auto", timeout=120) == ["gloo", "gloo"]
    assert run_workers(_backend_of_rank, 1, timeout=120) == ["gloo"]          # CPU tests: gloo, GPU or not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_backend("auto") == "nccl" and worker_backend() == "gloo"
    if not _cuda_in_a_fresh_process():
        with pytest.raises(RuntimeError, match=r"rank 0: run_workers chose backend 'nccl' but this process sees no "
                                               r"CUDA device; check CUDA_VISIBLE_DEVICES, or use backend='gloo'"):
            run_workers(_backend_of_rank, 1, backend="auto", timeout=120)
    with pytest.raises(ValueError, match=r"run_workers\(backend='cuda'\): expected one of \('gloo', 'nccl', 'auto'\)"):
        run_workers(_backend_of_rank, 1, backend="cuda")


def _count_call(rank, world_size, directory):
    """Leaves one file per call and rank, so the parent can count how often the test function ran."""
    import uuid

    (Path(directory) / f"rank{rank}-{uuid.uuid4().hex}").touch()
    return rank


def test_a_port_taken_before_the_group_forms_is_retried_on_a_new_port(monkeypatch, tmp_path):
    """free_port() cannot reserve its port: here another socket listens on the first one it hands out. The group
    cannot form there (EADDRINUSE); run_workers starts it again on a new port, and the test function runs once."""
    import socket

    import dist_utils

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    handed = []

    def free_port():
        handed.append(real() if handed else port)
        return handed[-1]

    real = dist_utils.free_port
    monkeypatch.setattr(dist_utils, "free_port", free_port)
    try:
        assert dist_utils.run_workers(_count_call, 2, (str(tmp_path),), timeout=120) == [0, 1]
    finally:
        taken.close()
    assert len(handed) == 2 and handed[0] == port != handed[1]   # the taken port, then a new one
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def _cuda_in_a_fresh_process() -> bool:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip() == "True"


# ---------------------------------------------------------------------------------------------- end to end

def _dry_run(out: Path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--cpu-dry-run", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=400)
    return proc, json.loads((out / "report.json").read_text())


def test_the_dry_run_checks_the_op_and_writes_its_report(tmp_path):
    proc, report = _dry_run(tmp_path / "out", "--phases", "vocab_op")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] and report["mode"] == "cpu-dry-run" and list(report["phases"]) == ["vocab_op"]
    op = report["phases"]["vocab_op"]
    assert op["status"] == "passed" and len(op["checks"]) == 6 and all(c["ok"] for c in op["checks"])
    for dtype in ("float32", "bfloat16"):
        fig = op["figures"][dtype]
        # Times only: their order (fwd+bwd above fwd) is not asserted, as a loaded machine can invert it.
        assert fig["clone_ms"] > 0 and fig["fwd_bwd_ms"] > 0 and fig["fwd_ms"] > 0
        assert fig["fwd_bwd_over_clone"] == pytest.approx(fig["fwd_bwd_ms"] / fig["clone_ms"])
    assert "[gpu-check] vocab_op  passed" in proc.stdout


NEW_PHASES = ("cuda_ipc", "nccl", "rl_qwen")


def test_the_dry_run_lists_the_qwen_path_phases_with_their_planned_checks(tmp_path):
    """The phases a CPU cannot run are in the report, skipped with the reason and the checks a GPU makes; the
    round trip of cuda_ipc runs over shared memory and compares every byte."""
    proc, report = _dry_run(tmp_path / "out", "--phases", ",".join(NEW_PHASES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] and list(report["phases"]) == list(NEW_PHASES)
    for name in NEW_PHASES:
        phase = report["phases"][name]
        assert phase["status"] == "skipped" and phase["reason"], (name, phase)
        assert phase["figures"]["planned"] == gc.PLANS[name] and len(gc.PLANS[name]) >= 2
        assert f"[gpu-check] {name:<9} skipped" in proc.stdout
    plans = " ".join(p for name in NEW_PHASES for p in gc.PLANS[name])
    for what in ("max_tokens_per_micro_batch", "distributed optimizer", "gloo", "compile_logprob_kernels",
                 "jit_fuser", "bf16", "UUID", "without SGLang", "serialize_cuda_ipc", "SGLang venv",
                 "gpu-nccl-align"):
        assert what in plans, what
    ipc_phase = report["phases"]["cuda_ipc"]
    assert ipc_phase["reason"].startswith("CPU dry run: no CUDA; the two-process round trip ran over shared memory")
    got = ipc_phase["figures"]["round_trip"]["received"]
    assert got["bytes_equal"] == {name: True for name, _, _ in ipc.BUCKET} and got["devices"] == ["cpu"]
    # The round trip's two checks, then the timed syncs' (their receiver's checksums agree every time).
    assert [c["ok"] for c in ipc_phase["checks"]] == [True, True, True]
    assert ipc_phase["figures"]["sync_timing"]["checksums_agree"] is True
    assert report["phases"]["nccl"]["figures"]["nccl"]["image_torch"] is None     # a CPU build of torch
    assert "no NCCL (a CPU build)" in report["phases"]["nccl"]["reason"]
    overrides = report["phases"]["rl_qwen"]["figures"]["overrides"]
    for o in ("optim.max_tokens_per_micro_batch=512", "parallel.use_distributed_optimizer=true",
              "loss.compile_logprob_kernels=true", "model.params_dtype=bfloat16"):
        assert o in overrides


def test_the_shell_wrapper_refuses_a_missing_out_dir_and_a_missing_python(tmp_path):
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--cpu-dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: tools/gpu_check.sh [--cpu-dry-run] OUT_DIR" in proc.stderr
    proc = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--cpu-dry-run", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "VENV": str(tmp_path / "nowhere")})
    assert proc.returncode == 2 and "run `make setup` first" in proc.stderr


@pytest.mark.slow
def test_the_whole_dry_run_passes_every_phase(tmp_path):
    """Every phase on CPU (~1.5 min on 2 cores): the RL run trains 3 steps, checkpoints, resumes for a 4th."""
    proc, report = _dry_run(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    phases = report["phases"]
    assert list(phases) == list(gc.PHASES) and report["ok"]
    assert phases["gpu_tests"]["status"] == "skipped" and phases["gpu_tests"]["reason"] == "skipped (no CUDA)"
    assert [phases[n]["status"] for n in NEW_PHASES] == ["skipped"] * 3
    assert phases["gpu_tests"]["figures"]["counts"]["skipped"] >= 3
    rl = phases["rl"]["figures"]
    assert rl["train_steps_logged"] == [1, 2, 3] and rl["resume_steps_logged"] == [4]
    assert sorted(rl["scalars"]["perf/step_time_s"]) == ["1", "2", "3", "4"]
    assert rl["resume_checkpoints"][-1] == "step_000004"
    assert (tmp_path / "out" / "rl" / "tensorboard").is_dir()
