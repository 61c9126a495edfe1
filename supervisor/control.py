"""The control API: HTTP+JSON on a Unix socket, for `corral ls/show/history/kill/release/
status/drain/reload/dead-letters`.

The socket is created 0600 (or 0660 with `control_socket_mode = 0o660`): whoever
can open it can kill sessions. A stale socket of a crashed run is replaced; a live
one means another supervisor owns it, and this one refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec
from aiohttp import web

from corral.protocol.control import DrainResult, ErrorBody, RetryRequest, RetryResult
from corral.protocol.types import InvalidSessionKey, check_session_key
from corral.supervisor import sandbox, views
from corral.supervisor.supervisor import Supervisor, UnknownSession

if TYPE_CHECKING:
    from corral.supervisor.reload import Reloader

log = logging.getLogger("corral.control")
_json = msgspec.json.Encoder()
T = TypeVar("T")

HISTORY_LIMIT = 50  # messages `corral history` shows by default
DEAD_LETTER_LIMIT = 1000
LIMIT_MAX = 100_000
PEER_CHECK_TIMEOUT = 2.0  # the proc thread walks the peer's ancestry in /proc


class ControlSocketBusy(Exception):
    pass


class Refusal(Exception):
    """Answer the request with this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _stored(query: Awaitable[T]) -> T:
    """A store query's answer; a store that cannot answer is a 503 that says so."""
    try:
        return await query
    except Exception as e:
        log.error("control: a store query failed: %s", e)
        raise Refusal(503, f"the store cannot answer: {e}") from None


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= LIMIT_MAX:
        raise Refusal(400, f"limit must be a whole number from 1 to {LIMIT_MAX}, got {raw!r}")
    return int(raw)


def _respond(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _respond(ErrorBody(message), status)


def bind_control_socket(path: Path, mode: int) -> socket.socket:
    """Bind the control socket with `mode` from the start (no window with wider access)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ControlSocketBusy(
                f"{path} exists and is not a socket: remove it or choose another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink(missing_ok=True)  # left by a run that did not stop cleanly
        else:
            raise ControlSocketBusy(f"another corral is serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


class ControlServer:
    def __init__(self, supervisor: Supervisor, path: Path, mode: int) -> None:
        self.sup = supervisor
        self.path = path
        self.mode = mode
        self._runner: web.AppRunner | None = None
        self.reloader: Reloader | None = None  # set by `serve`

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.no_workers, self.refusals])
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/sessions", self.list_sessions)
        r.add_get("/v1/sessions/{session}", self.show)
        r.add_get("/v1/sessions/{session}/history", self.history)
        r.add_post("/v1/sessions/{session}/kill", self.kill)
        r.add_post("/v1/sessions/{session}/release", self.release)
        r.add_post("/v1/drain", self.drain)
        r.add_post("/v1/reload", self.reload)
        r.add_get("/v1/dead-letters", self.dead_letters)
        r.add_post("/v1/dead-letters/retry", self.retry_dead_letters)
        return app

    @web.middleware
    async def refusals(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refusal as e:
            return _error(e.status, str(e))
        except InvalidSessionKey as e:
            return _error(400, str(e))

    @web.middleware
    async def no_workers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if await self.peer_is_a_worker(request):
            return _error(403, "the control socket does not answer corral's workers or agents")
        return await handler(request)

    async def peer_is_a_worker(self, request: web.Request) -> bool:
        """Whether the peer (SO_PEERCRED) is a worker, or anything a worker started.

        Landlock cannot keep a worker from connect()ing to a pathname socket, so this
        check is what keeps agents from listing, killing and draining. Fails closed.
        """
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return True
        try:
            pid, uid, pidfd = sandbox.peer(sock)
        except OSError:
            return True
        try:
            async with asyncio.timeout(PEER_CHECK_TIMEOUT):
                return await self.sup.procs.run(lambda: sandbox.started_by_us(pid, uid, pidfd))
        except TimeoutError:
            return True
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    async def start(self) -> None:
        sock = bind_control_socket(self.path, self.mode)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, shutdown_timeout=0.5).start()
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _session_key(self, request: web.Request) -> str:
        return check_session_key(request.match_info["session"])

    async def status(self, request: web.Request) -> web.Response:
        return _respond(views.status(self.sup))

    async def list_sessions(self, request: web.Request) -> web.Response:
        if request.query.get("all", "") not in ("1", "true", "yes"):
            return _respond(views.session_list(self.sup))
        stored = await _stored(views.stored_sessions(self.sup))
        return _respond(views.session_list(self.sup, stored))

    async def show(self, request: web.Request) -> web.Response:
        key = self._session_key(request)
        live = self.sup.sessions.get(key) is not None
        try:
            stored = await _stored(views.stored_sessions(self.sup, key))
        except Refusal:
            if not live:
                raise
            stored = []  # a live session is shown without the store's part
        if not live and not stored:
            return _error(
                404,
                f"no session {request.match_info['session']!r}: no worker, nothing queued, "
                "and the store has no message or record of it",
            )
        return _respond(views.session_info(self.sup, key, stored[0] if stored else None))

    async def history(self, request: web.Request) -> web.Response:
        key = self._session_key(request)
        limit = _limit(request, HISTORY_LIMIT)
        return _respond(await _stored(views.stored_history(self.sup, key, limit)))

    async def dead_letters(self, request: web.Request) -> web.Response:
        limit = _limit(request, DEAD_LETTER_LIMIT)
        return _respond(await _stored(views.stored_dead_letters(self.sup, limit)))

    async def retry_dead_letters(self, request: web.Request) -> web.Response:
        """Put dead letters back into delivery (Supervisor.retry_dead_letters)."""
        try:
            asked = msgspec.json.decode(await request.read(), type=RetryRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise Refusal(400, f"invalid retry request: {e}") from None
        if asked.all == bool(asked.ids):
            raise Refusal(400, "name the replies to retry, or all of them: not both, not neither")
        ids = await _stored(self.sup.retry_dead_letters(None if asked.all else asked.ids))
        done = set(ids)
        return _respond(RetryResult(ids, [i for i in asked.ids if i not in done]))

    async def kill(self, request: web.Request) -> web.Response:
        force = request.query.get("force", "") in ("1", "true", "yes")
        try:
            result = await self.sup.kill_session(self._session_key(request), force)
        except UnknownSession:
            return _error(404, f"session {request.match_info['session']!r} has no worker")
        return _respond(result)

    async def release(self, request: web.Request) -> web.Response:
        released = await self.sup.release(self._session_key(request))
        if not released:
            return _error(404, f"session {request.match_info['session']!r} is not quarantined")
        return _respond(views.session_info(self.sup, request.match_info["session"]))

    async def reload(self, request: web.Request) -> web.Response:
        """Re-read the config (as SIGHUP does); 409 with the reason if it is refused."""
        if self.reloader is None:
            return _error(503, "this supervisor cannot reload")
        result = await self.reloader.reload()
        return _respond(result, 409 if result.error else 200)

    async def drain(self, request: web.Request) -> web.Response:
        raw = request.query.get("timeout")
        timeout = None
        if raw is not None:
            try:
                timeout = float(raw)
            except ValueError:
                return _error(400, f"timeout must be a number of seconds, got {raw!r}")
            if not 0 <= timeout <= 86400:
                return _error(400, "timeout must be between 0 and 86400 seconds")
        self.sup.request_stop(timeout)
        return _respond(DrainResult(True, self.sup.drain_timeout), 202)
