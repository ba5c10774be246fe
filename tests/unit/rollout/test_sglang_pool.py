"""The SGLang engine's bookkeeping without SGLang: server states and restarts (rollout/sglang/pool.py), the
fan-out that drops dead servers, the split of server URLs between data-parallel replicas, per-server throughput
metrics, and the errors raised before any server is contacted. The real servers are exercised in tests/sglang
(make test-sglang); here the fake server of conftest.py answers where a live server must answer, and a small
stand-in plays a launched process."""

from __future__ import annotations

import pytest

from megatron_entcov.config import SGLangConfig
from megatron_entcov.distributed.net import free_port
from megatron_entcov.monitor.server_metrics import server_throughput
from megatron_entcov.rollout.sglang import SGLangEngine
from megatron_entcov.rollout.sglang.http import Fanout, NoServerLeftError, ServerError
from megatron_entcov.rollout.sglang.placement import replica_server_urls
from megatron_entcov.rollout.sglang.pool import DEAD, LIVE, RESTARTING, STALE, Server, ServerPool


class _Proc:
    """Stands in for a launched SGLangServer: alive until ``exit()``; ready at once (or fails to start)."""

    def __init__(self, url, fail=False):
        self.url, self.fail, self.running, self.startup_s, self.proc = url, fail, True, 0.1, None

    def alive(self):
        return self.running

    def exit(self):
        self.running = False

    def stop(self):
        self.running = False

    def wait_ready(self, timeout_s):
        if self.fail:
            raise RuntimeError("exited (rc=1) during start-up")
        return 0.1


def _pool(servers, launch=None, max_restarts=2, synced=False, on_ready=None):
    """``synced``: a sync has happened since the restarted processes' weights (they come back stale)."""
    return ServerPool(servers, launch=launch, max_restarts=max_restarts, startup_timeout_s=5,
                      is_current=lambda s: not synced, on_ready=on_ready)


def test_pick_balances_and_avoids_and_dead_given_servers_come_back_stale(fake_server):
    up = fake_server()
    down_port = free_port()
    a, b = Server(url=up.url, index=0), Server(url=f"http://127.0.0.1:{down_port}", index=1)
    pool = _pool([a, b])
    first = pool.pick(avoid=None)
    second = pool.pick(avoid=None)
    assert {first, second} == {a, b}                     # least loaded: one each
    assert pool.pick(avoid=a) is b
    for s in (a, b, b):
        pool.release(s, tokens=5, ok=True)
    assert (a.requests, b.requests, b.generated_tokens) == (1, 2, 10)
    pool.mark_failure(b, ServerError(b.url, "/generate", "refused"))
    assert b.state == DEAD and b.failures == 1 and "refused" in b.last_error
    assert pool.pick(avoid=a) is a                       # the only live one
    pool.release(a)
    assert pool.syncable() == [a]
    # The dead server answers again (restarted by whoever runs it): stale, synced next, never picked before.
    fake_server(port=down_port)
    assert pool.syncable() == [a, b] and b.state == STALE
    assert all(pool.pick(avoid=a) is a for _ in range(3))
    pool.promote([a, b])
    assert b.state == LIVE
    # A failing server that still answers /model_info stays live (a bad request is not a dead server).
    pool.mark_failure(a, ServerError(a.url, "/generate", "timed out"))
    assert a.state == LIVE and a.failures == 1


def test_no_server_left_names_every_server():
    a = Server(url=f"http://127.0.0.1:{free_port()}", index=0, state=DEAD, last_error="connection refused")
    b = Server(url=f"http://127.0.0.1:{free_port()}", index=1, state=STALE)
    with pytest.raises(NoServerLeftError, match=r"no SGLang server left \(1 restarting or waiting for the next "
                                                r"weight sync.*connection refused"):
        _pool([a, b]).pick(avoid=None)


@pytest.mark.parametrize("synced, after", [(False, LIVE), (True, STALE)])
def test_a_launched_server_that_exits_is_restarted(synced, after):
    import threading

    launched, started = [], threading.Event()

    class _HeldProc(_Proc):              # ready only once the test has seen the restart under way
        def wait_ready(self, timeout_s):
            assert started.wait(5)
            return super().wait_ready(timeout_s)

    def launch(s):
        launched.append(_HeldProc(f"http://127.0.0.1:{free_port()}"))
        return launched[-1]

    s = Server(url="http://127.0.0.1:1", index=0, proc=_Proc("http://127.0.0.1:1"))
    other = Server(url="http://127.0.0.1:2", index=1, proc=_Proc("http://127.0.0.1:2"))
    ready = []
    pool = _pool([s, other], launch=launch, max_restarts=1, synced=synced, on_ready=lambda srv: ready.append(srv.url))
    s.proc.exit()
    assert pool.live() == [other]                        # noticed without a request failing
    assert s.state == RESTARTING
    started.set()
    assert pool.wait_restarts(5)
    # Before the first sync the initial weights are current: live at once; otherwise stale until a full sync.
    assert s.state == after and s.restarts == 1 and s.url == launched[0].url and s.history == ["http://127.0.0.1:1"]
    assert ready == [launched[0].url]                    # the engine's hook saw the new process before use
    # Restarts used up: the next exit leaves it dead.
    s.state = LIVE
    s.proc.exit()
    pool.live()
    assert s.state == DEAD and len(launched) == 1
    pool.close()
    assert not other.proc.alive()


def test_a_restart_that_fails_leaves_the_server_dead_with_the_reason():
    s = Server(url="http://127.0.0.1:1", index=0, proc=_Proc("http://127.0.0.1:1"))
    pool = _pool([s], launch=lambda _: _Proc("http://127.0.0.1:3", fail=True), max_restarts=3)
    s.proc.exit()
    pool.live()
    pool.wait_restarts(5)
    assert s.state == DEAD and "restart failed: exited (rc=1)" in s.last_error


def test_fanout_reports_each_failed_server(fake_server):
    up = fake_server()
    down = f"http://127.0.0.1:{free_port()}"
    fan = Fanout([up.url, down], "/flush_cache", {}, timeout=5)
    assert set(fan.failures()) == {down}
    with pytest.raises(RuntimeError, match=r"/flush_cache failed on 1 of 2 servers: " + down):
        fan.check()
    assert Fanout([up.url], "/flush_cache", lambda url: {"url": url}, timeout=5).check()[up.url]


def test_server_urls_are_split_between_replicas():
    urls = [f"http://n:{p}" for p in range(5)]
    assert replica_server_urls(urls, 0, 2) == urls[0::2] and replica_server_urls(urls, 1, 2) == urls[1::2]
    assert replica_server_urls([], 1, 4) == []
    with pytest.raises(ValueError, match="rollout.sglang.server_urls has 1 servers for 2 data-parallel replicas"):
        replica_server_urls(urls[:1], 0, 2)


def test_engine_errors_before_any_server_is_contacted(monkeypatch):
    import torch

    from megatron_entcov.config import ModelConfig, load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)       # 'auto' resolves to cpu
    with pytest.raises(ValueError, match=r"rollout.sglang.release_memory=True needs GPU servers \(server_device "
                                         r"resolved to 'cpu'\).*set rollout.sglang.release_memory=false"):
        SGLangEngine(ModelConfig(), SGLangConfig(release_memory=True))
    with pytest.raises(ValueError, match=r"max_retries=-1 \(must be >= 0\)"):
        SGLangEngine(ModelConfig(), max_retries=-1)
    with pytest.raises(ValueError, match=r"gpu_ids=\[0\] names 1 GPUs for rollout.sglang.num_servers=2"):
        SGLangEngine(ModelConfig(), SGLangConfig(num_servers=2), gpu_ids=[0])
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.router_url=http://router:30000"])
    with pytest.raises(ValueError, match=r"rollout.sglang.router_url='http://router:30000' with 2 data-parallel "
                                         r"replicas"):
        SGLangEngine.from_config(cfg, dp_rank=0, dp_size=2)
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.sglang.server_urls=[http://a:1]"])
    with pytest.raises(ValueError, match="rollout.sglang.server_urls has 1 servers for 2 data-parallel replicas"):
        SGLangEngine.from_config(cfg, dp_rank=1, dp_size=2)


def test_from_config_gives_each_replica_its_share_of_the_servers(fake_server, tmp_path):
    """from_config reads rollout.sglang: replica r is built with server_urls[r::dp] and the section's limits."""
    from megatron_entcov.config import load_config

    servers = [fake_server() for _ in range(3)]
    cfg = load_config(None, ["rollout.engine=sglang", f"output_dir={tmp_path}", "rollout.sglang.max_inflight=3",
                             "rollout.sglang.request_timeout_s=7", "rollout.sglang.sync_method=tensor",
                             "rollout.sglang.server_urls=[" + ", ".join(s.url for s in servers) + "]"])
    engines = [SGLangEngine.from_config(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    try:
        assert [[s.url for s in e.servers] for e in engines] == [[servers[0].url, servers[2].url], [servers[1].url]]
        assert all((e.max_inflight, e.request_timeout_s, e.sync_method) == (3, 7.0, "tensor") for e in engines)
        assert engines[1].seed == cfg.seed + 7 and engines[0].weight_version == 0
        assert cfg.rollout.sglang.server_urls == [s.url for s in servers]       # the run's config is untouched
    finally:
        for e in engines:
            e.close()


def test_per_server_throughput_and_replica_sums():
    before = [{"name": "server0", "generated_tokens": 100, "state": "live", "restarts": 0},
              {"name": "server1", "generated_tokens": 50, "state": "live", "restarts": 0}]
    after = [{"name": "server0", "generated_tokens": 300, "state": "live", "restarts": 0},
             {"name": "server1", "generated_tokens": 50, "state": "restarting", "restarts": 1}]
    m = server_throughput(before, after, seconds=4.0, dp_rank=0, dp_size=1)
    assert m == {"rollout/server0/tokens_per_s": 50.0, "rollout/server1/tokens_per_s": 0.0,
                 "rollout/live_servers": 1.0, "rollout/server_restarts": 1.0}
    m = server_throughput(before, after, seconds=4.0, dp_rank=1, dp_size=2)
    # Every key is summed over the replicas' generating ranks: per-replica keys or replica totals.
    assert set(m) == {"rollout/dp1/server0/tokens_per_s", "rollout/dp1/server1/tokens_per_s",
                      "rollout/live_servers", "rollout/server_restarts"}
    assert server_throughput([], [], 1.0, 0, 1) == {}


def test_colocated_servers_go_on_the_replicas_own_gpus():
    from megatron_entcov.rollout.sglang.placement import colocated_gpu_ids

    # Replica whose generating rank is local rank 4 (tp 4 training, 8 GPUs): its GPUs are 4..7.
    assert colocated_gpu_ids(4, [], local_rank=4, num_gpus=8) == [4, 5, 6, 7]
    assert colocated_gpu_ids(2, ["--tp-size", "2"], local_rank=0, num_gpus=8) == [0, 2]
    assert colocated_gpu_ids(1, ["--tp=4"], local_rank=4, num_gpus=8) == [4]
    with pytest.raises(ValueError, match=r"rollout.sglang.num_servers=4 servers of 2 GPUs each .* need GPUs up "
                                         r"to 11"):
        colocated_gpu_ids(4, ["--tp-size", "2"], local_rank=4, num_gpus=8)


def test_a_restart_whose_ready_hook_fails_leaves_the_server_dead():
    def hook(s):
        raise RuntimeError("release_memory_occupation refused")

    s = Server(url="http://127.0.0.1:1", index=0, proc=_Proc("http://127.0.0.1:1"))
    pool = _pool([s], launch=lambda _: _Proc("http://127.0.0.1:4"), max_restarts=1, synced=True, on_ready=hook)
    s.proc.exit()
    pool.live()
    pool.wait_restarts(5)
    assert s.state == DEAD and "restart failed: release_memory_occupation refused" in s.last_error
    assert s.proc.url == "http://127.0.0.1:4" and not s.proc.alive()      # the unusable process was stopped


def test_pick_waits_for_a_restart_when_no_server_is_live():
    import time as _time

    class _SlowProc(_Proc):
        def wait_ready(self, timeout_s):
            _time.sleep(0.5)
            return 0.5

    s = Server(url="http://127.0.0.1:1", index=0, proc=_Proc("http://127.0.0.1:1"))
    pool = _pool([s], launch=lambda _: _SlowProc("http://127.0.0.1:5"), max_restarts=1)
    s.proc.exit()
    t0 = _time.monotonic()
    assert pool.pick(avoid=None) is s                   # blocked until the restarted server was live
    assert _time.monotonic() - t0 >= 0.4 and s.url == "http://127.0.0.1:5"
    pool.release(s)
    # A restart that comes back stale (it missed a sync) ends the wait with the clear error instead.
    t = Server(url="http://127.0.0.1:6", index=0, proc=_Proc("http://127.0.0.1:6"))
    pool = _pool([t], launch=lambda _: _SlowProc("http://127.0.0.1:7"), max_restarts=1, synced=True)
    t.proc.exit()
    with pytest.raises(NoServerLeftError, match="waiting for the next weight sync"):
        pool.pick(avoid=None)
    # A live server that missed a sync is demoted; promote brings a stale one back, and leaves others alone.
    u = Server(url="http://127.0.0.1:8", index=1, proc=_Proc("http://127.0.0.1:8"))
    pool = _pool([u])
    pool.demote([u])
    assert u.state == STALE and pool.standing() == [u] and pool.live() == []
    pool.promote([u])
    assert u.state == LIVE
    u.state = DEAD
    pool.promote([u])
    assert u.state == DEAD


def test_post_all_drops_dead_servers_and_raises_for_other_failures(fake_server):
    up, refusing = fake_server(), fake_server(routes={"/flush_cache": {"success": False, "message": "busy"}})
    a, b = Server(url=up.url, index=0), Server(url=refusing.url, index=1)
    dead = Server(url=f"http://127.0.0.1:{free_port()}", index=2)
    pool = _pool([a, b, dead])
    # A payload per server; the dead one is marked (dead: /model_info does not answer) and dropped.
    standing = pool.post_all([a, b, dead], "/update_weight_version", lambda s: {"new_version": str(s.index)})
    assert standing == [a, b] and dead.state == DEAD and "Connection" in dead.last_error
    assert up.bodies("/update_weight_version") == [{"new_version": "0"}]
    assert refusing.bodies("/update_weight_version") == [{"new_version": "1"}]
    # A server that answers but refuses fails the call (check) or stays standing (no check).
    with pytest.raises(RuntimeError, match=rf"/flush_cache failed on {refusing.url}: busy"):
        pool.post_all([a, b], "/flush_cache", {})
    assert pool.post_all([a, b], "/flush_cache", {}, check=False) == [a, b] and b.state == LIVE
    # settle: the caller started the fan-out itself (and worked while the servers waited).
    fan = Fanout([a.url, b.url], "/flush_cache", {}, timeout=5)
    assert pool.settle(fan, [a, b], check=False) == [a, b]


def test_a_hung_scheduler_behind_a_live_front_end_is_dead_after_a_generation_failure(fake_server):
    # /model_info answers (SGLang's HTTP process), /health_generate does not (SGLang answers 503 after its own
    # 20 s without a scheduler reply; the fake answers 500 at once).
    def hung(body):
        raise RuntimeError("Health check failed: no response from the scheduler")
    hung_server = fake_server(routes={"/health_generate": hung})
    healthy = fake_server()
    a, b = Server(url=hung_server.url, index=0), Server(url=healthy.url, index=1)
    launched = []
    pool = _pool([a, b], launch=lambda s: launched.append(s) or _Proc(f"http://127.0.0.1:{free_port()}"))
    a.proc = _Proc(a.url)
    # A failure outside generation (a weight-sync call: the scheduler may be paused) leaves it live.
    pool.mark_failure(a, ServerError(a.url, "/update_weights_from_tensor", "timed out"))
    assert a.state == LIVE and ("GET", "/health_generate", None) not in hung_server.requests
    # A request the server rejected (4xx) says nothing about its scheduler.
    pool.mark_failure(a, ServerError(a.url, "/generate", "HTTP 400", status=400, retryable=False),
                      generation=True)
    assert a.state == LIVE
    # A timed-out generation request: the scheduler is probed, fails, and the server is dead and restarted.
    pool.mark_failure(a, ServerError(a.url, "/generate", "timed out"), generation=True)
    assert ("GET", "/health_generate", None) in hung_server.requests
    assert a.state in (RESTARTING, LIVE) and a.restarts == 1
    assert pool.wait_restarts(60) and launched == [a]
    assert a.state == LIVE and a.url != hung_server.url
    # The healthy server's scheduler answers: a failed request there does not kill it.
    pool.mark_failure(b, ServerError(b.url, "/generate", "timed out"), generation=True)
    assert b.state == LIVE and ("GET", "/health_generate", None) in healthy.requests
