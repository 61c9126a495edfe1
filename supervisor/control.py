"""The control API: HTTP+JSON on a Unix socket, for `corral ls/show/kill/release/status/drain`.

The socket is created 0600 (or 0660 with `control_socket_mode = 0o660`): whoever
can open it can kill sessions. A stale socket of a crashed run is replaced; a live
one means another supervisor owns it, and this one refuses to start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

import msgspec
from aiohttp import web

from corral.protocol.control import DrainResult, ErrorBody
from corral.protocol.types import InvalidSessionKey, check_session_key
from corral.supervisor import views
from corral.supervisor.supervisor import Supervisor, UnknownSession

log = logging.getLogger("corral.control")
_json = msgspec.json.Encoder()


class ControlSocketBusy(Exception):
    pass


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

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/sessions", self.list_sessions)
        r.add_get("/v1/sessions/{session}", self.show)
        r.add_post("/v1/sessions/{session}/kill", self.kill)
        r.add_post("/v1/sessions/{session}/release", self.release)
        r.add_post("/v1/drain", self.drain)
        return app

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
        return _respond(views.session_list(self.sup))

    async def show(self, request: web.Request) -> web.Response:
        try:
            key = self._session_key(request)
        except InvalidSessionKey as e:
            return _error(400, str(e))
        if self.sup.sessions.get(key) is None:
            return _error(
                404,
                f"no session {request.match_info['session']!r}: no worker, nothing queued",
            )
        return _respond(views.session_info(self.sup, key))

    async def kill(self, request: web.Request) -> web.Response:
        force = request.query.get("force", "") in ("1", "true", "yes")
        try:
            result = await self.sup.kill_session(self._session_key(request), force)
        except InvalidSessionKey as e:
            return _error(400, str(e))
        except UnknownSession:
            return _error(404, f"session {request.match_info['session']!r} has no worker")
        return _respond(result)

    async def release(self, request: web.Request) -> web.Response:
        try:
            released = await self.sup.release(self._session_key(request))
        except InvalidSessionKey as e:
            return _error(400, str(e))
        if not released:
            return _error(404, f"session {request.match_info['session']!r} is not quarantined")
        return _respond(views.session_info(self.sup, request.match_info["session"]))

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
