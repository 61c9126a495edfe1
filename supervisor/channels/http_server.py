"""The HTTP channel's connections: bounded in number and in time, errors in JSON.

aiohttp parses the request head before any handler or middleware runs, so what goes
wrong there (a malformed request line, an over-long header) is answered here, and the
deadlines that stop slow clients (a head or a body sent a byte at a time, an idle
keep-alive connection) are the connection's, not a handler's:

- `header_timeout`: from the first byte of a request to its complete head;
- `keepalive_timeout`: an idle connection (before its first request, or between two);
- `body_timeout`: the body, once the head is in (applied by the channel's handlers);
- `max_connections`: past it a new connection gets a 503 and is closed at once.

`peer_check` (no token): each connection's peer is looked up once, on the proc thread,
from its start; its first request waits for the verdict (supervisor/peers.py).

aiohttp's keep-alive timer also runs from the connection's start, so a client that
never sends a byte is closed after keepalive_timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from corral.supervisor.logs import Burst, clean

log = logging.getLogger("corral.http")

# (our address, the peer's) -> why the peer is refused, or None
PeerCheck = Callable[[tuple[str, int], tuple[str, int]], Awaitable[str | None]]
_json = msgspec.json.Encoder()


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_json.encode({"error": message}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = _json.encode({"error": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    )
    return head.encode() + body


class GuardedHandler(RequestHandler):
    """One connection: JSON for protocol errors, a header deadline, and the bound."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _peer: asyncio.Future[str | None] | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        server = self._manager
        assert isinstance(server, GuardedServer)
        if len(server.connections) > server.max_connections:
            server.too_many.report(
                "HTTP: more than %d connections (channels.http.max_connections): "
                "new ones get 503 and are closed",
                server.max_connections,
            )
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    "too many connections to corral's HTTP channel; retry later",
                )
            )
            self.force_close()
        elif server.peer_check is not None:
            ours, theirs = (
                transport.get_extra_info("sockname"),
                transport.get_extra_info("peername"),
            )
            if ours and theirs:  # TCP: the pair names the peer's socket
                self._peer = asyncio.ensure_future(server.peer_check(ours[:2], theirs[:2]))

    def data_received(self, data: bytes) -> None:
        # between requests (start() waits for one), or before the first: the handler
        # task may not have run yet when a connection's first bytes arrive
        idle = self._waiter is not None and not self._waiter.done()
        waiting = not self._messages and (idle or self._request_count == 0)
        before = self._request_count
        super().data_received(data)
        if data and waiting and self._request_count == before and self._header_timer is None:
            # the first bytes of a head: it must be complete within header_timeout
            self._header_timer = self._loop.call_later(
                self.header_timeout, self._header_expired, before
            )
        elif self._request_count != before and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_expired(self, count: int) -> None:
        self._header_timer = None
        if self._request_count == count and self.transport is not None:
            server = self._manager
            if isinstance(server, GuardedServer):
                server.slow.report(
                    "HTTP: closed a connection whose request head took longer than %gs "
                    "(channels.http.header_timeout)",
                    self.header_timeout,
                )
            self.transport.write(
                _raw_response(408, "Request Timeout", "the request head took too long")
            )
            self.force_close()

    async def peer_refusal(self) -> str | None:
        """Why this connection's peer may not use the channel (None: it may), once."""
        if self._peer is None:
            return None
        return await asyncio.shield(self._peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._peer is not None and not self._peer.done():
            self._peer.cancel()
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """What aiohttp answers itself: a request it cannot parse (400, one log line,
        no traceback: it is the client's fault) or a handler's crash (500, with the
        traceback: it is ours)."""
        if status == 500:
            log.error(
                "HTTP: error handling %s %s", request.method, clean(request.path), exc_info=exc
            )
            text = "internal error in corral (see its log)"
        else:
            why = message or (str(exc) if exc else "") or "malformed request"
            server = self._manager
            if isinstance(server, GuardedServer):
                server.malformed.report(
                    "HTTP: %d from %s: %s", status, request.remote, clean(why.splitlines()[0])
                )
            text = f"malformed HTTP request: {why.splitlines()[0][:200]}"
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started")
        resp = json_error(status, text)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's Server with GuardedHandler connections."""

    def __init__(
        self,
        handler: Callable[..., Any],
        *,
        max_connections: int,
        header_timeout: float,
        peer_check: PeerCheck | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.peer_check = peer_check
        self.too_many = Burst(log)
        self.slow = Burst(log, logging.INFO)
        self.malformed = Burst(log, logging.INFO)

    def __call__(self) -> RequestHandler:
        handler = GuardedHandler(self, loop=self._loop, **self._kwargs)
        handler.header_timeout = self.header_timeout
        return handler


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        header_timeout: float,
        peer_check: PeerCheck | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.peer_check = peer_check

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's start-up and freeze
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            max_connections=self.max_connections,
            header_timeout=self.header_timeout,
            peer_check=self.peer_check,
            **self._kwargs,
            debug=False,
        )


class AcceptErrors:
    """The loop's exception handler, wrapped: asyncio reports a failed accept() (out of
    file descriptors, say) on every retry, each second, with a traceback; this logs it
    once per burst, in one line. Everything else goes to the handler it wraps."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.previous = loop.get_exception_handler()
        self.burst = Burst(log, logging.ERROR)

    def install(self) -> None:
        self.loop.set_exception_handler(self)

    def uninstall(self) -> None:
        if self.loop.get_exception_handler() is self:
            self.loop.set_exception_handler(self.previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == self.MESSAGE:
            exc = context.get("exception")
            self.burst.report(
                "cannot accept connections: %s (asyncio retries each second; "
                "the rest of this burst is counted, not logged)",
                exc,
            )
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)
