"""SGLangEngine with two real servers: a server killed mid-rollout loses no sample (its requests fail over to
the other), and with no server left generate raises a clear error.

Run: make test-sglang
"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_entcov.rollout.sglang import NoServerLeftError, SGLangEngine
from megatron_entcov.rollout.types import SamplingParams

pytestmark = pytest.mark.sglang

PROMPTS = [[2, 5 + i % 10, 14, 4 + (3 * i) % 10, 17] for i in range(24)]


def test_killed_server_loses_no_sample(tiny_cfg, model_dirs, tmp_path):
    # max_inflight=4: requests go out in waves, so the kill lands mid-rollout with work left on both servers.
    eng = SGLangEngine(tiny_cfg, model_dir=model_dirs["a"], num_servers=2, max_inflight=4, request_timeout_s=120,
                       backoff_s=0.2, log_dir=tmp_path)
    try:
        params = SamplingParams(temperature=1.0, max_new_tokens=64, seed=5)
        result = {}
        t = threading.Thread(target=lambda: result.update(samples=eng.generate(PROMPTS, params)))
        t.start()
        victim, survivor = eng.servers
        deadline = time.monotonic() + 120
        while victim.requests + survivor.requests < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        done_at_kill = victim.requests + survivor.requests
        victim.proc.kill()
        t.join(timeout=300)
        assert not t.is_alive()
        samples = result["samples"]
        assert done_at_kill < len(PROMPTS), "the rollout finished before the kill; the test proves nothing"
        assert [s.index for s in samples] == list(range(len(PROMPTS)))
        assert all(s.finish_reason == "length" and s.num_response_tokens == 64 for s in samples)
        assert all(len(s.rollout_logprobs) == 64 for s in samples)
        health = eng.health()
        assert [s["alive"] for s in health["servers"]] == [False, True] and health["ok"]
        assert victim.failures >= 1
        print(f"\n[sglang] failover: killed after {done_at_kill}/{len(PROMPTS)} requests; "
              f"{survivor.requests} served by the survivor")
        # The next rollout uses the survivor only; then no server is left.
        assert len(eng.generate(PROMPTS[:2], params)) == 2
        survivor.proc.kill()
        with pytest.raises(NoServerLeftError, match="no SGLang server left"):
            eng.generate(PROMPTS[:2], params)
    finally:
        eng.close()
