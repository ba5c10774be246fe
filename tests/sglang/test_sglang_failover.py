"""SGLangEngine with two real servers: a server killed mid-rollout loses no sample (its requests fail over to
the other); the engine restarts it from the last synced weights and uses it again; with every server dead a
rollout waits for their restarts; with no server left and none restarting, generate raises a clear error.

Run: make test-sglang
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from megatron_entcov.rollout.sglang import NoServerLeftError, SGLangEngine
from megatron_entcov.rollout.types import SamplingParams

pytestmark = pytest.mark.sglang

PROMPTS = [[2, 5 + i % 10, 14, 4 + (3 * i) % 10, 17] for i in range(24)]


def test_killed_server_loses_no_sample_and_is_restarted(tiny_cfg, model_dirs, tmp_path):
    from sglang_utils import buckets, cpu_servers, load_state_dict

    # max_inflight=4: requests go out in waves, so the kill lands mid-rollout with work left on both servers.
    eng = SGLangEngine(tiny_cfg, cpu_servers(num_servers=2, max_inflight=4, request_timeout_s=120,
                                             max_server_restarts=1),
                       model_dir=model_dirs["a"], backoff_s=0.2, log_dir=tmp_path)
    try:
        eng.update_weights(buckets(load_state_dict(model_dirs["b"])), version=1)
        params = SamplingParams(temperature=1.0, max_new_tokens=64, seed=5)
        result = {}
        t = threading.Thread(target=lambda: result.update(samples=eng.generate(PROMPTS, params)))
        t.start()
        victim, survivor = eng.servers
        first_url = victim.url
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
        assert all(len(s.rollout_logprobs) == 64 and s.weight_version == 1 for s in samples)
        assert victim.failures >= 1 and victim.restarts == 1
        print(f"\n[sglang] failover: killed after {done_at_kill}/{len(PROMPTS)} requests; "
              f"{survivor.requests} served by the survivor")

        # The engine restarted it from the weights of the last disk sync (version 1): live at once, and it
        # computes exactly like the survivor.
        assert eng.wait_restarts(300), [s.last_error for s in eng.servers]
        assert victim.state == "live" and victim.url != first_url, (victim.state, victim.url)
        greedy = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=16, seed=0)
        (url0, p0), (url1, p1) = eng.probe(PROMPTS[0], greedy)
        assert {url0, url1} == {victim.url, survivor.url}
        assert p0.weight_version == p1.weight_version == 1 and p0.response_ids == p1.response_ids
        assert max(abs(a - b) for a, b in zip(p0.rollout_logprobs, p1.rollout_logprobs)) < 1e-4

        # Every server dead at once: generate waits for the restarts (from the synced weights) and completes.
        eng.pool.max_restarts = 2
        for s in eng.servers:
            s.proc.kill()
        out = eng.generate(PROMPTS[:4], params)
        assert len(out) == 4 and all(s.weight_version == 1 for s in out)
        assert eng.wait_restarts(300)
        assert [s.state for s in eng.servers] == ["live", "live"] and survivor.restarts == 1
        print("[sglang] both servers killed: the rollout waited for a restart and completed")

        # A hung scheduler behind a live HTTP front end (SIGSTOP: /model_info still answers): its requests time
        # out, /health_generate fails, the server is declared dead, killed and restarted; no sample is lost.
        eng.pool.max_restarts = 3
        eng.request_timeout_s = 15
        hung = eng.servers[0]
        hung_url = hung.url
        schedulers = [c for c in psutil.Process(hung.proc.proc.pid).children(recursive=True)
                      if "sglang::scheduler" in " ".join([c.name()] + c.cmdline())]
        assert schedulers, "no sglang::scheduler process found under the server"
        for c in schedulers:
            c.suspend()
        out = eng.generate(PROMPTS[:8], params)
        assert [s.index for s in out] == list(range(8)) and all(s.weight_version == 1 for s in out)
        assert "its scheduler does not answer" in hung.last_error, hung.last_error
        assert eng.wait_restarts(300) and hung.state == "live" and hung.url != hung_url
        assert hung.restarts == 3
        print("[sglang] hung scheduler: declared dead after /health_generate failed, restarted")

        # No restarts left: with both servers killed, a clear error.
        eng.pool.max_restarts = 0
        for s in eng.servers:
            s.proc.kill()
        with pytest.raises(NoServerLeftError, match="no SGLang server left"):
            eng.generate(PROMPTS[:2], params)
    finally:
        eng.close()
