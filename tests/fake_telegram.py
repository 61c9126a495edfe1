"""A fake Telegram Bot API on 127.0.0.1 that speaks the real protocol.

`/bot<TOKEN>/<METHOD>` with parameters in the query string, a JSON body or a form
body (complex values JSON-encoded, as Telegram takes them); answers are
`{"ok": true, "result": ...}` or `{"ok": false, "error_code", "description",
"parameters"}`. Implemented: getMe, deleteWebhook, setWebhook, getWebhookInfo,
getUpdates (offset confirms and drops older updates, long polling up to `timeout`,
a newer getUpdates terminates an older one with 409, 409 while a webhook is set,
allowed_updates remembered), sendMessage (4096 UTF-16 limit, chat not found, bot
blocked (403), group upgraded to a supergroup (400 + migrate_to_chat_id), forum
topics and the General topic rule, parse errors, reply_parameters) and
sendChatAction.

Tests inject user messages (private chat, group, forum topic, edited, without text),
inject faults (an error status with retry_after, a stall, a dropped connection),
and read back every sendMessage and sendChatAction.

In a thread: `with FakeTelegram() as fake: fake.add_bot(TOKEN) ...` (every method
is thread-safe). As a process: `python -m tests.fake_telegram --token T` prints
`PORT <n>` and serves the same operations under `/_fake/<TOKEN>/...` (see `_control`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

UNAUTHORIZED = (401, "Unauthorized")
DEFAULT_UPDATES = frozenset(
    {"message", "edited_message", "channel_post", "edited_channel_post", "callback_query"}
)
CONFLICT_POLL = "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"  # noqa: E501
CONFLICT_WEBHOOK = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class ApiFailure(Exception):
    def __init__(
        self, code: int, description: str, parameters: dict[str, Any] | None = None
    ) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


class _Bot:
    def __init__(self, token: str, bot_id: int, username: str) -> None:
        self.token = token
        self.user = {"id": bot_id, "is_bot": True, "first_name": "Corral", "username": username}
        self.updates: list[dict[str, Any]] = []
        self.next_update_id = 100_000
        self.webhook_url = ""
        self.allowed = set(DEFAULT_UPDATES)
        self.chats: dict[int, dict[str, Any]] = {}
        self.topics: dict[int, set[int]] = {}
        self.message_ids: dict[int, int] = {}
        self.messages: dict[int, set[int]] = {}
        self.blocked: set[int] = set()
        self.migrated: dict[int, int] = {}
        self.flood_until: dict[int, float] = {}
        self.sent: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.early_sends: list[dict[str, Any]] = []  # sends during a retry_after we imposed
        self.conflicts = 0
        self.poll: object | None = None  # the getUpdates in flight; a newer one ends it
        self.changed = asyncio.Event()

    def new_message_id(self, chat_id: int) -> int:
        self.message_ids[chat_id] = n = self.message_ids.get(chat_id, 0) + 1
        self.messages.setdefault(chat_id, set()).add(n)
        return n


class _Fault:
    def __init__(self, method: str, times: int, chat_id: int | None, **how: Any) -> None:
        self.method = method
        self.times = times
        self.chat_id = chat_id
        self.how = how


class FakeTelegram:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._bots: dict[str, _Bot] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.requests_seen = 0

    # ---- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_route("*", "/_fake/{token}/{op}", self._control)
        return app

    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for bot in self._bots.values():  # bots added before the loop existed
            bot.changed = asyncio.Event()
        self._runner = web.AppRunner(
            self.app(), shutdown_timeout=1.0, handle_signals=False, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop_async(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> FakeTelegram:
        """Serve from a thread of its own; returns once listening."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as e:
                failed.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-telegram", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _notify(self, bot: _Bot) -> None:
        """Wake the long polls of `bot` (from any thread)."""

        def wake() -> None:
            bot.changed.set()
            bot.changed = asyncio.Event()

        if self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            wake()
        else:
            self._loop.call_soon_threadsafe(wake)

    # ---- test API (thread-safe)

    def add_bot(self, token: str, username: str = "corral_bot", bot_id: int | None = None) -> None:
        with self._lock:
            self._bots[token] = _Bot(token, bot_id or int(token.split(":")[0]), username)

    def _bot(self, token: str) -> _Bot:
        bot = self._bots.get(token)
        if bot is None:
            raise KeyError("no such bot; call add_bot first")
        return bot

    def user_message(
        self,
        token: str,
        chat_id: int,
        text: str | None = None,
        *,
        chat_type: str = "private",
        user_id: int | None = None,
        thread_id: int | None = None,
        is_forum: bool = False,
        caption: str | None = None,
        photo: bool = False,
        sticker: bool = False,
        edit_of: int | None = None,
        reply_to: int | None = None,
        title: str = "",
    ) -> dict[str, Any]:
        """A user writes to the bot; returns the update (as Telegram would send it).

        `thread_id` in a forum is a topic; in any other group it is a reply chain.
        `edit_of` makes it an edited_message of that message id.
        """
        with self._lock:
            bot = self._bot(token)
            chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
            if chat_type == "private":
                chat["first_name"] = "User"
                user_id = user_id or chat_id
            else:
                chat["title"] = title or f"group {chat_id}"
                if is_forum:
                    chat["is_forum"] = True
                user_id = user_id or 4242
            bot.chats[chat_id] = chat
            if edit_of is not None:
                message_id = edit_of
            else:
                message_id = bot.new_message_id(chat_id)
            msg: dict[str, Any] = {
                "message_id": message_id,
                "from": {"id": user_id, "is_bot": False, "first_name": "User"},
                "chat": chat,
                "date": int(time.time()),
            }
            if thread_id is not None:
                msg["message_thread_id"] = thread_id
                if is_forum:
                    msg["is_topic_message"] = True
                    bot.topics.setdefault(chat_id, set()).add(thread_id)
            if text is not None:
                msg["text"] = text
            if caption is not None:
                msg["caption"] = caption
            if photo:
                msg["photo"] = [
                    {"file_id": "AgAD", "file_unique_id": "u", "width": 90, "height": 90}
                ]
            if sticker:
                msg["sticker"] = {"file_id": "CAAD", "file_unique_id": "s", "type": "regular"}
            if reply_to is not None:
                msg["reply_to_message"] = {
                    "message_id": reply_to,
                    "chat": chat,
                    "date": int(time.time()),
                    "text": "earlier",
                }
            kind = "message"
            if edit_of is not None:
                kind = "edited_message"
                msg["edit_date"] = int(time.time())
            update = {"update_id": bot.next_update_id, kind: msg}
            bot.next_update_id += 1
            if kind in bot.allowed:  # Telegram does not even queue what the bot did not ask for
                bot.updates.append(update)
        self._notify(bot)
        return update

    def sent(self, token: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m) for m in self._bot(token).sent]

    def chat_actions(self, token: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._bot(token).actions]

    def requests(self, token: str, method: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [p for m, p in self._bot(token).requests if method in (None, m)]

    def pending_update_ids(self, token: str) -> list[int]:
        """Updates not confirmed yet (what a getUpdates without offset would return)."""
        with self._lock:
            return [u["update_id"] for u in self._bot(token).updates]

    def early_sends(self, token: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._bot(token).early_sends)

    def conflicts(self, token: str) -> int:
        with self._lock:
            return self._bot(token).conflicts

    def wait_sent(self, token: str, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until at least `n` messages were sent; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            sent = self.sent(token)
            if len(sent) >= n:
                return sent
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(sent)} of {n} messages sent after {timeout}s: {sent}")
            time.sleep(0.02)

    def fault(
        self,
        token: str,
        method: str,
        *,
        status: int | None = None,
        description: str = "",
        retry_after: int | None = None,
        migrate_to_chat_id: int | None = None,
        stall: float | None = None,
        drop: bool = False,
        times: int = 1,
        chat_id: int | None = None,
    ) -> None:
        """The next `times` calls of `method` (to `chat_id`, if given) fail this way:
        an error `status`, a `stall` of that many seconds before answering normally
        (or failing), or a connection closed without an answer (`drop`)."""
        with self._lock:
            self._bot(token)
            self._faults.setdefault(token, []).append(
                _Fault(
                    method,
                    times,
                    chat_id,
                    status=status,
                    description=description,
                    retry_after=retry_after,
                    migrate_to_chat_id=migrate_to_chat_id,
                    stall=stall,
                    drop=drop,
                )
            )

    def set_webhook(self, token: str, url: str) -> None:
        with self._lock:
            self._bot(token).webhook_url = url
        self._notify(self._bot(token))

    def block(self, token: str, chat_id: int) -> None:
        """The user blocks the bot: sends to that chat get 403."""
        with self._lock:
            self._bot(token).blocked.add(chat_id)

    def upgrade_to_supergroup(self, token: str, chat_id: int, new_chat_id: int) -> None:
        """A group becomes a supergroup: sends to the old id get 400 migrate_to_chat_id."""
        with self._lock:
            bot = self._bot(token)
            old = bot.chats.get(chat_id, {"id": chat_id, "type": "group", "title": "group"})
            bot.chats[new_chat_id] = {**old, "id": new_chat_id, "type": "supergroup"}
            bot.migrated[chat_id] = new_chat_id

    # ---- the Bot API

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            ctype = request.content_type
            if ctype == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    raise ApiFailure(400, "Bad Request: can't parse JSON") from None
                if not isinstance(body, dict):
                    raise ApiFailure(400, "Bad Request: parameters must be an object")
                params.update(body)
            elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                form = await request.post()
                params.update({k: v for k, v in form.items() if isinstance(v, str)})
        return params

    async def _api(self, request: web.Request) -> web.StreamResponse:
        self.requests_seen += 1
        token = request.match_info["token"]
        method = request.match_info["method"]
        bot = self._bots.get(token)
        try:
            if bot is None:
                raise ApiFailure(*UNAUTHORIZED)
            params = await self._params(request)
            with self._lock:
                bot.requests.append((method, params))
            handler = getattr(self, f"_m_{method.lower()}", None)
            if handler is None:
                raise ApiFailure(404, "Not Found")
            fault = self._take_fault(token, method, params)
            if fault is not None:
                if fault.how["stall"] is not None:
                    assert self._stopping is not None
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(fault.how["stall"]):
                            await self._stopping.wait()
                if fault.how["drop"]:
                    transport = request.transport
                    if transport is not None:
                        transport.abort()
                    return web.Response(status=500)
                if fault.how["status"] is not None:
                    p: dict[str, Any] = {}
                    if fault.how["retry_after"] is not None:
                        p["retry_after"] = fault.how["retry_after"]
                        chat = _int(params.get("chat_id"))
                        if chat is not None and fault.how["status"] == 429:
                            with self._lock:
                                bot.flood_until[chat] = time.time() + fault.how["retry_after"]
                    if fault.how["migrate_to_chat_id"] is not None:
                        p["migrate_to_chat_id"] = fault.how["migrate_to_chat_id"]
                    raise ApiFailure(fault.how["status"], fault.how["description"], p or None)
            result = await handler(bot, params)
        except ApiFailure as e:
            body: dict[str, Any] = {"ok": False, "error_code": e.code, "description": e.description}
            if e.parameters:
                body["parameters"] = e.parameters
            return web.json_response(body, status=e.code)
        return web.json_response({"ok": True, "result": result})

    def _take_fault(self, token: str, method: str, params: dict[str, Any]) -> _Fault | None:
        with self._lock:
            for f in self._faults.get(token, []):
                if f.method != method or f.times <= 0:
                    continue
                if f.chat_id is not None and _int(params.get("chat_id")) != f.chat_id:
                    continue
                f.times -= 1
                return f
        return None

    async def _m_getme(self, bot: _Bot, params: dict[str, Any]) -> Any:
        return bot.user

    async def _m_deletewebhook(self, bot: _Bot, params: dict[str, Any]) -> Any:
        with self._lock:
            bot.webhook_url = ""
            if _bool(params.get("drop_pending_updates")):
                bot.updates.clear()
        return True

    async def _m_setwebhook(self, bot: _Bot, params: dict[str, Any]) -> Any:
        with self._lock:
            bot.webhook_url = str(params.get("url", ""))
        self._notify(bot)
        return True

    async def _m_getwebhookinfo(self, bot: _Bot, params: dict[str, Any]) -> Any:
        with self._lock:
            return {"url": bot.webhook_url, "pending_update_count": len(bot.updates)}

    async def _m_getupdates(self, bot: _Bot, params: dict[str, Any]) -> Any:
        offset = _int(params.get("offset"))
        limit = min(max(_int(params.get("limit")) or 100, 1), 100)
        timeout = max(_int(params.get("timeout")) or 0, 0)
        allowed = params.get("allowed_updates")
        if isinstance(allowed, str):
            allowed = json.loads(allowed)
        ticket = object()
        with self._lock:
            if bot.webhook_url:
                raise ApiFailure(409, CONFLICT_WEBHOOK)
            if allowed is not None:
                bot.allowed = set(allowed) or set(DEFAULT_UPDATES)
            if offset is not None:
                if offset < 0:
                    bot.updates = bot.updates[offset:]
                else:  # confirmed: never returned again
                    bot.updates = [u for u in bot.updates if u["update_id"] >= offset]
            bot.poll = ticket
        self._notify(bot)  # an older poll still waiting ends with 409
        deadline = time.monotonic() + timeout
        while True:  # ends when there are updates, at the timeout, or when superseded
            with self._lock:
                if bot.poll is not ticket:
                    bot.conflicts += 1
                    raise ApiFailure(409, CONFLICT_POLL)
                if bot.webhook_url:
                    raise ApiFailure(409, CONFLICT_WEBHOOK)
                if bot.updates or time.monotonic() >= deadline:
                    bot.poll = None
                    return bot.updates[:limit]
                changed = bot.changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await changed.wait()

    def _check_chat(self, bot: _Bot, params: dict[str, Any]) -> int:
        raw = params.get("chat_id")
        chat_id = _int(raw)
        if chat_id is None:
            if raw in (None, ""):
                raise ApiFailure(400, "Bad Request: chat_id is empty")
            raise ApiFailure(400, "Bad Request: chat not found")
        if chat_id in bot.migrated:
            raise ApiFailure(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                {"migrate_to_chat_id": bot.migrated[chat_id]},
            )
        if chat_id in bot.blocked:
            raise ApiFailure(403, "Forbidden: bot was blocked by the user")
        if chat_id not in bot.chats:
            raise ApiFailure(400, "Bad Request: chat not found")
        return chat_id

    async def _m_sendmessage(self, bot: _Bot, params: dict[str, Any]) -> Any:
        with self._lock:
            chat_id = self._check_chat(bot, params)
            chat = bot.chats[chat_id]
            text = params.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ApiFailure(400, "Bad Request: message text is empty")
            if utf16_len(text) > 4096:
                raise ApiFailure(400, "Bad Request: message is too long")
            thread = _int(params.get("message_thread_id"))
            if thread is not None and chat.get("is_forum"):
                # the General topic is 1, but sendMessage must not name it
                if thread == 1 or thread not in bot.topics.get(chat_id, set()):
                    raise ApiFailure(400, "Bad Request: message thread not found")
            parse_mode = params.get("parse_mode")
            if parse_mode and (text.count("*") % 2 or text.count("_") % 2):
                raise ApiFailure(
                    400,
                    "Bad Request: can't parse entities: can't find end of the entity "
                    "starting at byte offset 0",
                )
            reply = params.get("reply_parameters")
            if isinstance(reply, str):
                reply = json.loads(reply)
            reply_to = _int(reply.get("message_id")) if isinstance(reply, dict) else None
            if reply_to is None:
                reply_to = _int(params.get("reply_to_message_id"))
            if reply_to is not None and reply_to not in bot.messages.get(chat_id, set()):
                allow = isinstance(reply, dict) and reply.get("allow_sending_without_reply")
                if not allow:
                    raise ApiFailure(400, "Bad Request: message to be replied not found")
            until = bot.flood_until.get(chat_id, 0.0)
            record = {
                "chat_id": chat_id,
                "text": text,
                "message_thread_id": thread,
                "reply_to_message_id": reply_to,
                "parse_mode": parse_mode,
                "at": time.time(),
            }
            if time.time() < until:
                bot.early_sends.append(record)
                raise ApiFailure(
                    429,
                    f"Too Many Requests: retry after {int(until - time.time()) + 1}",
                    {"retry_after": int(until - time.time()) + 1},
                )
            message_id = bot.new_message_id(chat_id)
            record["message_id"] = message_id
            bot.sent.append(record)
        msg: dict[str, Any] = {
            "message_id": message_id,
            "from": bot.user,
            "chat": chat,
            "date": int(time.time()),
            "text": text,
        }
        if thread is not None:
            msg["message_thread_id"] = thread
            if chat.get("is_forum"):
                msg["is_topic_message"] = True
        return msg

    async def _m_sendchataction(self, bot: _Bot, params: dict[str, Any]) -> Any:
        with self._lock:
            chat_id = self._check_chat(bot, params)
            bot.actions.append(
                {
                    "chat_id": chat_id,
                    "action": params.get("action"),
                    "message_thread_id": _int(params.get("message_thread_id")),
                    "at": time.time(),
                }
            )
        return True

    # ---- control API, for a fake in another process

    async def _control(self, request: web.Request) -> web.Response:
        token, op = request.match_info["token"], request.match_info["op"]
        body = await request.json() if request.can_read_body else {}
        if op == "bot":
            self.add_bot(token, **body)
            return web.json_response(True)
        try:
            if op == "message":
                return web.json_response(await asyncio.to_thread(self.user_message, token, **body))
            if op == "sent":
                return web.json_response(self.sent(token))
            if op == "actions":
                return web.json_response(self.chat_actions(token))
            if op == "pending":
                return web.json_response(self.pending_update_ids(token))
            if op == "fault":
                self.fault(token, **body)
                return web.json_response(True)
            if op == "webhook":
                self.set_webhook(token, body.get("url", ""))
                return web.json_response(True)
        except (KeyError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"error": f"unknown operation {op}"}, status=404)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    return None


def _bool(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))


@contextlib.contextmanager
def fake_telegram(*tokens: str) -> Iterator[FakeTelegram]:
    """A started fake with these bots; stopped on exit."""
    fake = FakeTelegram()
    for token in tokens:
        fake.add_bot(token)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Telegram Bot API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[])
    args = parser.parse_args()
    fake = FakeTelegram(port=args.port)
    for token in args.token:
        fake.add_bot(token)

    async def serve() -> None:
        await fake.start_async()
        print(f"PORT {fake.port}", flush=True)
        try:
            await asyncio.Event().wait()  # until SIGTERM/SIGINT ends the process
        finally:
            await fake.stop_async()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
