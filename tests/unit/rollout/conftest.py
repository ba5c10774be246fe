"""A stand-in for SGLang servers in unit tests: a stdlib HTTP server on 127.0.0.1 that answers every path with
JSON and records what it was sent (``fake_server``)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable

import pytest

from megatron_entcov.distributed.net import free_port

DEFAULT_REPLY = {"success": True, "weight_version": "0", "model_path": "/fake/model", "is_generation": True}
"""What a path without a route answers (enough for /model_info, which must look like SGLang's, and the
weight-update calls)."""


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self, method: str) -> None:
        fake: FakeServer = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        fake.requests.append((method, self.path, body))
        route = fake.routes.get(self.path, DEFAULT_REPLY)
        try:
            reply, status = (route(body) if callable(route) else route), 200
        except Exception as err:        # noqa: BLE001 - a failing route is an HTTP 500, as on a real server
            reply, status = {"error": f"{type(err).__name__}: {err}"}, 500
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):                                    # noqa: N802 - http.server's spelling
        self._answer("GET")

    def do_POST(self):                                   # noqa: N802
        self._answer("POST")

    def log_message(self, *args):
        pass


class FakeServer:
    """Answers on ``url`` until stopped. ``routes[path]`` is the reply (a dict, or a function of the request's
    JSON body, None for a GET; an exception becomes HTTP 500); other paths answer ``DEFAULT_REPLY``.
    ``requests`` lists ``(method, path, body)`` in arrival order."""

    def __init__(self, port: int | None = None, routes: dict[str, dict | Callable] | None = None):
        self.routes = dict(routes or {})
        self.requests: list[tuple[str, str, dict | None]] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port or free_port()), _Handler)
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval: stop() waits for one poll.
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def bodies(self, path: str) -> list[dict | None]:
        """The bodies of the requests to ``path``, in order."""
        return [body for _, p, body in self.requests if p == path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    """``fake_server(port=None, routes=None) -> FakeServer``; every server started is stopped after the test."""
    started: list[FakeServer] = []

    def start(port: int | None = None, routes: dict | None = None) -> FakeServer:
        started.append(FakeServer(port, routes))
        return started[-1]

    yield start
    for s in started:
        s.stop()
