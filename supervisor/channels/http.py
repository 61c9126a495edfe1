"""The HTTP channel: JSON in, replies by `?wait` or by long-poll.

POST /v1/messages                      accept a message (202), or with ?wait=S its replies
GET  /v1/sessions/{session}/replies    long-poll this channel's replies of a session
GET  /healthz                          200 {"status": "ok"} while serving, 503 draining

/healthz needs no token: a load balancer's or kubelet's probe should not carry the
channel's secret (it would sit in probe configs and their logs), and the answer tells
nothing but "serving" or "draining". Everything else needs the token when one is set.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from corral.protocol.control import Health, MessageResult, ReplyOut
from corral.protocol.types import (
    ERROR,
    HTTP_CHANNEL,
    InvalidSessionKey,
    Origin,
    check_session_key,
)
from corral.supervisor import peers
from corral.supervisor.channels.http_server import (
    AcceptErrors,
    GuardedHandler,
    GuardedRunner,
    json_error,
)
from corral.supervisor.config import Config, split_listen
from corral.supervisor.inbox import Inbox
from corral.supervisor.logs import Burst, clean
from corral.supervisor.sandbox import checks_http_peers
from corral.supervisor.storethread import StoreError
from corral.supervisor.supervisor import Draining, IdConflict, QueueFull, Supervisor

log = logging.getLogger("corral.http")

CHANNEL = HTTP_CHANNEL
MAX_WAIT = 300.0
LINGER = 2.0
RETRY_AFTER_DRAINING = "5"


HEALTH_PATH = "/healthz"


def health(draining: bool) -> web.Response:
    """/healthz: 503 while draining, so a load balancer stops sending before intake
    closes for good and a probe sees the drain (not a dead process) for what it is."""
    if draining:
        return json_response(Health("draining"), 503, {"Retry-After": RETRY_AFTER_DRAINING})
    return json_response(Health("ok"))


class PostMessage(msgspec.Struct, forbid_unknown_fields=True):
    session: str
    text: str
    id: str | None = None


class WebhookMessage(msgspec.Struct, forbid_unknown_fields=True):
    session: str
    text: str
    id: str | None = None
    chat: str = ""
    thread: str = ""
    user: str = ""
    account: str = ""


class PolledReply(msgspec.Struct, omit_defaults=True):
    id: str
    in_reply_to: str
    text: str
    kind: str
    cursor: int
    markup: str = ""  # "html" or "markdown" when the agent asked; absent: plain text


class PollResult(msgspec.Struct):
    replies: list[PolledReply]
    cursor: int


_json = msgspec.json.Encoder()


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_json.encode(body), status=status, content_type="application/json", headers=headers
    )


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_error(status, message, headers)


class BadRequest(Exception):
    pass


class ClientGone(Exception):
    """The client closed its connection before its request body was in."""


class BodyTimeout(Exception):
    pass


def _lone_surrogate(body: bytes) -> str | None:
    """Which field of a JSON body msgspec refused holds a lone UTF-16 surrogate (a
    "\\ud800" escape with no pair: JSON allows the escape, Unicode has no such
    character); None if that is not why."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    for key, field in value.items():
        if isinstance(field, str):
            try:
                field.encode()
            except UnicodeEncodeError:
                return str(key)
    return None


def _number(
    request: web.Request, name: str, default: float | None, lo: float, hi: float
) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be between {lo:g} and {hi:g}")
    return value


ID_MAX = 200


def _closing(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


ORIGIN_FIELD_MAX = 1024  # origin fields ride along in every frame and reply


class HttpChannel:
    def __init__(self, supervisor: Supervisor, inbox: Inbox, config: Config) -> None:
        self.sup = supervisor  # accept
        self.inbox = inbox  # waits on turns and replies
        self.config = config
        self.token = config.channels.http.token
        self.max_text = int(config.limits.max_text)
        self.body_timeout = float(config.channels.http.body_timeout)
        self._runner: web.AppRunner | None = None
        self._accept_errors: AcceptErrors | None = None
        self.gone = Burst(log, logging.INFO)
        self.refused = Burst(log)
        self.check_failed = Burst(log)
        # no token: refuse connections whose other end a process corral started holds
        self.check_peers = checks_http_peers(config)

    async def peer_refusal(self, ours: tuple[str, int], theirs: tuple[str, int]) -> str | None:
        """Why the connection from `theirs` comes from an agent (None: it does not); on
        the proc thread. A lookup that fails allows the connection, once logged."""
        try:
            return await self.sup.procs.run(lambda: peers.refusal(ours, theirs))
        except Exception as e:
            self.check_failed.report("HTTP: cannot check a connection's peer: %s", e)
            return None

    def app(self) -> web.Application:
        # JSON escaping can grow text up to 6x; past that the text is too long anyway
        app = web.Application(
            client_max_size=self.max_text * 6 + 64 * 1024, middlewares=[self.guard]
        )
        app.router.add_post("/v1/messages", self.post_message)
        app.router.add_get("/v1/sessions/{session}/replies", self.get_replies)
        app.router.add_post("/v1/channels/{name}/messages", self.post_channel_message)
        app.router.add_get(HEALTH_PATH, self.healthz)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return health(self.sup.draining)

    async def start(self) -> None:
        http = self.config.channels.http
        host, port = split_listen(http.listen, "channels.http.listen")
        self._accept_errors = AcceptErrors(asyncio.get_running_loop())
        self._accept_errors.install()
        self._runner = GuardedRunner(
            self.app(),
            max_connections=http.max_connections,
            header_timeout=float(http.header_timeout),
            peer_check=self.peer_refusal if self.check_peers else None,
            keepalive_timeout=float(http.keepalive_timeout),
            # after an answer given before the body was read (413): how long the rest of
            # the body is read and dropped, so the client sees the answer, not a reset
            lingering_time=LINGER,
            access_log=None,
            handle_signals=False,
        )
        await self._runner.setup()
        await web.TCPSite(
            self._runner, host, port, shutdown_timeout=1.0, backlog=min(1024, http.max_connections)
        ).start()
        log.info("HTTP channel listening on %s", http.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._accept_errors is not None:
            self._accept_errors.uninstall()
            self._accept_errors = None

    @web.middleware
    async def guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, GuardedHandler) and (why := await protocol.peer_refusal()):
            self.refused.report("HTTP: refused a connection from %s: %s", request.remote, why)
            resp = error(403, f"{peers.REFUSED}: the connection's other end is {why}")
            resp.force_close()
            return resp
        if self.token and request.path != HEALTH_PATH:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return error(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'")
        try:
            return await handler(request)
        except BadRequest as e:
            return error(400, str(e))
        except InvalidSessionKey as e:
            return error(400, str(e))
        except web.HTTPRequestEntityTooLarge:
            resp = error(413, f"request body too large: text is limited to {self.max_text} bytes")
            resp.force_close()  # the rest of the body is not read
            return resp
        except BodyTimeout:
            # answered and closed here: aiohttp would otherwise linger reading the rest
            resp = error(408, f"the request body took longer than {self.body_timeout:g}s")
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            request.protocol.force_close()
            return resp
        except ClientGone:
            return error(400, "the client went away")  # nobody reads it
        except Draining:
            return error(
                503, "corral is draining; retry later", {"Retry-After": RETRY_AFTER_DRAINING}
            )
        except web.HTTPException as e:  # the router's 404 and 405, in JSON like the rest
            if e.status < 400:
                raise
            headers = {k: v for k, v in e.headers.items() if k.lower() == "allow"}
            what = {
                404: f"no such route: {request.method} {request.path}",
                405: f"method {request.method} is not allowed on {request.path}",
            }.get(e.status, e.reason)
            return error(e.status, what, headers)
        except StoreError as e:  # a full disk, a lost database: nothing was accepted
            return error(503, f"cannot store messages now: {e}; retry later", {"Retry-After": "5"})

    async def _read(self, request: web.Request) -> bytes:
        """The body, within body_timeout; a client gone mid-body is one log line."""
        try:
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except TimeoutError:
            self.gone.report(
                "HTTP: %s sent its body too slowly (channels.http.body_timeout)", request.remote
            )
            raise BodyTimeout() from None
        except (ConnectionError, HttpProcessingError) as e:
            if isinstance(e, HttpProcessingError) and not _closing(request):
                raise BadRequest(f"malformed request body: {e.message}") from None
            self.gone.report(
                "HTTP: %s went away in the middle of its request body (%s)",
                request.remote,
                clean(str(e) or type(e).__name__),
            )
            raise ClientGone() from None

    async def _decode(self, request: web.Request, kind: type[msgspec.Struct]) -> msgspec.Struct:
        body = await self._read(request)
        try:
            msg = msgspec.json.decode(body, type=kind)
        except msgspec.ValidationError as e:
            raise BadRequest(f"invalid message: {e}") from None
        except msgspec.DecodeError as e:
            if (field := _lone_surrogate(body)) is not None:
                raise BadRequest(
                    f"invalid JSON: {field} holds a lone UTF-16 surrogate (an unpaired "
                    "\\ud800-\\udfff escape), which is no Unicode character"
                ) from None
            raise BadRequest(f"invalid JSON: {e}") from None
        check_session_key(msg.session)  # type: ignore[attr-defined]
        if len(msg.text.encode()) > self.max_text:  # type: ignore[attr-defined]
            raise BadRequest(f"text too long: the limit is {self.max_text} bytes")
        if msg.id is not None and not (0 < len(msg.id) <= ID_MAX):  # type: ignore[attr-defined]
            raise BadRequest(f"id must be 1-{ID_MAX} characters")
        return msg

    async def post_message(self, request: web.Request) -> web.Response:
        msg = await self._decode(request, PostMessage)
        assert isinstance(msg, PostMessage)
        return await self._accept(request, msg.session, msg.text, msg.id, Origin(channel=CHANNEL))

    async def post_channel_message(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.config.channels.webhook:
            return error(404, f"no webhook channel named {name!r} is configured")
        msg = await self._decode(request, WebhookMessage)
        assert isinstance(msg, WebhookMessage)
        for field in ("chat", "thread", "user", "account"):
            if len(getattr(msg, field)) > ORIGIN_FIELD_MAX:
                raise BadRequest(f"{field} must be at most {ORIGIN_FIELD_MAX} characters")
        origin = Origin(
            channel=name, account=msg.account, chat=msg.chat, thread=msg.thread, user=msg.user
        )
        return await self._accept(request, msg.session, msg.text, msg.id, origin)

    async def _accept(
        self, request: web.Request, session: str, text: str, client_id: str | None, origin: Origin
    ) -> web.Response:
        wait = _number(request, "wait", None, 0, MAX_WAIT)
        try:
            accepted = await self.sup.accept(session, text, origin, client_id)
        except QueueFull as e:
            return error(429, f"{e}; retry later", {"Retry-After": "1"})
        except IdConflict as e:
            return error(409, str(e))
        message = accepted.message
        if wait is None:
            return json_response(MessageResult(message.id, message.session, "accepted"), 202)
        finished, known = await self.inbox.wait_turn(message.id, wait)
        replies = [ReplyOut(r.text, r.kind, r.markup) for r in known]
        if not finished:
            status = "pending"
        elif any(r.kind == ERROR for r in replies):
            status = "error"
        else:
            status = "done"
        return json_response(MessageResult(message.id, message.session, status, replies))

    async def get_replies(self, request: web.Request) -> web.Response:
        session = check_session_key(request.match_info["session"])
        after = int(_number(request, "after", 0, 0, 2**62) or 0)
        wait = _number(request, "wait", 0, 0, MAX_WAIT) or 0.0
        limit = int(_number(request, "limit", 100, 1, 1000) or 100)
        rows = await self.inbox.replies_after(session, CHANNEL, after, limit, wait)
        replies = [
            PolledReply(
                r.reply.id,
                r.reply.in_reply_to,
                r.reply.text,
                r.reply.kind,
                r.cursor,
                r.reply.markup,
            )
            for r in rows
        ]
        cursor = replies[-1].cursor if replies else after
        return json_response(PollResult(replies, cursor))
