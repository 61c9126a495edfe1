"""Outbox delivery to webhook channels.

Each configured webhook channel has its own delivery task, so a slow or failing
receiver holds up only its own channel; turns never wait for delivery. A reply is
POSTed to its channel's url (the channel named in the reply's origin, and no
other): 2xx is delivered; 408, 429, 5xx and connection errors are retried with
exponential backoff and jitter; any other status is dead-lettered at once; and
`max_attempts` and `max_age` bound the retries.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import hmac
import logging
import random
import re
import time
from typing import Protocol

import aiohttp
import msgspec

from corral.protocol.types import Origin, Reply
from corral.supervisor.config import DeliveryConfig, WebhookConfig
from corral.supervisor.metrics import Metrics
from corral.supervisor.store import DEAD, DELIVERED, PENDING, StoredReply
from corral.supervisor.stores import AnyStore
from corral.supervisor.storethread import StoreUnavailable

log = logging.getLogger("corral.delivery")

REQUEST_TIMEOUT = 10.0  # one POST; the receiver's slowness costs only its own channel
BATCH = 32  # deliveries in flight per channel (distinct sessions)
STORE_RETRY = 2.0  # seconds before a delivery the store could not record is tried again
SIGNATURE_HEADER = "X-Corral-Signature"
TIMESTAMP_HEADER = "X-Corral-Timestamp"  # unix seconds of this attempt, in the signature


class WebhookReply(msgspec.Struct, omit_defaults=True):
    """The body POSTed to a webhook channel's url."""

    id: str
    in_reply_to: str
    session: str
    text: str
    kind: str
    origin: Origin
    markup: str = ""  # "html" or "markdown" when the agent asked; absent: plain text


_encode = msgspec.json.Encoder().encode


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """X-Corral-Signature: HMAC-SHA256 over "TIMESTAMP.BODY", so a receiver that checks
    X-Corral-Timestamp's age rejects a captured request replayed later."""
    signed = timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


_DECIMAL_RE = re.compile(r"\s*(\d{1,12}(?:\.\d{1,9})?)\s*")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now`: decimal seconds ("120", "1.5") or an HTTP date
    ("Wed, 21 Oct 2015 07:28:00 GMT"); None for anything else, which is ignored."""
    if not value:
        return None
    if m := _DECIMAL_RE.fullmatch(value):
        return float(m[1])
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; one without a zone is taken as such
        when = when.replace(tzinfo=datetime.UTC)
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def backoff(cfg: DeliveryConfig, attempts: int) -> float:
    """Delay before attempt `attempts + 1`: doubling from retry_initial, capped at
    retry_max, with jitter (a random half to all of it) so receivers coming back
    are not hit by every sender at once."""
    delay = min(float(cfg.retry_max), float(cfg.retry_initial) * 2 ** (attempts - 1))
    return delay * random.uniform(0.5, 1.0)


def retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class WebhookDelivery:
    def __init__(
        self, name: str, hook: WebhookConfig, cfg: DeliveryConfig, store: AnyStore, metrics: Metrics
    ) -> None:
        self.name = name
        self.hook = hook
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.wake = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:  # ends when cancelled at close
                self.wake.clear()
                due = await self.store.due_deliveries(self.name, time.time(), BATCH)
                if due:
                    done = await asyncio.gather(
                        *(self.deliver(http, r) for r in due), return_exceptions=True
                    )
                    errors = [e for e in done if isinstance(e, BaseException)]
                    for e in errors:
                        if not isinstance(e, StoreUnavailable):
                            raise e
                    if errors:  # a full disk: the replies stay due (a receiver dedups by id)
                        await asyncio.sleep(STORE_RETRY)
                    continue
                next_at = await self.store.next_due(self.name)
                wait = None if next_at is None else max(0.0, next_at - time.time())
                try:
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
                except TimeoutError:
                    pass

    async def deliver(self, http: aiohttp.ClientSession, stored: StoredReply) -> None:
        r = stored.reply
        body = _encode(
            WebhookReply(r.id, r.in_reply_to, r.session, r.text, r.kind, r.origin, r.markup)
        )
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp}
        if self.hook.secret:
            headers[SIGNATURE_HEADER] = sign(self.hook.secret, timestamp, body)
        status = 0
        retry_after = None
        try:
            async with http.post(
                self.hook.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                error = f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        attempts = stored.attempts + 1
        if 200 <= status < 300:
            await self.store.mark_delivery(r.id, DELIVERED, attempts)
            self.metrics.delivered.labels(self.name).inc()
            return
        self.metrics.delivery_failures.labels(self.name).inc()
        age = time.time() - stored.age_from  # a retried dead letter: from its retry
        if status and not retryable(status):
            why = f"{error}: not retried"
        elif attempts >= self.cfg.max_attempts:
            why = f"{error}: gave up after {attempts} attempts"
        elif age >= self.cfg.max_age:
            why = f"{error}: gave up after {age:.0f}s"
        else:
            delay = backoff(self.cfg, attempts)
            asked = parse_retry_after(retry_after, time.time())
            if asked is not None:  # the receiver's wish, within retry_max
                delay = min(float(self.cfg.retry_max), max(delay, asked))
            await self.store.mark_delivery(r.id, PENDING, attempts, time.time() + delay, error)
            log.info("%s: reply %s: %s; retry %d in %.1fs", self.name, r.id, error, attempts, delay)
            return
        await self.store.mark_delivery(r.id, DEAD, attempts, error=why)
        self.metrics.dead_letters.labels(self.name).inc()
        log.error("%s: reply %s dead-lettered: %s", self.name, r.id, why)


class Delivery(Protocol):
    """One channel's delivery loop (WebhookDelivery, TelegramDelivery): `run()` as a
    service, `wake` set on each new reply to its channel."""

    wake: asyncio.Event

    async def run(self) -> None: ...


class Outbox:
    """Starts one delivery task per pushed channel and wakes it on new replies (webhook
    channels from the config; other channels add theirs to `channels` before start)."""

    def __init__(
        self,
        channels: dict[str, WebhookConfig],
        cfg: DeliveryConfig,
        store: AnyStore,
        metrics: Metrics,
    ) -> None:
        self.channels: dict[str, Delivery] = {
            name: WebhookDelivery(name, hook, cfg, store, metrics)
            for name, hook in channels.items()
        }
        self.store = store

    def on_reply(self, reply: Reply) -> None:
        channel = self.channels.get(reply.origin.channel)
        if channel is not None:
            channel.wake.set()

    async def retry_dead_letters(self, ids: list[str] | None) -> list[str]:
        """Put dead letters (all of them: None) of configured channels back into delivery,
        with fresh attempts; the ids retried. The store's update commits before the
        wake-up, so a delivery loop that just looked finds them on its next look."""
        retried = await self.store.retry_dead_letters(ids, list(self.channels))
        for stored in retried:
            self.on_reply(stored.reply)
        if retried:
            log.info("%d dead letters back in delivery", len(retried))
        return [r.reply.id for r in retried]

    async def prepare(self) -> None:
        dropped = await self.store.dead_letter_unrouted(list(self.channels))
        if dropped:
            log.error(
                "%d undelivered replies belong to channels no longer configured: dead-lettered",
                dropped,
            )
