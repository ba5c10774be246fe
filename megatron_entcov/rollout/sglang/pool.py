"""The SGLang engine's servers: who is live, who gets the next request, and bringing dead servers back.

A server is ``live`` (serves and gets every sync), ``dead`` (exited, not answering /model_info, or a hung
scheduler), ``restarting`` (launched here: restarted in the background, at most ``max_restarts`` times) or
``stale`` (answering with weights that are not the trainer's; live after the next full sync). Given URLs are
never restarted, only re-admitted as stale when they answer again. Calls to every server (``post_all`` /
``settle``) drop servers that died and raise on any other failure.

Example:
    pool = ServerPool(servers, launch=launch_fn, max_restarts=2, is_current=lambda s: s.weights_version == v)
    s = pool.pick(avoid=None); ...; pool.release(s)      # least-loaded live server, counted in flight
    pool.mark_failure(s, err)         # dead? then restarted in the background when it was launched here
    servers = pool.post_all(pool.standing(), "/flush_cache", {})     # those still standing afterwards

Design notes: docs/design/rollout.md
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_entcov.rollout.sglang.http import Fanout, NoServerLeftError, ServerError, Waiter, http_json, sleep_waiter
from megatron_entcov.rollout.sglang.server import PortTaken, SGLangServer

logger = logging.getLogger(__name__)

__all__ = ["Server", "ServerPool", "LIVE", "DEAD", "RESTARTING", "STALE"]

LIVE, DEAD, RESTARTING, STALE = "live", "dead", "restarting", "stale"


@dataclass(eq=False)
class Server:
    """One server as the engine sees it (counters are cumulative over the engine's life)."""

    url: str
    index: int
    proc: SGLangServer | None = None        # None: not launched by this engine
    state: str = LIVE
    inflight: int = 0
    failures: int = 0
    restarts: int = 0
    weights_version: int | None = 0         # version of the weights its process loaded at launch
    last_error: str = ""
    generated_tokens: int = 0
    requests: int = 0
    history: list[str] = field(default_factory=list)   # past URLs (a restart moves to a fresh port)

    @property
    def alive(self) -> bool:
        return self.state == LIVE


class ServerPool:
    """Thread-safe bookkeeping of the engine's servers (states: the module docstring)."""

    def __init__(self, servers: list[Server], *, launch: Callable[[Server], SGLangServer] | None,
                 max_restarts: int, startup_timeout_s: float, is_current: Callable[[Server], bool],
                 on_ready: Callable[[Server], None] | None = None, health_timeout_s: float = 60.0,
                 waiter: Waiter | None = None):
        """
        Args:
            servers: the servers, all live.
            launch: starts a replacement process for a launched server (returns it started, not yet ready);
                None = never restart.
            max_restarts: restarts allowed per launched server.
            startup_timeout_s: how long a restarted server may take to answer.
            is_current: whether a restarted server holds the engine's current weights (it loaded the last
                synced weights, or no sync has happened yet): live at once; otherwise stale until the next
                full sync.
            on_ready: called with a restarted server once it answers, before it is used (the engine releases
                its memory there while the others' is released); an exception fails the restart.
            health_timeout_s: how long ``/health_generate`` may take after a failed generation request before
                the server counts as hung (SGLang itself answers 503 after 20 s without a scheduler reply).
            waiter: how ``pick`` sleeps while it waits for a restarting server (http.Waiter; it may raise to
                end the wait, e.g. on a stop signal); default: time.sleep.
        """
        self.servers = servers
        self._launch = launch
        self.max_restarts = int(max_restarts)
        self.startup_timeout_s = float(startup_timeout_s)
        self._is_current = is_current
        self._on_ready = on_ready
        self.health_timeout_s = float(health_timeout_s)
        self._waiter = waiter or sleep_waiter
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------------ views

    def live(self) -> list[Server]:
        """Live servers; a launched server whose process has exited is marked dead (and restarted) first."""
        for s in self.servers:
            if s.state == LIVE and s.proc is not None and not s.proc.alive():
                self._declare_dead(s, f"process exited (rc={s.proc.proc.returncode if s.proc.proc else None})")
        with self._lock:
            return [s for s in self.servers if s.state == LIVE]

    def standing(self) -> list[Server]:
        """Live and stale servers: those that answer (no probing of dead ones)."""
        self.live()
        with self._lock:
            return [s for s in self.servers if s.state in (LIVE, STALE)]

    def syncable(self) -> list[Server]:
        """Servers a weight sync goes to: ``standing()``, after re-admitting (as stale) given URLs that answer
        again."""
        for s in self.servers:
            if s.state == DEAD and s.proc is None:
                try:
                    http_json(s.url, "/model_info", timeout=2)
                except ServerError:
                    continue
                with self._lock:
                    s.state = STALE
                logger.warning("SGLangEngine: server %s answers again; it gets the next weight sync", s.url)
        return self.standing()

    def promote(self, servers: list[Server]) -> None:
        """A sync of every tensor reached these servers and their versions check out: stale ones are live."""
        self._move(servers, STALE, LIVE, "is live again with the current weights")

    def demote(self, servers: list[Server]) -> None:
        """Live servers that missed a sync (they came back during it) are stale until the next one."""
        self._move(servers, LIVE, STALE, "missed the last weight sync; stale until the next")

    def _move(self, servers: list[Server], old: str, new: str, why: str) -> None:
        with self._lock:
            for s in servers:
                if s.state == old:
                    s.state = new
                    logger.warning("SGLangEngine: server %s %s", s.url, why)

    def restarting(self) -> list[Server]:
        with self._lock:
            return [s for s in self.servers if s.state == RESTARTING]

    # ------------------------------------------------------------------------------------------------ requests

    def pick(self, avoid: Server | None) -> Server:
        """The least-loaded live server (another than ``avoid`` when there is one); counts it in flight. With
        none live but one restarting, waits for it (up to the start-up time-out): a server restarted from the
        current weights serves at once. The wait sleeps through the pool's waiter (which may end it)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.live() and self.restarting() and time.monotonic() < deadline and not self._closed:
            self._waiter(0.2, "a restarting SGLang server (every other server is dead)")
        live = self.live()
        with self._lock:
            live = [s for s in live if s.state == LIVE]
            if not live:
                pending = [s.url for s in self.servers if s.state in (RESTARTING, STALE)]
                more = (f" ({len(pending)} restarting or waiting for the next weight sync: {pending})"
                        if pending else "")
                raise NoServerLeftError("SGLangEngine: no SGLang server left" + more + ": " + "; ".join(
                    f"{s.url}: {s.last_error or s.state}" for s in self.servers))
            choices = [s for s in live if s is not avoid] or live
            best = min(choices, key=lambda s: s.inflight)
            best.inflight += 1
            return best

    def release(self, s: Server, *, tokens: int = 0, ok: bool = False) -> None:
        with self._lock:
            s.inflight -= 1
            if ok:
                s.requests += 1
                s.generated_tokens += tokens

    def mark_failure(self, s: Server, err: Exception, *, generation: bool = False) -> None:
        """Count a failure; a server whose process exited or whose /model_info does not answer is dead. With
        ``generation`` (a /generate request failed retryably), one whose scheduler does not answer
        /health_generate either is dead too: a hung scheduler behind a live HTTP front end would otherwise
        take every request it is given until each times out."""
        with self._lock:
            s.failures += 1
            s.last_error = str(err)
            if s.state != LIVE and s.state != STALE:
                return
        dead = s.proc is not None and not s.proc.alive()
        if not dead:
            # /model_info is answered by the HTTP process itself; /health goes through the scheduler, which a
            # paused server (a weight update) does not answer.
            try:
                http_json(s.url, "/model_info", timeout=10)
            except ServerError as probe_err:
                dead = probe_err.retryable
        why = str(err)
        if not dead and generation and getattr(err, "retryable", True):
            # Not during a weight sync (a paused scheduler does not answer): only after a generation failure.
            # SGLang answers 503 itself after SGLANG_HEALTH_CHECK_TIMEOUT (20 s) without a scheduler reply.
            try:
                http_json(s.url, "/health_generate", timeout=self.health_timeout_s)
            except ServerError as probe_err:
                dead = probe_err.retryable
                why = f"its scheduler does not answer (/model_info does; /health_generate: {probe_err}) after {err}"
                if dead:
                    with self._lock:
                        s.last_error = why
        if dead:
            self._declare_dead(s, why)

    # ------------------------------------------------------------------------------------------------ fan-out

    def post_all(self, servers: list[Server], path: str, payload: dict | Callable[[Server], dict], *,
                 timeout: float = 600.0, check: bool = True) -> list[Server]:
        """POST ``path`` to ``servers`` concurrently (``payload``: one dict, or a function of the server) and
        ``settle`` the replies: returns the servers still standing (live or stale) afterwards."""
        by_url = {s.url: s for s in servers}
        fan = Fanout(list(by_url), path, (lambda u: payload(by_url[u])) if callable(payload) else payload,
                     timeout=timeout)
        return self.settle(fan, servers, check=check)

    def settle(self, fan: Fanout, servers: list[Server], *, check: bool = True) -> list[Server]:
        """Wait for a fan-out to ``servers`` (started by the caller, who may work while the servers wait on it):
        each server whose call failed retryably is ``mark_failure``d, so a dead one drops out (and is restarted
        when launched here). Returns the servers still standing. With ``check``, any other failure of a
        standing server (an error reply, HTTP 4xx, a time-out on a server that still answers) raises
        RuntimeError naming the server and the path."""
        by_url = {s.url: s for s in servers}
        bad = fan.failures()
        for url, reply in bad.items():
            err = reply.get("error")
            if isinstance(err, ServerError) and err.retryable and url in by_url:
                self.mark_failure(by_url[url], err)
        standing = [s for s in servers if s.state in (LIVE, STALE)]
        real = {u: r for u, r in bad.items() if by_url.get(u) in standing}
        if check and real:
            raise RuntimeError(f"SGLangEngine: {fan.path} failed on " + "; ".join(
                f"{u}: {r.get('error') or r.get('message') or r}" for u, r in real.items()))
        return standing

    # ------------------------------------------------------------------------------------------------ restarts

    def _declare_dead(self, s: Server, why: str) -> None:
        with self._lock:
            if s.state not in (LIVE, STALE):
                return
            s.state = DEAD
            s.last_error = s.last_error or why
            restart = (self._launch is not None and s.proc is not None and s.restarts < self.max_restarts
                       and not self._closed)
            if restart:
                s.state = RESTARTING
                s.restarts += 1
        left = sum(x.state == LIVE for x in self.servers)
        logger.warning("SGLangEngine: server %s is dead (%s); its requests go to the other %d live servers%s",
                       s.url, why, left, f"; restarting it ({s.restarts}/{self.max_restarts})" if restart else "")
        if restart:
            t = threading.Thread(target=self._restart, args=(s,), daemon=True, name=f"sglang-restart{s.index}")
            self._threads.append(t)
            t.start()

    def _restart(self, s: Server) -> None:
        old = s.proc
        try:
            old.stop()
            for attempt in range(3):              # a port taken in between: launch again on a new one
                proc = self._launch(s)              # started, not ready yet
                with self._lock:
                    closed = self._closed
                    if not closed:
                        s.proc = proc                   # close() stops it from now on
                if closed:
                    proc.stop()
                    return
                try:
                    proc.wait_ready(self.startup_timeout_s)
                    break
                except PortTaken:
                    if attempt == 2:
                        raise
            with self._lock:                            # on_ready sends to the new process's URL
                s.history.append(s.url)
                s.url = proc.url
            if self._on_ready is not None:
                self._on_ready(s)
        except Exception as err:          # noqa: BLE001 - reported in the server's state, never raised
            if s.proc is not old:
                s.proc.stop()                 # started but unusable: do not leave it holding memory
            with self._lock:
                s.state = DEAD
                s.last_error = f"restart failed: {err}"
            if not self._closed:
                logger.error("SGLangEngine: restarting server %d failed: %s", s.index, err)
            return
        with self._lock:
            if self._closed:
                return
            s.state = LIVE if self._is_current(s) else STALE
        logger.warning("SGLangEngine: server %d restarted at %s after %.1f s (%s)", s.index, s.url,
                       proc.startup_s or 0.0, "live" if s.state == LIVE else "stale until the next weight sync")

    def wait_restarts(self, timeout_s: float) -> bool:
        """Block until no restart is in progress (or the time-out); True when none is left."""
        for t in list(self._threads):
            t.join(timeout=timeout_s)
        return not self.restarting()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for s in self.servers:
            if s.proc is not None:
                s.proc.stop()
            s.state = DEAD
