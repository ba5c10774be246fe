"""megatron_entcov.run.slurm without a cluster (core suite): processes per node from SLURM's GPU variables
(typed GRES), servers per node, the checks before servers go on other nodes, rollout.sync_dir validation, and
'is the run finished' from the run directory's checkpoints."""

from __future__ import annotations

import pytest

from megatron_entcov.config import load_config
from megatron_entcov.run.slurm import (
    JobError,
    check_remote_servers,
    gres_count,
    main,
    nproc_per_node,
    run_finished,
    servers_per_node,
)


@pytest.mark.parametrize("value, count", [("8", 8), ("h100:8", 8), ("gpu:h100:8", 8), ("a100:4,v100:2", 6),
                                          ("gpu:4", 4), ("4(IDX:0-3)", 4)])
def test_gres_count_reads_plain_and_typed_values(value, count):
    assert gres_count("SLURM_GPUS_PER_NODE", value) == count


def test_gres_count_names_the_variable_of_a_value_it_cannot_read():
    with pytest.raises(JobError, match=r"SLURM_GPUS_PER_NODE='h100:many' is not a GPU count .* NPROC_PER_NODE"):
        gres_count("SLURM_GPUS_PER_NODE", "h100:many")


@pytest.mark.parametrize("env, nproc", [
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "h100:4"}, 8),     # the node's own count first
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, 4),
    ({"NPROC_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}, 2),               # the override wins
    ({"NPROC_PER_NODE": "1"}, 1),                                          # CPU nodes
])
def test_nproc_per_node(env, nproc):
    assert nproc_per_node(env) == nproc


@pytest.mark.parametrize("env, message", [
    ({}, r"no GPUs were requested; request GPUs .* or set NPROC_PER_NODE"),
    ({"SLURM_GPUS_ON_NODE": "0"}, r"SLURM_GPUS_ON_NODE says 0 GPUs"),
    ({"NPROC_PER_NODE": "zero"}, r"NPROC_PER_NODE='zero' is invalid: give a positive integer"),
    ({"NPROC_PER_NODE": "-1", "SLURM_GPUS_ON_NODE": "8"}, r"NPROC_PER_NODE='-1' is invalid"),
])
def test_nproc_per_node_errors_name_the_variable(env, message):
    with pytest.raises(JobError, match=message):
        nproc_per_node(env)


def test_servers_per_node_from_gpus_and_server_tp():
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.server_args=[--tp-size, '2']"])
    assert servers_per_node(cfg, {"SLURM_GPUS_ON_NODE": "8"}) == 4
    assert servers_per_node(cfg, {}) == 1                                   # a CPU node: one server
    assert servers_per_node(cfg, {"SERVERS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}) == 3
    with pytest.raises(JobError, match=r"SLURM_GPUS_ON_NODE=3 GPUs per node do not hold whole servers .* --tp-size 2"):
        servers_per_node(cfg, {"SLURM_GPUS_ON_NODE": "3"})


@pytest.mark.parametrize("overrides, message", [
    (["rollout.sglang.sync_method=tensor"], r"sync_method='tensor' is invalid for servers on other nodes"),
    ([], r"rollout.sync_dir='' is invalid for rollout.sglang.sync_method='disk' with servers on other nodes"),
    (["rollout.sglang.sync_method=distributed", "rollout.sglang.router_url=http://r:1"], r"router_url='http://r:1'"),
])
def test_check_remote_servers_refuses_what_cannot_reach_other_nodes(overrides, message):
    cfg = load_config(None, ["rollout.engine=sglang", *overrides])
    with pytest.raises(JobError, match=message):
        check_remote_servers(cfg)


def test_check_remote_servers_accepts_network_and_shared_disk_syncs():
    check_remote_servers(load_config(None, ["rollout.engine=sglang", "rollout.sglang.sync_method=distributed"]))
    check_remote_servers(load_config(None, ["rollout.engine=sglang", "rollout.sync_dir=/shared/sync"]))


@pytest.mark.parametrize("overrides, message", [
    (["rollout.engine=sglang", "rollout.sync_dir=relative/dir"],
     r"rollout.sync_dir='relative/dir' is invalid: must be an absolute path"),
    (["rollout.sync_dir=/shared/sync"],
     r"rollout.sync_dir='/shared/sync' is invalid: applies to rollout.engine=sglang"),
    (["rollout.engine=sglang", "rollout.sglang.sync_method=distributed", "rollout.sync_dir=/shared/sync"],
     r"sync_method='distributed'\); unset it"),
])
def test_sync_dir_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_run_finished_reads_the_latest_complete_checkpoint(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", "steps=5"])
    assert not run_finished(cfg)
    ckpt = tmp_path / "run" / "checkpoints"
    for step, complete in ((3, True), (5, False)):
        (ckpt / f"step_{step:06d}").mkdir(parents=True)
        if complete:
            (ckpt / f"step_{step:06d}" / "COMPLETE").write_text("")
    assert not run_finished(cfg)                     # step 5 is not complete
    (ckpt / "step_000005" / "COMPLETE").write_text("")
    assert run_finished(cfg)


def test_the_command_line_prints_and_exits_2_on_a_bad_value(capsys, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "3")
    assert main(["nproc"]) == 0 and capsys.readouterr().out.strip() == "3"
    monkeypatch.setenv("NPROC_PER_NODE", "x")
    assert main(["nproc"]) == 2
    assert "slurm_job nproc: NPROC_PER_NODE='x' is invalid" in capsys.readouterr().err
    assert main(["finished", "--config", "/no/such.yaml", "-v"]) == 2     # train's -v is ignored
