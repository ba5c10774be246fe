"""HTTP to SGLang servers: one JSON call (``http_json``), the bounded waits for a server (``BoundedWait``,
``wait_answering``), and one call fanned out to many servers at once (``Fanout``), with the errors the engine
and the weight transports raise.

Stdlib ``urllib`` + JSON (the trainer never imports sglang). A fan-out runs one thread per server; the weight
transports work while the servers wait on it, then wait for the replies. A wait logs what it waits for (first
miss, then every ``WAIT_LOG_INTERVAL_S``), ends at ``rollout.sglang.startup_timeout_s`` and sleeps through a
``Waiter`` (the trainer's ends it on a stop signal); an answer that is not SGLang's fails at once (``AttachError``).
Design notes: docs/design/rollout.md

Example:
    info = wait_answering(url, 600, name="rollout.sglang.server_urls[0]")   # SGLang's /model_info answer
    fan = Fanout(urls, "/update_weights_from_disk", {"model_path": d, "flush_cache": True}, timeout=600)
    fan.check()          # RuntimeError naming every server that failed and its reply
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from megatron_entcov.config.checks import shorten

logger = logging.getLogger(__name__)

__all__ = ["ServerError", "NoServerLeftError", "AttachError", "http_json", "Waiter", "sleep_waiter",
           "WAIT_LOG_INTERVAL_S", "STARTUP_LIMIT", "BoundedWait", "model_info_problem", "wait_answering", "Fanout"]

WAIT_LOG_INTERVAL_S = 15.0
"""Seconds between the log lines of a wait that goes on (the first comes at its first miss)."""
STARTUP_LIMIT = "rollout.sglang.startup_timeout_s"
"""The config key of the waits' limit, named in their messages."""
SGLANG_MODEL_INFO_KEYS = ("model_path", "is_generation")
"""Keys every SGLang server's /model_info answer holds (sglang/srt/entrypoints/http_server.py)."""

Waiter = Callable[[float, str], None]
"""``waiter(seconds, what)``: sleep between a wait's attempts; may raise to end the wait (run.stop.wait_or_stop
raises StopNow when the process is asked to stop). ``what`` names the wait."""


def sleep_waiter(seconds: float, what: str) -> None:
    """The default :data:`Waiter`: only sleeps."""
    time.sleep(seconds)


class ServerError(RuntimeError):
    """An HTTP call to a server failed. ``retryable`` is False for a request the server rejected (HTTP 4xx);
    ``reason`` is the failure without the URL."""

    def __init__(self, url: str, path: str, message: str, *, status: int | None = None, retryable: bool = True):
        super().__init__(f"{url}{path}: {message}")
        self.url, self.path, self.status, self.retryable, self.reason = url, path, status, retryable, message


class AttachError(ValueError):
    """A server to attach to (``rollout.sglang.server_urls``, ``router_url``) is not an SGLang server, or nothing
    answered there within the start-up limit: a config value to fix (a ValueError: the command prints its
    one line)."""


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
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        text = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
        raise ServerError(url, path, text) from None
    if not body:
        return {}
    try:
        return json.loads(body)
    except json.JSONDecodeError:          # some routes (/flush_cache) answer plain text
        return {"text": body.decode(errors="replace")}


class BoundedWait:
    """One wait for a server (start-up, a restart, a router's workers), up to ``timeout_s`` seconds: it logs
    what it waits for, for how long and what it got last, at the first miss and every ``log_every_s`` seconds
    (default :data:`WAIT_LOG_INTERVAL_S`), and sleeps between attempts through ``waiter``. ``limit`` names the
    setting of ``timeout_s`` in the messages.

    Example:
        wait = BoundedWait(f"the SGLang server at {url} to answer", 600.0, waiter=waiter)
        while not ready():
            if wait.expired(): raise ...(f"... within {wait.limit_text()}; last: {wait.last}")
            wait.pause(1.0, last="ConnectionRefusedError: [Errno 111] Connection refused")
    """

    def __init__(self, what: str, timeout_s: float, *, waiter: Waiter | None = None,
                 log_every_s: float | None = None, limit: str = STARTUP_LIMIT):
        self.what, self.timeout_s, self.limit = what, float(timeout_s), limit
        self.waiter = waiter or sleep_waiter
        self.log_every_s = WAIT_LOG_INTERVAL_S if log_every_s is None else float(log_every_s)
        self.last = ""
        self._t0 = time.monotonic()
        self._logged = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def expired(self) -> bool:
        return self.elapsed >= self.timeout_s

    def limit_text(self) -> str:
        return f"{self.timeout_s:g} s ({self.limit})"

    def pause(self, seconds: float, last: str) -> None:
        """After a miss that got ``last``: log when a line is due, then sleep ``seconds`` (never past the
        limit) through the waiter (which may raise to end the wait)."""
        self.last = last
        elapsed = self.elapsed
        if not self._logged or elapsed >= self._logged * self.log_every_s:
            log = logger.info if not self._logged else logger.warning
            log("waiting for %s: %.0f s of %s so far; last: %s", self.what, elapsed, self.limit_text(),
                shorten(last, 160))
            self._logged = int(elapsed // self.log_every_s) + 1
        self.waiter(max(0.0, min(seconds, self.timeout_s - elapsed)), self.what)


def model_info_problem(info) -> str | None:
    """None when ``info`` (an answer of GET /model_info, as http_json returns it) is SGLang's, else what it is."""
    if isinstance(info, dict) and set(info) == {"text"}:
        return f"a body that is not JSON: {shorten(' '.join(str(info['text']).split()), 120)}"
    if not isinstance(info, dict):
        return f"JSON that is not an object: {shorten(info, 120)}"
    missing = [k for k in SGLANG_MODEL_INFO_KEYS if k not in info]
    if missing:
        return f"JSON without SGLang's {missing}: {shorten(info, 120)}"
    return None


ATTACH_FIX = ("give the URL (http://HOST:PORT) of a running `python -m sglang.launch_server`, or leave "
              "rollout.sglang.server_urls empty to have the run launch its own servers")


def wait_answering(url: str, timeout_s: float, *, name: str, waiter: Waiter | None = None,
                   log_every_s: float | None = None, fix: str = ATTACH_FIX) -> dict:
    """Block until the server at ``url`` (the config's ``name`` for it, for the messages) answers
    ``/model_info`` as SGLang does, and return that answer. A refused connection, a time-out or HTTP 5xx is
    a server still starting: retried (logging, see :class:`BoundedWait`) until ``timeout_s``. Raises
    AttachError (ending with ``fix``) at once for HTTP 4xx or an answer that is not SGLang's, and after
    ``timeout_s``."""
    what = f"the SGLang server at {url} ({name}) to answer /model_info"
    wait = BoundedWait(what, timeout_s, waiter=waiter, log_every_s=log_every_s)
    here = f"{name}={shorten(url)}"
    while True:
        try:
            info = http_json(url, "/model_info", timeout=5)
        except ServerError as err:
            if not err.retryable:
                body = " ".join(err.reason.split())
                raise AttachError(f"{here} is not an SGLang server: GET /model_info answered {shorten(body, 160)}; "
                                  f"{fix}") from None
            last = err.reason
        else:
            problem = model_info_problem(info)
            if problem is None:
                return info
            raise AttachError(f"{here} is not an SGLang server: GET /model_info answered {problem}; {fix}")
        if wait.expired():
            raise AttachError(f"{here}: no SGLang server answered GET /model_info within "
                              f"{wait.limit_text()}; last: {shorten(last, 160)}; start the server (or fix the URL), "
                              f"or raise {STARTUP_LIMIT} if it is still loading")
        wait.pause(1.0, last)


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
