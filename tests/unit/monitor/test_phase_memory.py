"""PhaseMemory (monitor/memory.py) on CPU: the host figure of each phase, the offloaded bytes in GiB, take()
handing the figures over once, and unknown phases refused."""

from types import SimpleNamespace

import psutil
import pytest
import torch

from megatron_entcov.monitor.memory import PhaseMemory


def test_cpu_phases_record_host_memory_and_the_offloaded_bytes():
    mem = PhaseMemory(SimpleNamespace(device=torch.device("cpu")))
    mem.begin("rollout")
    mem.end("rollout", offloaded_bytes=3 << 29)
    mem.begin("train")
    mem.end("train")
    rss = psutil.Process().memory_info().rss / 2**30
    got = mem.take()
    assert sorted(got) == ["mem/offloaded_GiB", "mem/rollout/host_rss_GiB", "mem/train/host_rss_GiB"]
    assert got["mem/offloaded_GiB"] == 1.5
    for key in ("mem/rollout/host_rss_GiB", "mem/train/host_rss_GiB"):
        assert got[key] == pytest.approx(rss, rel=0.2)
    assert mem.take() == {}


def test_unknown_phase_is_refused():
    mem = PhaseMemory(SimpleNamespace(device=torch.device("cpu")))
    with pytest.raises(ValueError, match="memory phase 'eval' is not one of"):
        mem.end("eval")
