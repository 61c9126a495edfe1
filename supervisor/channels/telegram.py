"""The Telegram channel: long polling in, the outbox out, typing while a turn runs.

Inbound, per bot (`Poller`): getMe, deleteWebhook, then getUpdates in a loop. Each
batch of updates is mapped to messages for sessions `telegram:NAME:CHAT` (or
`telegram:NAME:CHAT:TOPIC` with sessions = "topic") and handed to `accept`, which
commits the messages and the next offset in one store transaction
(`Store.accept_batch`). Only then is the next offset asked of Telegram, which is
what confirms the updates there: a crash at any moment re-fetches exactly what was
not stored, under the same message ids, so nothing is lost or accepted twice.

Outbound (`TelegramDelivery`, run like the webhook deliveries from the outbox): a
reply goes to the chat and topic of its origin and nowhere else, split under 4096
UTF-16 code units; Telegram's own answers decide what is retried (429 after
retry_after, 5xx, network), rewritten (a group upgraded to a supergroup) or
dead-lettered (blocked, chat not found).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, Final

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from corral.protocol.control import PollerHealth
from corral.protocol.types import Origin
from corral.supervisor.channels.botapi import (
    ApiError,
    BotApi,
    NetworkError,
    TelegramError,
    Update,
    User,
)
from corral.supervisor.channels.telegram_send import (
    CHANNEL,
    GENERAL_TOPIC,
    MAX_TEXT,
    ONLY_TEXT,
    TelegramDelivery,
    Typing,
    send_thread,
    split_text,
    utf16_len,
)
from corral.supervisor.config import DeliveryConfig, TelegramConfig
from corral.supervisor.metrics import Metrics
from corral.supervisor.store import Inbound
from corral.supervisor.stores import AnyStore

log = logging.getLogger("corral.telegram")


ALLOWED_UPDATES: Final = ("message",)  # edits are not new messages; nothing else is handled
POLL_TIMEOUT: Final = 25  # seconds Telegram holds a getUpdates open

# ---- updates -> messages


class Accept(msgspec.Struct, frozen=True):
    inbound: Inbound


class StopTurn(msgspec.Struct, frozen=True):
    """`/stop` in a chat: stop that session's running turn."""

    session: str
    origin: Origin


class Notice(msgspec.Struct, frozen=True):
    """Answer the chat directly, best effort (not a turn): e.g. a sticker in a private chat."""

    origin: Origin
    text: str


class Skip(msgspec.Struct, frozen=True):
    reason: str


Mapped = Accept | StopTurn | Notice | Skip


def session_key(bot: str, chat: int, topic: int | None = None) -> str:
    return f"telegram:{bot}:{chat}" if topic is None else f"telegram:{bot}:{chat}:{topic}"


def message_id(bot: str, update_id: int) -> str:
    """The inbox id of an update: fetched again after a crash, it is the same message."""
    return f"telegram:{bot}:{update_id}"


def cursor_name(bot: str) -> str:
    """The store's channel cursor of a bot (Store.accept_batch, Store.channel_offset)."""
    return f"telegram:{bot}"


def map_update(bot: str, cfg: TelegramConfig, update: Update, username: str = "") -> Mapped:
    """What an update is to corral: a message to accept, /stop, a notice, or nothing."""
    m = update.message
    if m is None:
        return Skip("edited message" if update.edited_message is not None else "not a message")
    chat = m.chat
    if cfg.allowed_chats and chat.id not in cfg.allowed_chats:
        return Skip(f"chat {chat.id} is not in allowed_chats")
    if chat.type == "channel" or (m.from_ is not None and m.from_.is_bot):
        return Skip("not from a user")
    # In a forum a message belongs to a topic (General, 1, when none is named). In any
    # other chat message_thread_id is only a reply chain and makes no session.
    topic: int | None = None
    if m.is_topic_message and m.message_thread_id is not None:
        topic = m.message_thread_id
    elif chat.is_forum:
        topic = GENERAL_TOPIC
    origin = Origin(
        channel=CHANNEL,
        account=bot,
        chat=str(chat.id),
        thread="" if topic is None else str(topic),
        user="" if m.from_ is None else str(m.from_.id),
        reply_to=str(m.message_id),
    )
    session = session_key(bot, chat.id, topic if cfg.sessions == "topic" else None)
    text = m.text if m.text is not None else m.caption
    if text is None or not text.strip():
        if chat.type == "private":
            return Notice(origin, ONLY_TEXT)
        return Skip("no text")
    command, _, addressee = text.split(maxsplit=1)[0].partition("@")
    if addressee and username and addressee.lower() != username.lower():
        return Skip(f"a command for @{addressee}")
    if command.lower() == "/stop":
        return StopTurn(session, origin)
    return Accept(
        Inbound(id=message_id(bot, update.update_id), session=session, text=text, origin=origin)
    )


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """What one getUpdates brought, for `accept`.

    `accept` must commit `messages` and `next_offset` under `cursor` in one
    transaction (Store.accept_batch) before it returns; then run `stops`.
    `next_offset` covers every update of the batch, skipped ones included.
    """

    bot: str
    cursor: str
    next_offset: int
    messages: list[Inbound]
    stops: list[StopTurn]


AcceptFn = Callable[[Batch], Awaitable[object]]
LoadOffsetFn = Callable[[], Awaitable[int | None]]


def make_batch(
    bot: str, cfg: TelegramConfig, updates: list[Update], username: str = ""
) -> tuple[Batch, list[Notice]]:
    messages: list[Inbound] = []
    stops: list[StopTurn] = []
    notices: list[Notice] = []
    for u in updates:
        mapped = map_update(bot, cfg, u, username)
        if isinstance(mapped, Accept):
            messages.append(mapped.inbound)
        elif isinstance(mapped, StopTurn):
            stops.append(mapped)
        elif isinstance(mapped, Notice):
            notices.append(mapped)
        else:
            log.debug("%s: update %d skipped: %s", bot, u.update_id, mapped.reason)
    batch = Batch(
        bot=bot,
        cursor=cursor_name(bot),
        next_offset=max(u.update_id for u in updates) + 1,
        messages=messages,
        stops=stops,
    )
    return batch, notices


def store_accept(store: AnyStore) -> AcceptFn:
    """The durable half of an `accept`: messages and offset in one transaction.
    (The supervisor's accept also queues the turns of the new ones and runs stops.)"""

    async def accept(batch: Batch) -> object:
        return await store.accept_batch(batch.cursor, batch.next_offset, batch.messages)

    return accept


# ---- the poller


class TokenRefused(Exception):
    pass


class Poller:
    """One bot's long poll: `run()` until cancelled (or until the token is refused).

    `accept(batch)` is awaited for every batch and must return only once the batch is
    durable; if it raises, the same updates are fetched again after a backoff. A step
    (a call, a backoff sleep, an accept) that does not complete within its bound
    restarts the poll on fresh connections: the watchdog watches completions, not
    starts.
    """

    def __init__(
        self,
        name: str,
        cfg: TelegramConfig,
        token: str,
        accept: AcceptFn,
        load_offset: LoadOffsetFn,
        *,
        poll_timeout: int = POLL_TIMEOUT,
        accept_timeout: float = 60.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        watchdog_slack: float = 30.0,
        api_factory: Callable[[], BotApi] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.accept = accept
        self.load_offset = load_offset
        self.poll_timeout = poll_timeout
        self.accept_timeout = accept_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.watchdog_slack = watchdog_slack
        self._api_factory = api_factory or (lambda: BotApi(token, cfg.api_url))
        self.health = PollerHealth(bot=name)
        self._step_deadline: float | None = None  # monotonic; None: between steps
        self._failures = 0

    @property
    def key(self) -> str:
        return f"channels.telegram.{self.name}"

    # -- the watchdog

    async def run(self) -> None:
        """Poll until cancelled; returns (health.state "failed") if the token is refused."""
        while True:  # ends on TokenRefused or cancellation
            api = self._api_factory()
            task = asyncio.create_task(self._poll(api), name=f"telegram poll {self.name}")
            try:
                while not task.done():  # ends when the poll ends or is found stalled
                    await asyncio.wait({task}, timeout=1.0)
                    late = self._step_deadline
                    if not task.done() and late is not None and time.monotonic() > late:
                        self.health.restarts += 1
                        self.health.last_error = "a poll step did not complete in time"
                        log.error("%s: poller stalled: restarting it", self.key)
                        task.cancel()
                        break
                if task.done() and not task.cancelled():
                    task.result()  # TokenRefused ends here; a bug is logged by the owner
            except TokenRefused as e:
                self.health.state = "failed"
                self.health.last_error = str(e)
                log.error("%s", e)
                return
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self._step_deadline = None
                await api.close()

    @contextlib.contextmanager
    def _step(self, bound: float) -> Iterator[None]:
        self._step_deadline = time.monotonic() + bound + self.watchdog_slack
        try:
            yield
        finally:
            self._step_deadline = None

    # -- polling

    async def _poll(self, api: BotApi) -> None:
        me = await self._start(api)
        self.health.username = me.username or ""
        with self._step(self.accept_timeout):
            offset = await self.load_offset()
        self.health.offset = offset
        log.info("%s: polling as @%s from offset %s", self.key, me.username, offset)
        while True:  # ends when cancelled (stop, drain, watchdog)
            try:
                with self._step(self.poll_timeout + 10):
                    updates = await api.get_updates(
                        offset, timeout=self.poll_timeout, allowed_updates=ALLOWED_UPDATES
                    )
            except TelegramError as e:
                await self._failed(api, e)
                continue
            self._failures = 0
            self.health.state = "polling"
            self.health.last_poll = time.time()
            if not updates:
                continue
            batch, notices = make_batch(self.name, self.cfg, updates, me.username or "")
            try:
                with self._step(self.accept_timeout):
                    async with asyncio.timeout(self.accept_timeout):
                        await self.accept(batch)
            except Exception as e:
                # not durable: the next getUpdates asks for the same updates again
                self._failures += 1
                self.health.errors += 1
                self.health.state = "retrying"
                self.health.last_error = f"accept: {type(e).__name__}: {e}"
                log.error(
                    "%s: %d updates not accepted (%s); fetching them again",
                    self.key,
                    len(updates),
                    self.health.last_error,
                )
                await self._sleep(self._backoff())
                continue
            offset = batch.next_offset
            self.health.offset = offset
            self.health.updates += len(updates)
            for notice in notices:
                await self._notice(api, notice)

    async def _start(self, api: BotApi) -> User:
        """getMe and deleteWebhook, retried until they work; a refused token ends here."""
        while True:  # ends when both succeed, or the token is refused
            try:
                with self._step(api.request_timeout * 2):
                    me = await api.get_me()
                    # a webhook left set makes every getUpdates a 409, forever
                    await api.delete_webhook(drop_pending_updates=False)
                return me
            except ApiError as e:
                if e.error_code in (401, 404):
                    raise TokenRefused(
                        f"{self.key}: Telegram refused the bot token ({e.error_code} "
                        f"{e.description}): check the token in ${self.cfg.token_env}; "
                        "this bot is not polled until corral is restarted with a good one"
                    ) from None
                await self._failed(api, e)
            except NetworkError as e:
                await self._failed(api, e)

    async def _failed(self, api: BotApi, e: TelegramError) -> None:
        self._failures += 1
        self.health.errors += 1
        self.health.state = "retrying"
        self.health.last_error = str(e)
        delay = self._backoff()
        if isinstance(e, ApiError):
            if e.error_code in (401, 404):
                raise TokenRefused(
                    f"{self.key}: Telegram refused the bot token ({e.error_code} {e.description})"
                ) from None
            if e.error_code == 409:
                # another getUpdates is open (a previous run's, for up to its timeout)
                # or a webhook is set: retrying sooner only makes a 409 storm
                self.health.conflicts += 1
                delay = max(delay, float(self.poll_timeout))
                if "webhook" in e.description.lower():
                    with contextlib.suppress(TelegramError):
                        with self._step(api.request_timeout):
                            await api.delete_webhook(drop_pending_updates=False)
            elif e.retry_after is not None:
                delay = max(delay, float(e.retry_after))
        log.warning("%s: %s; retrying in %.1fs", self.key, e, delay)
        await self._sleep(delay)

    def _backoff(self) -> float:
        delay = min(self.backoff_max, self.backoff_initial * 2 ** max(0, self._failures - 1))
        return delay * random.uniform(0.5, 1.0)

    async def _sleep(self, delay: float) -> None:
        with self._step(delay):
            await asyncio.sleep(delay)

    async def _notice(self, api: BotApi, notice: Notice) -> None:
        try:
            with self._step(api.request_timeout):
                await api.send_message(
                    int(notice.origin.chat),
                    notice.text,
                    message_thread_id=send_thread(notice.origin),
                )
        except TelegramError as e:
            log.info("%s: notice to chat %s not sent: %s", self.key, notice.origin.chat, e)


class PollerCollector:
    """Prometheus collector of the pollers' health: register it with
    `metrics.registry.register(PollerCollector(pollers))`."""

    def __init__(self, pollers: Mapping[str, Poller]) -> None:
        self.pollers = pollers

    def collect(self) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            "corral_telegram_last_poll_timestamp_seconds",
            "When the bot's last getUpdates completed (unix time)",
            labels=["bot"],
        )
        up = GaugeMetricFamily(
            "corral_telegram_poller_up", "1 while the bot's last poll succeeded", labels=["bot"]
        )
        errors = CounterMetricFamily(
            "corral_telegram_poll_errors", "Failed Bot API calls of the poller", labels=["bot"]
        )
        restarts = CounterMetricFamily(
            "corral_telegram_poller_restarts", "Pollers restarted by the watchdog", labels=["bot"]
        )
        for name, p in self.pollers.items():
            h = p.health
            if h.last_poll is not None:
                last.add_metric([name], h.last_poll)
            up.add_metric([name], 1.0 if h.state == "polling" else 0.0)
            errors.add_metric([name], h.errors)
            restarts.add_metric([name], h.restarts)
        yield from (last, up, errors, restarts)


# ---- everything for the supervisor to wire


class TelegramChannel:
    """Every configured bot: its poller, the delivery of channel "telegram", typing.

    The supervisor runs `services()` as background tasks, adds `delivery`
    to the outbox under the name "telegram" (its `wake` on each new reply), calls
    `typing.start(origin)` / `typing.stop(origin)` around turns, registers
    `collector` with its metrics registry, shows `status()` in `corral status`, and
    awaits `close()` after the tasks are cancelled.
    """

    def __init__(
        self,
        bots: Mapping[str, TelegramConfig],
        tokens: Mapping[str, str],
        accept: AcceptFn,
        store: AnyStore,
        delivery: DeliveryConfig,
        metrics: Metrics,
        poll_timeout: int = POLL_TIMEOUT,
    ) -> None:
        # sends (replies, typing) share one client per bot; each poller has its own
        self.apis = {name: BotApi(tokens[name], cfg.api_url) for name, cfg in bots.items()}
        self.pollers = {
            name: Poller(
                name,
                cfg,
                tokens[name],
                accept,
                functools.partial(store.channel_offset, cursor_name(name)),
                poll_timeout=poll_timeout,
            )
            for name, cfg in bots.items()
        }
        self.delivery = TelegramDelivery(self.apis, delivery, store, metrics)
        self.typing = Typing(self.apis)
        self.collector = PollerCollector(self.pollers)

    def services(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """What to run until close, by name: one poller per bot (it returns, state
        "failed", if its token is refused), and the delivery; each call of a value
        makes a fresh coroutine."""
        tasks: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            f"telegram poller {name}": p.run for name, p in self.pollers.items()
        }
        tasks[f"delivery to {CHANNEL}"] = self.delivery.run
        return tasks

    def status(self) -> list[PollerHealth]:
        return [p.health for p in self.pollers.values()]

    async def close(self) -> None:
        await self.typing.close()
        for api in self.apis.values():
            await api.close()


__all__ = [
    "CHANNEL",
    "GENERAL_TOPIC",
    "MAX_TEXT",
    "ONLY_TEXT",
    "Accept",
    "Batch",
    "Notice",
    "Poller",
    "PollerCollector",
    "Skip",
    "StopTurn",
    "TelegramChannel",
    "TelegramDelivery",
    "Typing",
    "map_update",
    "send_thread",
    "split_text",
    "utf16_len",
]
