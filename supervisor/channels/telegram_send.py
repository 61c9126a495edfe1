"""Telegram outbound: replies split to Telegram's limit and sent where they belong, with
per-chat backoff; and "typing…" while a turn runs. A part of the Telegram channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Mapping
from typing import Final

import msgspec

from corral.protocol.types import Origin
from corral.supervisor.channels.botapi import (
    ApiError,
    BotApi,
    NetworkError,
)
from corral.supervisor.config import TELEGRAM_CHANNEL, DeliveryConfig
from corral.supervisor.metrics import Metrics
from corral.supervisor.store import DEAD, DELIVERED, PENDING, StoredReply
from corral.supervisor.stores import AnyStore

log = logging.getLogger("corral.telegram")

CHANNEL: Final = TELEGRAM_CHANNEL
MAX_TEXT: Final = 4096  # UTF-16 code units, after entity parsing
GENERAL_TOPIC: Final = 1  # a forum's General topic: sendMessage must not name it
ALLOWED_UPDATES: Final = ("message",)  # edits are not new messages; nothing else is handled
POLL_TIMEOUT: Final = 25  # seconds Telegram holds a getUpdates open
ONLY_TEXT: Final = "Only text messages are handled here."

# ---- text


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, limit: int) -> int:
    """The longest prefix of `text` (in code points) that is at most `limit` UTF-16
    units; a code point is never cut, so neither is a surrogate pair."""
    units = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


_WORD_BREAK = re.compile(r"\s")


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """Split `text` into parts of at most `limit` UTF-16 code units, in order.

    Cut at the last paragraph break in the window, else the last line break, else the
    last whitespace, else between two code points; a break is used only if it keeps
    at least half the window (no tiny parts). The break itself is dropped. Parts that
    are only whitespace are left out (Telegram refuses empty text).
    """
    parts: list[str] = []
    rest = text
    while rest:
        if utf16_len(rest) <= limit:
            parts.append(rest)
            break
        window = _fit(rest, limit)
        cut, skip = window, 0
        for sep in ("\n\n", "\n"):
            at = rest.rfind(sep, 0, window)
            if at >= window // 2:
                cut, skip = at, len(sep)
                break
        else:
            spaces = [m.start() for m in _WORD_BREAK.finditer(rest, 0, window)]
            if spaces and spaces[-1] >= window // 2:
                cut, skip = spaces[-1], 1
        parts.append(rest[:cut])
        rest = rest[cut + skip :]
    return [p for p in parts if p.strip()]


# ---- outbound


def send_thread(origin: Origin) -> int | None:
    """message_thread_id for sendMessage: the topic, but never the General topic."""
    if not origin.thread or not origin.thread.lstrip("-").isdigit():
        return None
    topic = int(origin.thread)
    return None if topic == GENERAL_TOPIC else topic


def action_thread(origin: Origin) -> int | None:
    """message_thread_id for sendChatAction: the topic, General included."""
    if not origin.thread or not origin.thread.lstrip("-").isdigit():
        return None
    return int(origin.thread)


def reply_to_of(origin: Origin) -> int | None:
    """The message a reply quotes: in groups only (in a private chat it is plain)."""
    value = origin.reply_to
    if not value or not str(value).isdigit() or not origin.chat.startswith("-"):
        return None
    return int(value)


# an agent's reply markup (protocol.types.MARKUPS) as Telegram's parse_mode
PARSE_MODES = {"html": "HTML", "markdown": "MarkdownV2"}


class Outcome(msgspec.Struct, frozen=True):
    state: str  # DELIVERED | PENDING (retry at `retry_at`) | DEAD
    error: str = ""
    retry_at: float = 0.0
    flood: bool = False  # a 429: not a failure of the reply, and holds the whole chat


BATCH = 32  # chats with a send in flight at once, per channel


class TelegramDelivery:
    """Delivers the outbox's replies of channel "telegram" to the bots named in their
    origins' `account`. Shaped like WebhookDelivery: `run()` from the outbox, `wake`
    set on a new reply.

    One send in flight per chat (the parts of a reply, and the replies of a session,
    in order); a chat that is slow or rate limited holds up no other chat.
    """

    def __init__(
        self,
        bots: Mapping[str, BotApi],
        cfg: DeliveryConfig,
        store: AnyStore,
        metrics: Metrics,
        parse_mode: str | None = None,
    ) -> None:
        self.name = CHANNEL
        self.bots = bots
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.parse_mode = parse_mode  # None: plain text
        self.wake = asyncio.Event()
        self.held: dict[tuple[str, str], float] = {}  # chat -> no send before (429)
        self.migrated: dict[tuple[str, int], int] = {}  # (bot, old chat) -> supergroup

    async def run(self) -> None:
        inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        try:
            while True:  # ends when cancelled at close
                self.wake.clear()
                now = time.time()
                due = await self.store.due_deliveries(self.name, now, BATCH + len(inflight))
                skipped_until: float | None = None
                for stored in due:
                    chat = (stored.reply.origin.account, stored.reply.origin.chat)
                    if chat in inflight:
                        skipped_until = now + 1.0
                        continue
                    if (until := self.held.get(chat, 0.0)) > now:
                        skipped_until = min(skipped_until or until, until)
                        continue
                    if len(inflight) >= BATCH:
                        break
                    inflight[chat] = asyncio.create_task(self.deliver(stored))
                if due and skipped_until is None and len(inflight) < BATCH:
                    continue  # started all that was due: look again at once
                wait: float | None
                if due:
                    wait = max(0.0, (skipped_until or now + 1.0) - time.time())
                else:
                    next_at = await self.store.next_due(self.name)
                    wait = None if next_at is None else max(0.0, next_at - time.time())
                waker = asyncio.ensure_future(self.wake.wait())
                try:
                    await asyncio.wait(
                        {waker, *inflight.values()},
                        timeout=wait,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waker.cancel()
                for chat, task in list(inflight.items()):
                    if task.done():
                        del inflight[chat]
                        if not task.cancelled() and (e := task.exception()) is not None:
                            log.error("telegram delivery to chat %s failed: %r", chat[1], e)
        finally:
            for task in inflight.values():
                task.cancel()
            for task in inflight.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def deliver(self, stored: StoredReply) -> None:
        r = stored.reply
        attempts = stored.attempts + 1
        outcome = await self.send(stored)
        chat = (r.origin.account, r.origin.chat)
        if outcome.state == DELIVERED:
            await self.store.mark_delivery(r.id, DELIVERED, attempts)
            if utf16_len(r.text) > MAX_TEXT:  # sent in parts: their count is kept till now
                await self.store.set_reply_parts_sent(r.id, 0)
            self.metrics.delivered.labels(self.name).inc()
            return
        self.metrics.delivery_failures.labels(self.name).inc()
        if outcome.state == PENDING:
            age = time.time() - stored.age_from
            if not outcome.flood and attempts >= self.cfg.max_attempts:
                outcome = Outcome(DEAD, f"{outcome.error}: gave up after {attempts} attempts")
            elif age >= self.cfg.max_age:
                outcome = Outcome(DEAD, f"{outcome.error}: gave up after {age:.0f}s")
            else:
                if outcome.flood:
                    self.held[chat] = outcome.retry_at
                await self.store.mark_delivery(
                    r.id, PENDING, attempts, outcome.retry_at, outcome.error
                )
                log.info(
                    "telegram: reply %s: %s; retry in %.1fs",
                    r.id,
                    outcome.error,
                    outcome.retry_at - time.time(),
                )
                return
        await self.store.mark_delivery(r.id, DEAD, attempts, error=outcome.error)
        self.metrics.dead_letters.labels(self.name).inc()
        log.error("telegram: reply %s dead-lettered: %s", r.id, outcome.error)

    async def send(self, stored: StoredReply) -> Outcome:
        """Send what is left of a reply; what the outbox should do with it next."""
        r = stored.reply
        api = self.bots.get(r.origin.account)
        if api is None:
            return Outcome(DEAD, f"channels.telegram.{r.origin.account} is not configured")
        try:
            chat = int(r.origin.chat)
        except ValueError:
            return Outcome(DEAD, f"not a Telegram chat id: {r.origin.chat!r}")
        parts = split_text(r.text)
        if not parts:
            return Outcome(DELIVERED)  # nothing to show: Telegram refuses empty text
        done = await self.store.reply_parts_sent(r.id) if stored.attempts else 0
        try:
            for i in range(done, len(parts)):
                await self.send_part(
                    api,
                    r.origin,
                    chat,
                    parts[i],
                    reply_to_of(r.origin) if i == 0 else None,
                    r.markup,
                )
                if len(parts) > 1:
                    await self.store.set_reply_parts_sent(r.id, i + 1)
        except ApiError as e:
            return self.classify(e)
        except NetworkError as e:
            return Outcome(PENDING, str(e), time.time() + self._backoff(stored.attempts + 1))
        return Outcome(DELIVERED)

    async def send_part(
        self,
        api: BotApi,
        origin: Origin,
        chat: int,
        text: str,
        reply_to: int | None,
        markup: str = "",
    ) -> None:
        chat = self.migrated.get((origin.account, chat), chat)
        # as the agent asked (ctx.reply(text, markup=...)), else plain text
        parse_mode = PARSE_MODES.get(markup, self.parse_mode)
        for _ in range(3):  # at most one migration and one fallback to plain text
            try:
                await api.send_message(
                    chat,
                    text,
                    message_thread_id=send_thread(origin),
                    reply_to_message_id=reply_to,
                    parse_mode=parse_mode,
                )
                return
            except ApiError as e:
                if e.migrate_to_chat_id is not None and e.migrate_to_chat_id != chat:
                    log.info("telegram: chat %s is now supergroup %s", chat, e.migrate_to_chat_id)
                    self.migrated[(origin.account, int(origin.chat))] = e.migrate_to_chat_id
                    chat = e.migrate_to_chat_id
                    continue
                if parse_mode and e.error_code == 400 and "can't parse entities" in e.description:
                    parse_mode = None  # the agent's markup is broken: show it as typed
                    continue
                raise

    def classify(self, e: ApiError) -> Outcome:
        now = time.time()
        if e.error_code == 429:
            # never sooner than Telegram says; a flood is not a failure of this reply
            wait = float(e.retry_after) if e.retry_after is not None else 1.0
            return Outcome(PENDING, str(e), now + wait, flood=True)
        if e.error_code >= 500 or e.error_code == 408:
            return Outcome(PENDING, str(e), now + self._backoff(1))
        # 400 chat/thread not found, 403 blocked or kicked, 401 token revoked: sending
        # again cannot help; the operator can retry the dead letter
        return Outcome(DEAD, f"{e}: not retried")

    def _backoff(self, attempts: int) -> float:
        delay = min(
            float(self.cfg.retry_max), float(self.cfg.retry_initial) * 2 ** max(0, attempts - 1)
        )
        return delay * random.uniform(0.5, 1.0)


# ---- typing


class Typing:
    """ "typing…" in a chat while its turn runs: `start(origin)` at the turn's start,
    `stop(origin)` at its end. Best effort: a failed call is dropped, never retried,
    and a reply never waits for it."""

    EVERY = 4.0  # Telegram shows an action for 5 s at most

    def __init__(self, bots: Mapping[str, BotApi], every: float = EVERY) -> None:
        self.bots = bots
        self.every = every
        self.tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}

    def start(self, origin: Origin) -> None:
        key = (origin.account, origin.chat, origin.thread)
        api = self.bots.get(origin.account)
        if origin.channel != CHANNEL or api is None or key in self.tasks:
            return
        task = asyncio.create_task(self._typing(api, origin), name=f"typing {origin.chat}")
        self.tasks[key] = task
        task.add_done_callback(lambda t: self.tasks.get(key) is t and self.tasks.pop(key))

    def stop(self, origin: Origin) -> None:
        task = self.tasks.pop((origin.account, origin.chat, origin.thread), None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _typing(self, api: BotApi, origin: Origin) -> None:
        try:
            chat = int(origin.chat)
        except ValueError:
            return
        while True:  # ends when stopped (cancelled), or when Telegram refuses the chat
            delay = self.every
            try:
                async with asyncio.timeout(self.every):
                    await api.send_chat_action(chat, "typing", action_thread(origin))
            except ApiError as e:
                if e.error_code != 429 and e.error_code < 500:
                    log.debug("typing in chat %s stopped: %s", chat, e)
                    return
                delay = max(delay, float(e.retry_after or 0))
            except (NetworkError, TimeoutError) as e:
                log.debug("typing in chat %s: %s", chat, e)
            await asyncio.sleep(delay)
