"""corral's own minimal Telegram Bot API client, on aiohttp and msgspec.

Only the methods corral uses (getMe, deleteWebhook, getUpdates, sendMessage,
sendChatAction), typed at the edge. Why not a framework: both popular ones confirm
an update to Telegram before the application has stored it (design/telegram.md).

Two rules that other gateways learnt the hard way:
- the long poll has a connection pool of its own, never shared with sends (a poll
  holding the only connection starved the sends, or a torn-down poll left the pool
  checked out forever), and every call has a client deadline: the poll's is above
  its server-side `timeout`;
- the token is part of every URL, so no exception text, log line or repr here ever
  contains a URL or the token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import aiohttp
import msgspec

log = logging.getLogger("corral.telegram.api")

T = TypeVar("T")

DEFAULT_API_URL = "https://api.telegram.org"
REQUEST_TIMEOUT = 15.0  # every call but the long poll
POLL_MARGIN = 10.0  # the long poll's client deadline is its server timeout plus this
MAX_RESPONSE = 16 * 1024 * 1024  # 100 updates of 4096-character messages fit well below


# ---- types (only the fields corral reads; unknown fields are ignored)


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    is_bot: bool = False
    first_name: str = ""
    username: str | None = None


class Chat(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    type: str  # "private" | "group" | "supergroup" | "channel"
    title: str | None = None
    username: str | None = None
    is_forum: bool = False


class Message(msgspec.Struct, frozen=True, kw_only=True):
    message_id: int
    chat: Chat
    date: int = 0
    from_: User | None = msgspec.field(default=None, name="from")
    message_thread_id: int | None = None
    is_topic_message: bool = False
    text: str | None = None
    caption: str | None = None
    reply_to_message: Message | None = None


class Update(msgspec.Struct, frozen=True, kw_only=True):
    update_id: int
    message: Message | None = None
    edited_message: Message | None = None
    channel_post: Message | None = None
    edited_channel_post: Message | None = None


class ResponseParameters(msgspec.Struct, frozen=True, kw_only=True):
    migrate_to_chat_id: int | None = None
    retry_after: int | None = None


class Response(msgspec.Struct, Generic[T], frozen=True, kw_only=True):
    """The envelope of every Bot API answer."""

    ok: bool
    result: T | None = None
    error_code: int | None = None
    description: str | None = None
    parameters: ResponseParameters | None = None


class _Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """Response with its result left undecoded until the method's type is known."""

    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error_code: int | None = None
    description: str | None = None
    parameters: ResponseParameters | None = None


class _UpdateId(msgspec.Struct):
    update_id: int


class ReplyParameters(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    message_id: int
    allow_sending_without_reply: bool = True  # the quoted message may be gone by now


# ---- errors


class TelegramError(Exception):
    """A Bot API call failed; the text never contains the token or a URL."""

    def __init__(self, method: str, message: str) -> None:
        super().__init__(f"{method}: {message}")
        self.method = method


class ApiError(TelegramError):
    """Telegram answered `ok: false` (or a non-JSON HTTP error)."""

    def __init__(
        self,
        method: str,
        error_code: int,
        description: str,
        retry_after: int | None = None,
        migrate_to_chat_id: int | None = None,
    ) -> None:
        super().__init__(method, f"{error_code} {description}")
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after
        self.migrate_to_chat_id = migrate_to_chat_id


class NetworkError(TelegramError):
    """No usable answer: connection refused or dropped, client deadline passed, garbage."""


# ---- client


_encode = msgspec.json.Encoder().encode
_envelope = msgspec.json.Decoder(_Envelope)
_update = msgspec.json.Decoder(Update)
_update_id = msgspec.json.Decoder(_UpdateId)


class BotApi:
    """One bot's Bot API client: a session for the long poll and one for everything else.

    `api_url` may point to a local Bot API server or a fake (tests). Close with `close()`.
    """

    def __init__(
        self, token: str, api_url: str = DEFAULT_API_URL, request_timeout: float = REQUEST_TIMEOUT
    ) -> None:
        if not token:
            raise ValueError("empty bot token")
        self._token = token
        self._base = api_url.rstrip("/")
        self.request_timeout = request_timeout
        self._poll_http: aiohttp.ClientSession | None = None
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"BotApi({self._base!r}, token=<redacted>)"

    def redact(self, text: str) -> str:
        return text.replace(self._token, "<token>")

    def _session(self, poll: bool) -> aiohttp.ClientSession:
        if poll:
            if self._poll_http is None or self._poll_http.closed:
                # one connection: only one getUpdates may be in flight per token anyway
                self._poll_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            return self._poll_http
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self._http

    async def close(self) -> None:
        for http in (self._poll_http, self._http):
            if http is not None and not http.closed:
                await http.close()
        self._poll_http = self._http = None

    async def __aenter__(self) -> BotApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call_raw(
        self, method: str, params: dict[str, Any], deadline: float, poll: bool = False
    ) -> msgspec.Raw:
        """POST `params` as JSON; the `result` of an `ok` answer, undecoded."""
        body = _encode({k: v for k, v in params.items() if v is not None})
        http = self._session(poll)
        try:
            async with asyncio.timeout(deadline):
                async with http.post(
                    f"{self._base}/bot{self._token}/{method}",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    data = await resp.content.read(MAX_RESPONSE + 1)
        except TimeoutError:
            raise NetworkError(method, f"no answer within {deadline:.0f}s") from None
        except (aiohttp.ClientError, OSError) as e:
            # aiohttp's texts may carry the URL: never let them (or the chained
            # exception, with its traceback) out unredacted
            raise NetworkError(method, self.redact(f"{type(e).__name__}: {e}")) from None
        if len(data) > MAX_RESPONSE:
            raise NetworkError(method, f"answer larger than {MAX_RESPONSE} bytes")
        try:
            answer = _envelope.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            if status >= 400:
                raise ApiError(method, status, f"HTTP {status}") from None
            raise NetworkError(method, f"HTTP {status}: not a Bot API answer") from None
        if not answer.ok:
            p = answer.parameters or ResponseParameters()
            raise ApiError(
                method,
                answer.error_code or status,
                self.redact(answer.description or f"HTTP {status}"),
                retry_after=p.retry_after,
                migrate_to_chat_id=p.migrate_to_chat_id,
            )
        return answer.result

    async def _call(
        self, method: str, params: dict[str, Any], kind: type[T], deadline: float | None = None
    ) -> T:
        raw = await self._call_raw(method, params, deadline or self.request_timeout)
        try:
            return msgspec.json.decode(raw, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise NetworkError(method, f"unexpected result: {e}") from None

    # ---- methods

    async def get_me(self) -> User:
        return await self._call("getMe", {}, User)

    async def delete_webhook(self, drop_pending_updates: bool = False) -> bool:
        return await self._call(
            "deleteWebhook", {"drop_pending_updates": drop_pending_updates}, bool
        )

    async def get_updates(
        self,
        offset: int | None = None,
        timeout: int = 25,
        limit: int = 100,
        allowed_updates: Sequence[str] | None = None,
    ) -> list[Update]:
        """Long-poll for updates (on the poll session, deadline `timeout` + POLL_MARGIN).

        An update that does not decode is returned as a bare Update (its id only),
        so one odd update can never wedge the poller: it is skipped and confirmed.
        """
        params = {
            "offset": offset,
            "timeout": timeout,
            "limit": limit,
            "allowed_updates": list(allowed_updates) if allowed_updates is not None else None,
        }
        raws = await self._call_raw("getUpdates", params, timeout + POLL_MARGIN, poll=True)
        try:
            items = msgspec.json.decode(raws, type=list[msgspec.Raw])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise NetworkError("getUpdates", f"unexpected result: {e}") from None
        updates = []
        for raw in items:
            try:
                updates.append(_update.decode(raw))
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                try:
                    bare = _update_id.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    raise NetworkError("getUpdates", f"an update without update_id: {e}") from None
                log.warning("update %d does not decode (%s): skipped", bare.update_id, e)
                updates.append(Update(update_id=bare.update_id))
        return updates

    async def send_message(
        self,
        chat_id: int | str,
        text: str,
        message_thread_id: int | None = None,
        reply_to_message_id: int | None = None,
        parse_mode: str | None = None,
    ) -> Message:
        reply = (
            ReplyParameters(message_id=reply_to_message_id)
            if reply_to_message_id is not None
            else None
        )
        return await self._call(
            "sendMessage",
            {
                "chat_id": chat_id,
                "text": text,
                "message_thread_id": message_thread_id,
                "reply_parameters": reply,
                "parse_mode": parse_mode,
            },
            Message,
        )

    async def send_chat_action(
        self, chat_id: int | str, action: str = "typing", message_thread_id: int | None = None
    ) -> bool:
        return await self._call(
            "sendChatAction",
            {"chat_id": chat_id, "action": action, "message_thread_id": message_thread_id},
            bool,
        )
