"""The SGLang engine's waits for its servers (rollout/sglang/http.py BoundedWait, wait_answering; server.py
wait_ready; placement.py router_workers; pool.py pick), against real sockets on 127.0.0.1 and stand-in server
processes, without SGLang.

Before the fix, a URL in rollout.sglang.server_urls that answered 404 (or anything but SGLang's /model_info), or
a closed port, was waited on for a fixed 600 s without a log line, and a stop signal did not end the wait.
Now: an answer that is not SGLang's fails at once naming the URL, the answer and the fix; a closed port is
retried up to rollout.sglang.startup_timeout_s with a log line of the wait at its first miss and periodically;
a stop request (run.stop.wait_or_stop, the trainer's waiter) ends every such wait with StopNow naming it.
"""

from __future__ import annotations

import http.server
import logging
import os
import signal
import stat
import threading
import time

import pytest

from megatron_entcov.config import ModelConfig, SGLangConfig
from megatron_entcov.distributed.net import free_port
from megatron_entcov.rollout.sglang import SGLangEngine
from megatron_entcov.rollout.sglang import http as sghttp
from megatron_entcov.rollout.sglang.pool import DEAD, RESTARTING, Server, ServerPool
from megatron_entcov.run.stop import StopNow, clear_stop, request_stop, wait_or_stop

LIMIT = "rollout.sglang.startup_timeout_s"


class _Answering:
    """A server on 127.0.0.1 answering every GET with one status, content type and body; counts the requests."""

    def __init__(self, status: int, body: bytes, ctype: str = "text/html"):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):                              # noqa: N802 - http.server's spelling
                owner.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.paths: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def answering():
    started: list[_Answering] = []

    def start(status: int, body: bytes, ctype: str = "text/html") -> _Answering:
        started.append(_Answering(status, body, ctype))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def stop_after():
    """``stop_after(seconds)``: request a SIGTERM stop from a timer thread (as the signal handler would); the
    request is cleared after the test."""
    timers: list[threading.Timer] = []

    def start(seconds: float) -> None:
        timers.append(threading.Timer(seconds, request_stop, args=(signal.SIGTERM,)))
        timers[-1].start()

    yield start
    for t in timers:
        t.cancel()
    clear_stop()


NOT_SGLANG = {
    "404": (404, b"<html><body><h1>Error response</h1><p>Error code: 404</p></body></html>", "text/html",
            "answered 'HTTP 404: <html><body><h1>Error response</h1><p>Error code: 404"),
    "html": (200, b"<!DOCTYPE HTML><html><title>Directory listing for /</title></html>", "text/html",
             "answered a body that is not JSON: '<!DOCTYPE HTML><html><title>Directory listing for /"),
    "other-json": (200, b'{"status": "ok", "version": "1.2"}', "application/json",
                   "answered JSON without SGLang's ['model_path', 'is_generation']: {'status': 'ok', 'version': '1.2'}"),
}


@pytest.mark.parametrize("case", list(NOT_SGLANG))
def test_a_url_that_answers_but_not_as_sglang_fails_at_once(answering, case):
    """One request, then a ValueError naming the config entry, the URL, what it answered and the fix; the
    limit (600 s) is not waited for."""
    status, body, ctype, said = NOT_SGLANG[case]
    server = answering(status, body, ctype)
    with pytest.raises(sghttp.AttachError) as err:
        SGLangEngine(ModelConfig(), SGLangConfig(server_urls=[server.url], startup_timeout_s=600))
    text = str(err.value)
    assert isinstance(err.value, ValueError)
    assert text.startswith(f"rollout.sglang.server_urls[0]='{server.url}' is not an SGLang server: GET /model_info "
                           f"{said}"), text
    assert "python -m sglang.launch_server" in text and "\n" not in text, text
    assert server.paths == ["/model_info"]                  # asked once: not mistaken for a server still loading


def test_a_closed_port_is_retried_up_to_the_limit_and_the_wait_is_logged(caplog, monkeypatch):
    """Nothing listens: retried until rollout.sglang.startup_timeout_s, with a log line of what it waits for at
    the first miss and every WAIT_LOG_INTERVAL_S; then one line naming the URL, the limit, the last error."""
    monkeypatch.setattr(sghttp, "WAIT_LOG_INTERVAL_S", 0.5)
    caplog.set_level(logging.INFO, logger="megatron_entcov.rollout.sglang.http")
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(sghttp.AttachError) as err:
        SGLangEngine(ModelConfig(), SGLangConfig(server_urls=[url], startup_timeout_s=2.5))
    waited = time.monotonic() - t0
    text = str(err.value)
    assert text.startswith(f"rollout.sglang.server_urls[0]='{url}': no SGLang server answered GET /model_info "
                           f"within 2.5 s ({LIMIT}); last: 'ConnectionRefusedError: [Errno 111] Connection refused'"), text
    assert f"raise {LIMIT}" in text and "\n" not in text, text
    assert waited >= 2.5                                     # the whole limit was given
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    what = f"waiting for the SGLang server at {url} (rollout.sglang.server_urls[0]) to answer /model_info: "
    assert len(lines) >= 3 and all(x.startswith(what) and x.endswith("Connection refused'") for x in lines), lines
    assert lines[0].startswith(what + "0 s of 2.5 s") and caplog.records[0].levelno == logging.INFO
    seconds = [float(x[len(what):].split(" s of ")[0]) for x in lines]
    assert seconds == sorted(seconds) and seconds[-1] >= 1.0, seconds


def test_a_stop_request_ends_the_wait_for_an_attached_server(stop_after):
    """The trainer's waiter (run.stop.wait_or_stop): a stop request ends a wait with a limit of an hour."""
    url = f"http://127.0.0.1:{free_port()}"
    stop_after(0.5)
    with pytest.raises(StopNow) as err:
        SGLangEngine(ModelConfig(), SGLangConfig(server_urls=[url], startup_timeout_s=3600), waiter=wait_or_stop)
    assert err.value.signum == signal.SIGTERM
    assert str(err.value) == (f"SIGTERM while waiting for the SGLang server at {url} (rollout.sglang.server_urls[0]) "
                              "to answer /model_info")


def _never_ready_server(tmp_path) -> tuple[str, object]:
    """A 'server python' that prints a loading line, records its pid and sleeps without listening."""
    script = tmp_path / "python"
    pid_file = tmp_path / "server.pid"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\necho 'Loading safetensors shards: 50% (1/2)'\nexec sleep 600\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), pid_file


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_launched_server_not_ready_within_the_limit_is_stopped_and_its_wait_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sghttp, "WAIT_LOG_INTERVAL_S", 0.5)
    caplog.set_level(logging.INFO, logger="megatron_entcov.rollout.sglang.http")
    python, pid_file = _never_ready_server(tmp_path)
    with pytest.raises(RuntimeError) as err:
        SGLangEngine(ModelConfig(), SGLangConfig(server_device="cpu", startup_timeout_s=3), model_dir=tmp_path,
                     server_python=python, log_dir=tmp_path / "logs")
    assert f"not ready after 3 s ({LIMIT}); raise {LIMIT} if it is still loading" in str(err.value), err.value
    assert _gone(int(pid_file.read_text()))
    lines = [r.getMessage() for r in caplog.records if "waiting for the SGLang server launched at" in r.getMessage()]
    assert lines and all("to load its model" in x for x in lines), lines
    assert "last: 'Loading safetensors shards: 50% (1/2)'" in lines[-1], lines      # the server log's last line


def test_a_stop_request_ends_the_wait_for_a_launched_server_and_stops_it(tmp_path, stop_after):
    python, pid_file = _never_ready_server(tmp_path)
    stop_after(1.0)
    with pytest.raises(StopNow) as err:
        SGLangEngine(ModelConfig(), SGLangConfig(server_device="cpu", startup_timeout_s=3600), model_dir=tmp_path,
                     server_python=python, log_dir=tmp_path / "logs", waiter=wait_or_stop)
    assert str(err.value).startswith("SIGTERM while waiting for the SGLang server launched at http://127.0.0.1:")
    assert "to load its model" in str(err.value)
    assert _gone(int(pid_file.read_text()))


def test_a_stop_request_ends_the_wait_for_a_restarting_server(stop_after):
    """Every server dead, one restarting (its start-up never ends): pick waits through the pool's waiter."""
    started = threading.Event()
    release = threading.Event()

    class Proc:
        url, startup_s, proc = "http://127.0.0.1:1", 0.1, None

        def __init__(self):
            self.running = True

        def alive(self):
            return self.running

        def stop(self):
            self.running = False

        def wait_ready(self, timeout_s):
            started.set()
            release.wait(60)
            raise RuntimeError("stopped")

    s = Server(url="http://127.0.0.1:2", index=0, proc=Proc())
    pool = ServerPool([s], launch=lambda _: Proc(), max_restarts=1, startup_timeout_s=3600,
                      is_current=lambda _: True, waiter=wait_or_stop)
    try:
        s.proc.running = False                           # the process exited: restarted in the background
        assert pool.live() == [] and s.state == RESTARTING
        assert started.wait(30)
        stop_after(0.3)
        with pytest.raises(StopNow) as err:
            pool.pick(avoid=None)
        assert str(err.value) == "SIGTERM while waiting for a restarting SGLang server (every other server is dead)"
    finally:
        release.set()
        pool.close()
    assert s.state == DEAD


def test_a_router_url_that_is_not_a_router_fails_at_once(answering):
    server = answering(404, b"<html>Not Found</html>")
    with pytest.raises(sghttp.AttachError) as err:
        SGLangEngine(ModelConfig(), SGLangConfig(router_url=server.url, startup_timeout_s=600))
    assert str(err.value).startswith(f"rollout.sglang.router_url='{server.url}' is not an sglang-router: GET /workers "
                                     "answered 'HTTP 404: <html>Not Found</html>'"), err.value
    assert server.paths == ["/workers"]


def test_the_limit_is_a_checked_config_key():
    assert SGLangConfig().startup_timeout_s == 600.0
    for bad in (0, -5):
        with pytest.raises(ValueError, match=rf"^rollout\.sglang\.startup_timeout_s={bad} is invalid: must be > 0$"):
            SGLangConfig(startup_timeout_s=bad)
