"""rollout.overlap's mechanics without a process group: the background rollout (RolloutPrefetch) hands results
and exceptions to the main thread in order, the staleness sums, the loader snapshot a checkpoint stores, and the
config's contradiction with colocated servers."""

from __future__ import annotations

import threading
import traceback

import pytest

from megatron_entcov.config import RolloutConfig, SGLangConfig, load_config
from megatron_entcov.rollout.prefetch import RolloutPrefetch, staleness_sums


def test_wait_returns_each_result_in_order_and_overlaps_with_the_caller():
    prefetch = RolloutPrefetch()
    assert not prefetch.pending
    for step in range(3):
        release = threading.Event()
        prefetch.start(lambda s=step: (release.wait(10), f"R{s}")[1], step=step)
        assert prefetch.pending and prefetch.running and prefetch.step == step
        release.set()                 # the caller runs on while the thread blocks: it did not run inline
        assert prefetch.wait() == f"R{step}"
        assert not prefetch.pending and prefetch.wait_time >= 0.0
    assert prefetch.close()


def test_a_second_start_before_wait_is_refused():
    prefetch = RolloutPrefetch()
    prefetch.start(lambda: 1, step=4)
    with pytest.raises(RuntimeError, match="step 4 is still pending"):
        prefetch.start(lambda: 2, step=5)
    assert prefetch.wait() == 1
    with pytest.raises(RuntimeError, match="no rollout was started"):
        prefetch.wait()


def test_an_exception_in_the_thread_reraises_at_wait_with_its_cause():
    class EngineDown(ConnectionError):
        pass

    def generate():
        raise EngineDown("server 0 refused the connection")

    prefetch = RolloutPrefetch()
    prefetch.start(generate, step=7)
    with pytest.raises(EngineDown, match="server 0 refused") as info:
        prefetch.wait()
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "generate" in frames                              # the thread's own traceback came along
    assert any("step index 7" in note for note in info.value.__notes__)
    assert not prefetch.pending                              # collected: the next start is allowed
    prefetch.start(lambda: "ok", step=8)
    assert prefetch.wait() == "ok"


def test_close_joins_a_running_rollout_or_gives_up_after_the_timeout():
    prefetch = RolloutPrefetch()
    release = threading.Event()
    prefetch.start(lambda: release.wait(10), step=1)
    assert prefetch.close(timeout=0.05) is False            # still generating: left to end with the process
    assert not prefetch.pending
    release.set()
    prefetch.start(lambda: "late", step=2)
    assert prefetch.close(timeout=10) is True
    assert RolloutPrefetch().close() is True                 # nothing started


def test_staleness_sums():
    assert staleness_sums(3, [2, 2, 3, 1]) == (1 + 1 + 0 + 2, 4, 2)
    total, count, most = staleness_sums(5, [])
    assert (total, count) == (0.0, 0.0) and most == float("-inf")


def test_overlap_is_off_by_default_and_set_from_the_command_line():
    assert RolloutConfig().overlap is False
    cfg = load_config(None, ["rollout.overlap=true", "loss.tis_cap=2.0"])
    assert cfg.rollout.overlap is True


def test_overlap_with_colocated_servers_names_both_fields_and_the_fix():
    sg = SGLangConfig(release_memory=True, server_device="cuda")
    with pytest.raises(ValueError, match=r"rollout.overlap=True is invalid: contradicts "
                                         r"rollout.sglang.release_memory=true.*set rollout.overlap=false"):
        RolloutConfig(engine="sglang", overlap=True, sglang=sg)
    RolloutConfig(engine="sglang", overlap=True)             # servers on their own GPUs: fine
    RolloutConfig(engine="sglang", overlap=False, sglang=sg)


def test_the_loader_snapshot_before_the_prefetch_draws_replays_the_prefetched_prompts():
    """What the trainer checkpoints with overlap: the loader as of the trained experience. Restored, it draws
    exactly the prompts the prefetch had drawn (none skipped, none repeated)."""
    from megatron_entcov.tasks.prompts import PromptDataset, PromptLoader
    from megatron_entcov.tasks.tokenizer import load_tokenizer

    cfg = load_config(None, ["rollout.prompts_per_step=4"])
    tok = load_tokenizer(cfg.model.hf_dir)
    dataset = PromptDataset.from_config(cfg.data, tok, max_prompt_len=cfg.rollout.max_prompt_len, seed=cfg.seed)

    def loader():
        return PromptLoader(dataset, batch_size=4, seed=cfg.seed, shuffle=cfg.data.shuffle)

    running = loader()
    trained = [running.next_global_batch() for _ in range(2)]        # steps 1 and 2 trained these
    snapshot = running.state_dict()                                   # taken before the prefetch of step 3
    prefetched = running.next_global_batch()                          # drawn while step 2 trained
    resumed = loader()
    resumed.load_state_dict(snapshot)
    regenerated = resumed.next_global_batch()
    assert [p.prompt_ids for p in regenerated] == [p.prompt_ids for p in prefetched]
    assert all([p.prompt_ids for p in regenerated] != [p.prompt_ids for p in batch] for batch in trained)
