"""HTTP to SGLang servers: one JSON call (``http_json``), waiting for a server to answer (``wait_answering``),
and one call fanned out to many servers at once (``Fanout``), with the errors the engine and the weight
transports raise.

The trainer never imports sglang (its torch differs from the servers'), so this is stdlib ``urllib`` + JSON.
A fan-out runs one thread per server, so a slow server does not serialise the others; the weight transports
start one, do their own work while the servers wait on it (the 'distributed' transport broadcasts tensors
then), and only then wait for the replies.

Example:
    info = http_json(url, "/model_info", timeout=10)
    fan = Fanout(urls, "/update_weights_from_disk", {"model_path": d, "flush_cache": True}, timeout=600)
    fan.check()          # RuntimeError naming every server that failed and its reply
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

__all__ = ["ServerError", "NoServerLeftError", "http_json", "wait_answering", "Fanout"]


class ServerError(RuntimeError):
    """An HTTP call to a server failed. ``retryable`` is False for a request the server rejected (HTTP 4xx)."""

    def __init__(self, url: str, path: str, message: str, *, status: int | None = None, retryable: bool = True):
        super().__init__(f"{url}{path}: {message}")
        self.url, self.path, self.status, self.retryable = url, path, status, retryable


class NoServerLeftError(RuntimeError):
    """Every server is dead."""


def http_json(url: str, path: str, payload: dict | None = None, *, timeout: float, method: str | None = None) -> dict:
    """POST (payload given) or GET ``url + path``; returns the decoded JSON body ({} when empty).

    Raises ServerError: retryable for connection errors, time-outs and HTTP 5xx, not retryable for HTTP 4xx.
    """
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")[:2000]
        raise ServerError(url, path, f"HTTP {err.code}: {text}", status=err.code,
                          retryable=err.code >= 500) from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:     # refused, reset, timed out
        raise ServerError(url, path, f"{type(err).__name__}: {err}") from None
    if not body:
        return {}
    try:
        return json.loads(body)
    except json.JSONDecodeError:          # some routes (/flush_cache) answer plain text
        return {"text": body.decode(errors="replace")}


def wait_answering(url: str, timeout_s: float) -> None:
    """Block until the server at ``url`` answers ``/model_info`` (a server started elsewhere may still be
    loading); RuntimeError naming it after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            http_json(url, "/model_info", timeout=10)
            return
        except ServerError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SGLang server {url} did not answer within {timeout_s:.0f} s: {err}") from None
            time.sleep(2.0)


class Fanout:
    """POST ``path`` to every URL concurrently; started on construction.

    ``payload`` is one dict for all, or a callable ``url -> dict``. A server's reply is its JSON body, or
    ``{"success": False, "error": ServerError}`` when the call failed; ``wait()`` returns them by URL and
    ``check()`` raises RuntimeError when any server failed or answered ``success: false``.
    """

    def __init__(self, urls: Sequence[str], path: str, payload: dict | Callable[[str], dict], *, timeout: float):
        self.path = path
        self.replies: dict[str, dict] = {}
        self._threads = []
        for url in urls:
            body = payload(url) if callable(payload) else payload
            t = threading.Thread(target=self._one, args=(url, body, timeout), daemon=True,
                                 name=f"sglang-fanout{path}")
            t.start()
            self._threads.append(t)

    def _one(self, url: str, body: dict, timeout: float) -> None:
        try:
            self.replies[url] = http_json(url, self.path, body, timeout=timeout)
        except ServerError as err:
            self.replies[url] = {"success": False, "error": err}

    def wait(self) -> dict[str, dict]:
        for t in self._threads:
            t.join()
        return self.replies

    def failures(self) -> dict[str, dict]:
        """The replies of the servers that failed (after ``wait``)."""
        return {u: r for u, r in self.wait().items() if "error" in r or r.get("success") is False}

    def check(self) -> dict[str, dict]:
        """Wait; raise RuntimeError naming each failed server and its reply; else return the replies."""
        bad = self.failures()
        if bad:
            raise RuntimeError(f"SGLang {self.path} failed on {len(bad)} of {len(self.replies)} servers: " + "; ".join(
                f"{u}: {r.get('error') or r.get('message') or r}" for u, r in bad.items()))
        return self.replies
