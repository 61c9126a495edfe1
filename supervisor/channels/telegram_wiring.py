"""The Telegram channel wired into the supervisor (channels/telegram.py is the channel
itself, and knows nothing of sessions or workers).

`TelegramWiring(sup, tokens)`, made by the Supervisor when `[channels.telegram.*]` is
configured, before it starts:
- replies to origins of channel "telegram" are pushed: the outbox delivers them with
  the channel's TelegramDelivery (so they are never dead-lettered as unrouted);
- "typing…" runs in the chat while a turn of its message runs (Inbox.on_start/on_stop);
- the pollers' health is in /metrics and `corral status`.
`start()` (after the inbox is restored) runs one poller per bot as a transient
service: a poller whose token is refused ends, and every other channel keeps serving.
`stop_polling()` at the start of a drain; `close()` at the end.

Each batch a poller fetches is `accept`ed: its messages and the bot's next offset are
committed in one transaction (Inbox.accept_batch), then the turns are queued as
Supervisor.accept queues them, then `/stop`s are run. A crash at any point before the
commit fetches the batch again; after it, the inbox holds the messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from corral.protocol.control import PollerHealth
from corral.protocol.types import ExitReason, Origin, SessionState
from corral.supervisor.channels.botapi import TelegramError
from corral.supervisor.channels.telegram import (
    CHANNEL,
    Batch,
    StopTurn,
    TelegramChannel,
    send_thread,
)
from corral.supervisor.config import telegram_tokens

if TYPE_CHECKING:
    from corral.supervisor.supervisor import Supervisor

log = logging.getLogger("corral.telegram")

STOPPED = "stopped with /stop in the chat"
NOTHING_RUNNING = "Nothing is running."


class TelegramWiring:
    def __init__(self, sup: Supervisor, tokens: Mapping[str, str] | None = None) -> None:
        config = sup.config
        self.sup = sup
        tokens = telegram_tokens(config) if tokens is None else tokens
        self.channel = TelegramChannel(
            config.channels.telegram, tokens, self.accept, sup.store, config.delivery, sup.metrics
        )
        sup.metrics.declare_channels([CHANNEL])
        sup.metrics.registry.register(self.channel.collector)
        sup.inbox.push_channels.add(CHANNEL)
        sup.outbox.channels[CHANNEL] = self.channel.delivery
        typing = self.channel.typing
        sup.inbox.on_start.append(lambda m: typing.start(m.origin))
        sup.inbox.on_stop.append(lambda m: typing.stop(m.origin))

    def start(self) -> None:
        for name, poller in self.channel.pollers.items():
            self.sup.services.start(self.service(name), poller.run, transient=True)

    @staticmethod
    def service(name: str) -> str:
        return f"telegram poller {name}"

    def stop_polling(self) -> None:
        """Fetch nothing more: what Telegram holds now is fetched by the next run."""
        for name, poller in self.channel.pollers.items():
            self.sup.services.stop(self.service(name))
            poller.health.state = "standby"  # not "polling": another node may be

    def status(self) -> list[PollerHealth]:
        return self.channel.status()

    async def close(self) -> None:
        await self.channel.close()

    async def accept(self, batch: Batch) -> None:
        """Returns once the batch is durable; if it raises, the poller fetches it again."""
        sup = self.sup
        if sup.draining:
            raise RuntimeError("the supervisor is stopping")  # the next run fetches it
        queued = await sup.inbox.accept_batch(batch.cursor, batch.next_offset, batch.messages)
        for message in queued:
            s = sup.sessions.get(message.session)
            if s is not None and len(s.queue) >= sup.limits.max_queue:
                # stored already, so answered rather than dropped
                text = (
                    f"not run: session {message.session} has {len(s.queue)} messages "
                    "waiting [queue_full]"
                )
                sup.tasks.start(sup.inbox.fail(message, 0, text), f"refuse {message.id}")
            else:
                sup.enqueue(message)
        for stop in batch.stops:
            self.stop_turn(stop)
        self.channel.delivery.wake.set()

    def stop_turn(self, stop: StopTurn) -> None:
        """`/stop`: end the session's running turn (its worker); the turn's error reply
        tells the chat. With nothing running the chat is told so."""
        s = self.sup.sessions.get(stop.session)
        w = s.worker if s is not None else None
        if w is not None and w.state is SessionState.BUSY and w.turn is not None:
            log.info("session %s: %s", stop.session, STOPPED)
            w.stop(ExitReason.KILLED, STOPPED)
            return
        self.sup.tasks.start(self.notice(stop.origin, NOTHING_RUNNING), f"notice {stop.session}")

    async def notice(self, origin: Origin, text: str) -> None:
        """Best effort, not a reply: not stored, not retried."""
        api = self.channel.apis.get(origin.account)
        if api is None:
            return
        try:
            await api.send_message(int(origin.chat), text, message_thread_id=send_thread(origin))
        except (TelegramError, ValueError) as e:
            log.info("telegram: notice to chat %s not sent: %s", origin.chat, e)
