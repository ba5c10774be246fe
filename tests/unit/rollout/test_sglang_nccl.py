"""The 'distributed' weight sync's start-up checks (rollout/sglang/engine.py _check_distributed_sync,
transports.check_nccl_versions), on CPU with the NCCL probes and torch.cuda's answers monkeypatched.

Before the fix, a trainer whose torch loads NCCL 2.29.7 formed the weight-sync group with servers whose venv
loads 2.30.7, and NCCL refused at the first broadcast, after the servers had started; servers launched on the
trainer's own GPU failed there with "Duplicate GPU detected". Now both are refused before any server starts,
in one line naming the versions (or the GPU) and the fix; servers at URLs, whose NCCL is unknown here, get a
log line.
"""

from __future__ import annotations

import logging
import os
import stat
import sys

import pytest
import torch

from megatron_entcov.config import ModelConfig, SGLangConfig
from megatron_entcov.rollout.sglang import SGLangEngine, engine, transports

MISMATCH = ("rollout.sglang.sync_method=distributed: this trainer's NCCL is 2.29.7 but the launched SGLang servers "
            "({python}) have NCCL 2.30.7, and NCCL refuses mismatched versions at the first broadcast; use "
            "sync_method=tensor (colocated servers) or disk, or pin one NCCL for both venvs, e.g. install the "
            "servers' `nvidia-nccl-cu12==2.30.7` into the trainer's venv (torch loads that wheel's libnccl; "
            "docs/sglang.md)")


@pytest.fixture
def gpu_trainer(monkeypatch):
    """This process 'sees a GPU' (GPU 0) and loads NCCL 2.29.7; the probe of the servers' python is recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(transports, "trainer_nccl_version", lambda: "2.29.7")
    asked = []

    def servers(version):
        monkeypatch.setattr(transports, "server_nccl_version",
                            lambda python: asked.append(python) or (version, "nvidia-nccl-cu12" if version else ""))
        return asked
    return servers


def test_mismatched_nccl_versions_fail_at_start_in_one_line(gpu_trainer, tmp_path):
    asked = gpu_trainer("2.30.7")
    python = str(tmp_path / "sglang-venv" / "bin" / "python")        # never run: the probe is patched
    cfg = SGLangConfig(server_device="cuda", sync_method="distributed")
    with pytest.raises(RuntimeError) as err:
        SGLangEngine(ModelConfig(), cfg, gpu_ids=[1], server_python=python, log_dir=tmp_path / "logs")
    assert str(err.value) == MISMATCH.format(python=python) and "\n" not in str(err.value)
    assert asked == [python] and not (tmp_path / "logs").exists()


def test_matching_nccl_versions_pass_and_are_logged(gpu_trainer, caplog):
    asked = gpu_trainer("2.29.7")
    with caplog.at_level(logging.INFO, logger=transports.__name__):
        engine._check_distributed_sync(SGLangConfig(sync_method="distributed"), "cuda", [1], "/venv/bin/python")
    assert asked == ["/venv/bin/python"]
    assert "NCCL 2.29.7 in this process and the launched SGLang servers (/venv/bin/python)" in caplog.text


def test_servers_at_urls_have_an_unknown_nccl_version_which_is_logged(gpu_trainer, caplog):
    asked = gpu_trainer("2.30.7")
    cfg = SGLangConfig(server_urls=["http://rollout-node:30000"], sync_method="distributed")
    with caplog.at_level(logging.INFO, logger=transports.__name__):
        engine._check_distributed_sync(cfg, "cuda", None, "/venv/bin/python")
    assert asked == []                               # nothing to ask: the servers' venv is on another machine
    assert "the NCCL version of the SGLang servers at rollout.sglang.server_urls / router_url is unknown here " \
           "(this process has 2.29.7)" in caplog.text


def test_an_unreadable_server_venv_is_unknown_too(gpu_trainer, caplog):
    gpu_trainer(None)
    with caplog.at_level(logging.INFO, logger=transports.__name__):
        engine._check_distributed_sync(SGLangConfig(sync_method="distributed"), "cuda", [1], "/venv/bin/python")
    assert "the NCCL version of the launched SGLang servers (/venv/bin/python) is unknown here" in caplog.text


@pytest.mark.parametrize("gpu_ids, tp_args, refused", [(None, [], True), ([1], [], False), ([0], [], True),
                                                         ([1], ["--tp-size", "2"], False)])
def test_servers_launched_on_this_process_gpu_are_refused(gpu_trainer, tmp_path, gpu_ids, tp_args, refused):
    """NCCL refuses two ranks of one group on a GPU; GPU 0 is this process's (SGLang's default without gpu_ids)."""
    gpu_trainer("2.29.7")
    cfg = SGLangConfig(server_device="cuda", server_args=tp_args, sync_method="distributed")
    if not refused:
        engine._check_distributed_sync(cfg, "cuda", gpu_ids, "/venv/bin/python")
        return
    with pytest.raises(ValueError, match=r"^SGLangEngine: rollout.sglang.sync_method=distributed with servers "
                                         r"launched on this process's GPU 0 .*set rollout.sglang.sync_method=tensor"):
        SGLangEngine(ModelConfig(), cfg, gpu_ids=gpu_ids, server_python="/venv/bin/python", log_dir=tmp_path / "l")


def test_launched_cpu_servers_are_not_probed(gpu_trainer):
    """CPU servers sync over gloo (transports.choose_sync_backend) even when the trainer sees a GPU: a CPU venv's
    NCCL wheel of another version must not refuse them."""
    asked = gpu_trainer("2.30.7")
    engine._check_distributed_sync(SGLangConfig(sync_method="distributed"), "cpu", None, "/venv/bin/python")
    assert asked == []


def test_other_methods_and_cpu_trainers_are_not_checked(monkeypatch):
    monkeypatch.setattr(transports, "server_nccl_version", lambda python: pytest.fail("probed"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine._check_distributed_sync(SGLangConfig(sync_method="distributed"), "cpu", None, "/venv/bin/python")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine._check_distributed_sync(SGLangConfig(sync_method="tensor"), "cuda", None, "/venv/bin/python")


def test_the_server_probe_reads_the_nccl_wheel_metadata_without_a_gpu(tmp_path):
    """A venv whose torch cannot answer (here: it fails to import) is read from its nvidia-nccl-cu* metadata."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise ImportError('no CUDA here')\n")
    info = site / "nvidia_nccl_cu12-2.30.7.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-nccl-cu12\nVersion: 2.30.7\n")
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    assert transports.server_nccl_version(str(python)) == ("2.30.7", "nvidia-nccl-cu12")
    assert transports.server_nccl_version(str(tmp_path / "missing")) == (None, "")
    assert os.access(python, os.X_OK)
