"""The Telegram channel against a fake Bot API on 127.0.0.1: client, poller, delivery, typing.

The supervisor's side is played by a real Store (and, for accept, the store's own
transaction); what a user would see is what the fake recorded as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from corral.protocol.types import Origin, Reply
from corral.protocol.units import Duration
from corral.supervisor.channels import botapi
from corral.supervisor.channels.botapi import ApiError, BotApi, NetworkError
from corral.supervisor.channels.telegram import (
    ONLY_TEXT,
    Accept,
    Batch,
    Notice,
    Poller,
    PollerCollector,
    Skip,
    StopTurn,
    TelegramChannel,
    TelegramDelivery,
    Typing,
    map_update,
    split_text,
    store_accept,
    utf16_len,
)
from corral.supervisor.config import DeliveryConfig, TelegramConfig
from corral.supervisor.metrics import Metrics
from corral.supervisor.store import DEAD, DELIVERED, Store
from tests.fake_telegram import FakeTelegram

TOKEN = "123456789:AAFakeTokenForCorralTests_0123456789x"
OTHER = "987654321:BBAnotherFakeTokenForCorralTests_9876"
T = TypeVar("T")

PRIVATE = 5001
GROUP = -4001
FORUM = -1002003004005


def run(coro: Awaitable[T], timeout: float = 90) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    f = FakeTelegram()
    f.add_bot(TOKEN, username="corral_bot")
    f.start()
    try:
        yield f
    finally:
        f.stop()


async def until(check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    """Wait (without blocking the loop) until check() is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:  # ends when the check passes or at the deadline
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        await asyncio.sleep(0.05)


def cfg(**kw: Any) -> TelegramConfig:
    return TelegramConfig(token_env="TG_TOKEN", **kw)


# ---------------------------------------------------------------- the client


def test_client_speaks_the_bot_api_typed(fake):
    async def main() -> None:
        async with BotApi(TOKEN, fake.url) as api:
            me = await api.get_me()
            assert me.is_bot and me.username == "corral_bot"
            assert await api.delete_webhook() is True
            fake.user_message(TOKEN, PRIVATE, "hello")
            fake.user_message(
                TOKEN,
                FORUM,
                "in a topic",
                chat_type="supergroup",
                is_forum=True,
                thread_id=7,
                user_id=77,
            )
            updates = await api.get_updates(timeout=1)
            assert [u.message.text for u in updates if u.message] == ["hello", "in a topic"]
            topic = updates[1].message
            assert topic is not None and topic.chat.is_forum and topic.message_thread_id == 7
            assert topic.from_ is not None and topic.from_.id == 77
            sent = await api.send_message(PRIVATE, "hi back")
            assert sent.chat.id == PRIVATE and sent.text == "hi back"
            assert await api.send_chat_action(FORUM, message_thread_id=7) is True
        assert fake.sent(TOKEN)[0]["text"] == "hi back"
        assert fake.chat_actions(TOKEN)[0]["message_thread_id"] == 7

    run(main())


def test_offset_confirms_and_drops_earlier_updates(fake):
    async def main() -> None:
        ids = [fake.user_message(TOKEN, PRIVATE, f"m{i}")["update_id"] for i in range(3)]
        async with BotApi(TOKEN, fake.url) as api:
            assert [u.update_id for u in await api.get_updates(timeout=0)] == ids
            # nothing confirmed yet: the same updates again
            assert [u.update_id for u in await api.get_updates(timeout=0)] == ids
            got = await api.get_updates(offset=ids[1] + 1, timeout=0)
            assert [u.update_id for u in got] == ids[2:]
            assert fake.pending_update_ids(TOKEN) == ids[2:]  # the first two are confirmed
            assert await api.get_updates(offset=ids[2] + 1, timeout=0) == []
        assert fake.pending_update_ids(TOKEN) == []

    run(main())


def test_errors_carry_code_description_and_parameters(fake):
    async def main() -> None:
        fake.user_message(TOKEN, GROUP, "x", chat_type="group")
        fake.upgrade_to_supergroup(TOKEN, GROUP, -100777)
        fake.fault(
            TOKEN,
            "sendMessage",
            status=429,
            description="Too Many Requests: retry after 3",
            retry_after=3,
            chat_id=PRIVATE,
        )
        fake.user_message(TOKEN, PRIVATE, "x")
        async with BotApi(TOKEN, fake.url) as api:
            with pytest.raises(ApiError) as flood:
                await api.send_message(PRIVATE, "a")
            assert (flood.value.error_code, flood.value.retry_after) == (429, 3)
            assert "Too Many Requests" in flood.value.description
            with pytest.raises(ApiError) as moved:
                await api.send_message(GROUP, "a")
            assert moved.value.error_code == 400 and moved.value.migrate_to_chat_id == -100777
            with pytest.raises(ApiError) as missing:
                await api.send_message(1234, "a")
            assert missing.value.description == "Bad Request: chat not found"
        async with BotApi("1:wrong-token-abcdefghijklmnopqrstu", fake.url) as bad:
            with pytest.raises(ApiError) as refused:
                await bad.get_me()
            assert refused.value.error_code == 401

    run(main())


def test_the_token_never_appears_in_errors_or_logs(fake, caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    async def main() -> list[str]:
        texts = []
        async with BotApi(TOKEN, f"http://127.0.0.1:{dead}") as api:
            with pytest.raises(NetworkError) as refused:
                await api.get_me()
            texts.append(str(refused.value))
            texts.append(repr(api))
        fake.fault(TOKEN, "getMe", drop=True)
        fake.fault(TOKEN, "getMe", status=502, description="Bad Gateway")
        async with BotApi(TOKEN, fake.url) as api:
            for _ in range(2):
                with pytest.raises(botapi.TelegramError) as e:
                    await api.get_me()
                texts.append(str(e.value))
                texts.append(repr(e.value.__cause__))
        return texts

    texts = run(main())
    assert all(TOKEN not in t and TOKEN.split(":")[1] not in t for t in texts), texts
    assert "ClientConnectorError" in texts[0] or "Connect" in texts[0]
    for record in caplog.records:
        assert TOKEN.split(":")[1] not in record.getMessage()


def test_the_long_poll_has_a_client_deadline_above_its_timeout(fake, monkeypatch):
    monkeypatch.setattr(botapi, "POLL_MARGIN", 1.0)
    fake.fault(TOKEN, "getUpdates", stall=60)

    async def main() -> float:
        async with BotApi(TOKEN, fake.url) as api:
            started = time.monotonic()
            with pytest.raises(NetworkError, match="no answer within 2s"):
                await api.get_updates(timeout=1)
            return time.monotonic() - started

    # the server's own timeout (1 s) passes first: the client gives it the margin on top
    assert run(main()) >= 2.0


def test_sends_do_not_wait_for_a_long_poll_in_flight(fake):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        async with BotApi(TOKEN, fake.url) as api:
            await api.get_updates(offset=10**9, timeout=0)  # confirm everything
            poll = asyncio.create_task(api.get_updates(offset=10**9, timeout=20))
            await until(lambda: len(fake.requests(TOKEN, "getUpdates")) == 2)
            for i in range(5):
                await api.send_message(PRIVATE, f"while polling {i}")
            assert not poll.done()  # the poll still holds its own connection
            assert api._poll_http is not api._http
            fake.user_message(TOKEN, PRIVATE, "ends the poll")
            assert [u.message.text for u in await poll if u.message] == ["ends the poll"]
        assert len(fake.sent(TOKEN)) == 5

    run(main())


def test_a_second_poller_ends_the_first_with_409_and_a_webhook_blocks_polling(fake):
    async def main() -> None:
        async with BotApi(TOKEN, fake.url) as one, BotApi(TOKEN, fake.url) as two:
            first = asyncio.create_task(one.get_updates(timeout=20))
            await until(lambda: len(fake.requests(TOKEN, "getUpdates")) == 1)
            second = asyncio.create_task(two.get_updates(timeout=1))
            with pytest.raises(ApiError) as conflict:
                await first
            assert conflict.value.error_code == 409
            assert "terminated by other getUpdates request" in conflict.value.description
            assert await second == []
            fake.set_webhook(TOKEN, "https://example.org/hook")
            with pytest.raises(ApiError, match="webhook is active"):
                await one.get_updates(timeout=0)
            await one.delete_webhook()
            assert await one.get_updates(timeout=0) == []

    run(main())


def test_fake_takes_form_and_query_parameters(fake):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{fake.url}/bot{TOKEN}/sendMessage",
                data={
                    "chat_id": str(PRIVATE),
                    "text": "form",
                    "reply_parameters": '{"message_id": 1}',
                },
            ) as resp:
                body = await resp.json()
                assert body["ok"] and body["result"]["text"] == "form"
            async with http.get(
                f"{fake.url}/bot{TOKEN}/sendMessage", params={"chat_id": PRIVATE, "text": "q"}
            ) as resp:
                assert (await resp.json())["ok"]
            async with http.post(f"{fake.url}/bot{TOKEN}/noSuchMethod") as resp:
                assert resp.status == 404 and (await resp.json())["ok"] is False
        sent = fake.sent(TOKEN)
        assert [m["text"] for m in sent] == ["form", "q"]
        assert sent[0]["reply_to_message_id"] == 1

    run(main())


# ---------------------------------------------------------------- updates -> sessions


def update(**message: Any) -> botapi.Update:
    import msgspec

    base = {"message_id": 9, "date": 0, "from": {"id": 77, "is_bot": False}}
    kind = message.pop("kind", "message")
    return msgspec.convert({"update_id": 500, kind: {**base, **message}}, botapi.Update)


def chat(id_: int, type_: str = "private", forum: bool = False) -> dict[str, Any]:
    return {"id": id_, "type": type_, "is_forum": forum}


def test_updates_map_to_sessions_origins_and_ids():
    chat_cfg, topic_cfg = cfg(), cfg(sessions="topic")
    private = map_update("main", chat_cfg, update(chat=chat(PRIVATE), text="hi"))
    assert isinstance(private, Accept)
    assert private.inbound.id == "telegram:main:500"
    assert private.inbound.session == f"telegram:main:{PRIVATE}"
    assert private.inbound.origin == Origin(
        channel="telegram",
        account="main",
        chat=str(PRIVATE),
        thread="",
        user="77",
        reply_to="9",  # the message answered: a reply in a group quotes it
    )
    in_topic = update(
        chat=chat(FORUM, "supergroup", True), text="t", message_thread_id=7, is_topic_message=True
    )
    by_chat = map_update("main", chat_cfg, in_topic)
    by_topic = map_update("main", topic_cfg, in_topic)
    assert isinstance(by_chat, Accept) and isinstance(by_topic, Accept)
    assert by_chat.inbound.session == f"telegram:main:{FORUM}"
    assert by_topic.inbound.session == f"telegram:main:{FORUM}:7"
    assert by_chat.inbound.origin.thread == by_topic.inbound.origin.thread == "7"
    general = map_update("main", topic_cfg, update(chat=chat(FORUM, "supergroup", True), text="g"))
    assert isinstance(general, Accept)
    assert general.inbound.session == f"telegram:main:{FORUM}:1"
    # in a group that is not a forum, message_thread_id is a reply chain, not a topic
    chain = map_update(
        "main", topic_cfg, update(chat=chat(GROUP, "supergroup"), text="r", message_thread_id=3)
    )
    assert isinstance(chain, Accept)
    assert chain.inbound.session == f"telegram:main:{GROUP}"
    assert chain.inbound.origin.thread == ""


def test_only_user_text_becomes_a_message():
    c = cfg()
    assert isinstance(
        map_update("main", c, update(chat=chat(PRIVATE), text="x", kind="edited_message")), Skip
    )
    sticker = map_update("main", c, update(chat=chat(PRIVATE), sticker={"file_id": "s"}))
    assert sticker == Notice(
        Origin(channel="telegram", account="main", chat=str(PRIVATE), user="77", reply_to="9"),
        ONLY_TEXT,
    )
    assert isinstance(map_update("main", c, update(chat=chat(GROUP, "group"), sticker={})), Skip)
    caption = map_update("main", c, update(chat=chat(GROUP, "group"), caption="a photo"))
    assert isinstance(caption, Accept) and caption.inbound.text == "a photo"
    from_bot = update(chat=chat(GROUP, "group"), text="x", **{"from": {"id": 1, "is_bot": True}})
    assert isinstance(map_update("main", c, from_bot), Skip)
    limited = cfg(allowed_chats=[PRIVATE])
    assert isinstance(map_update("main", limited, update(chat=chat(PRIVATE), text="x")), Accept)
    assert isinstance(
        map_update("main", limited, update(chat=chat(GROUP, "group"), text="x")), Skip
    )


def test_stop_is_a_command_and_other_commands_are_text():
    c = cfg()
    stop = map_update("main", c, update(chat=chat(PRIVATE), text="/stop"), "corral_bot")
    assert isinstance(stop, StopTurn) and stop.session == f"telegram:main:{PRIVATE}"
    addressed = map_update(
        "main", c, update(chat=chat(GROUP, "group"), text="/stop@Corral_Bot"), "corral_bot"
    )
    assert isinstance(addressed, StopTurn)
    other_bot = map_update(
        "main", c, update(chat=chat(GROUP, "group"), text="/stop@other_bot"), "corral_bot"
    )
    assert isinstance(other_bot, Skip)
    help_ = map_update("main", c, update(chat=chat(PRIVATE), text="/help me"), "corral_bot")
    assert isinstance(help_, Accept) and help_.inbound.text == "/help me"


# ---------------------------------------------------------------- splitting


def test_long_text_splits_on_paragraphs_then_lines_then_words():
    paragraphs = "\n\n".join(f"paragraph {i} " + "word " * 300 for i in range(8))
    parts = split_text(paragraphs)
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert all(p.startswith("paragraph") for p in parts)  # every cut at a paragraph break
    assert "\n\n".join(parts) == paragraphs
    words = "word " * 3000
    parts = split_text(words)
    assert all(utf16_len(p) <= 4096 and not p.endswith("wor") for p in parts)
    assert " ".join(parts).split() == words.split()
    assert split_text("short") == ["short"]
    assert split_text("   \n") == []


def test_splitting_counts_utf16_and_never_cuts_a_surrogate_pair():
    text = "😀" * 5000 + "ä" * 5000  # 2 UTF-16 units each, then 1
    parts = split_text(text)
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert "".join(parts) == text
    for p in parts:
        p.encode("utf-16-le").decode("utf-16-le")  # no lone surrogate
    assert utf16_len(parts[0]) == 4096  # 2048 emoji fill the first part exactly


# ---------------------------------------------------------------- the poller


@contextlib.asynccontextmanager
async def open_store(path: Path) -> AsyncIterator[Store]:
    store = Store(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def polling(poller: Poller) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(poller.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_poller(
    fake: FakeTelegram,
    store: Store,
    accept: Any = None,
    token: str = TOKEN,
    config: TelegramConfig | None = None,
    **kw: Any,
) -> Poller:
    c = config or TelegramConfig(token_env="TG_TOKEN", api_url=fake.url)
    kw.setdefault("poll_timeout", 1)
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return Poller(
        "main",
        c,
        token,
        accept or store_accept(store),
        lambda: store.channel_offset("telegram:main"),
        **kw,
    )


async def stored_texts(store: Store) -> list[str]:
    return [m.text for m in await store.pending()]


def test_updates_are_confirmed_to_telegram_only_after_they_are_stored(fake, tmp_path):
    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            seen_at_accept: list[list[int]] = []
            accept_store = store_accept(store)

            async def accept(batch: Batch) -> object:
                # still unconfirmed at Telegram while we store them
                seen_at_accept.append(fake.pending_update_ids(TOKEN))
                return await accept_store(batch)

            poller = make_poller(fake, store, accept)
            for i in range(30):
                if i % 3 == 0:
                    fake.user_message(TOKEN, PRIVATE + i, f"m{i}")
                elif i % 3 == 1:
                    fake.user_message(TOKEN, GROUP, f"m{i}", chat_type="group")
                else:
                    fake.user_message(
                        TOKEN, FORUM, f"m{i}", chat_type="supergroup", is_forum=True, thread_id=7
                    )
            async with polling(poller):
                await until(lambda: poller.health.updates == 30, what="30 updates accepted")
                await until(lambda: fake.pending_update_ids(TOKEN) == [], what="confirmed")
            texts = await stored_texts(store)
            assert sorted(texts) == sorted(f"m{i}" for i in range(30))
            assert seen_at_accept[0]  # the first batch was still pending at Telegram
            assert poller.health.state == "polling" and poller.health.last_poll is not None
            assert await store.channel_offset("telegram:main") == poller.health.offset
            assert fake.requests(TOKEN)[0:2] == [{}, {"drop_pending_updates": False}]

    run(main())


def test_an_update_not_stored_is_fetched_again_and_stored_once(fake, tmp_path):
    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            accept_store = store_accept(store)
            calls = 0

            async def flaky(batch: Batch) -> object:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise OSError("disk full")
                if calls == 2:  # stored, but "crashed" before the offset was used
                    await accept_store(batch)
                    raise OSError("crashed after commit")
                return await accept_store(batch)

            for i in range(5):
                fake.user_message(TOKEN, PRIVATE, f"m{i}")
            poller = make_poller(fake, store, flaky)
            async with polling(poller):
                await until(lambda: poller.health.updates == 5)
            assert await stored_texts(store) == [f"m{i}" for i in range(5)]
            assert poller.health.errors == 2 and "crashed" in poller.health.last_error
            offsets = [r.get("offset") for r in fake.requests(TOKEN, "getUpdates")]
            assert offsets[:3] == [None, None, None]  # the same updates, three times

    run(main())


def test_a_restarted_poller_resumes_at_the_stored_offset(fake, tmp_path):
    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            for i in range(5):
                fake.user_message(TOKEN, PRIVATE, f"first{i}")
            poller = make_poller(fake, store)
            async with polling(poller):
                await until(lambda: poller.health.updates == 5)
            stored = await store.channel_offset("telegram:main")
            for i in range(3):
                fake.user_message(TOKEN, PRIVATE, f"second{i}")
            again = make_poller(fake, store)
            n = len(fake.requests(TOKEN, "getUpdates"))
            async with polling(again):
                await until(lambda: again.health.updates == 3)
            assert fake.requests(TOKEN, "getUpdates")[n]["offset"] == stored
            texts = await stored_texts(store)
            assert texts == [f"first{i}" for i in range(5)] + [f"second{i}" for i in range(3)]

    run(main())


def test_poller_recovers_from_conflicts_errors_drops_and_stalls(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(botapi, "POLL_MARGIN", 1.0)

    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            fake.fault(TOKEN, "getMe", status=502, description="Bad Gateway")
            fake.fault(
                TOKEN,
                "getUpdates",
                status=409,
                description="Conflict: terminated by other getUpdates request",
            )
            fake.fault(TOKEN, "getUpdates", status=500, description="Internal Server Error")
            fake.fault(
                TOKEN, "getUpdates", status=429, description="Too Many Requests", retry_after=1
            )
            fake.fault(TOKEN, "getUpdates", drop=True)
            fake.fault(TOKEN, "getUpdates", stall=30)
            fake.user_message(TOKEN, PRIVATE, "through it all")
            poller = make_poller(fake, store)
            async with polling(poller):
                await until(lambda: poller.health.updates == 1, timeout=60)
            assert await stored_texts(store) == ["through it all"]
            h = poller.health
            assert h.errors >= 6 and h.conflicts == 1 and h.state == "polling"

    run(main())


def test_a_webhook_left_set_is_deleted_before_polling(fake, tmp_path):
    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            fake.set_webhook(TOKEN, "https://example.org/old")
            fake.user_message(TOKEN, PRIVATE, "after the webhook")
            poller = make_poller(fake, store)
            async with polling(poller):
                await until(lambda: poller.health.updates == 1)
            assert poller.health.conflicts == 0

    run(main())


def test_a_wrong_token_is_named_plainly_and_ends_only_that_poller(fake, tmp_path, caplog):
    bad = "111:NotTheRightTokenAtAll_abcdefghij"

    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            poller = make_poller(fake, store, token=bad)
            await asyncio.wait_for(poller.run(), 30)  # returns: not retried forever
            assert poller.health.state == "failed"
            assert poller.health.last_error.startswith(
                "channels.telegram.main: Telegram refused the bot token (401"
            )
            assert bad not in poller.health.last_error

    run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused the bot token" in m for m in messages)
    assert not any(bad.split(":")[1] in m for m in messages)


def test_a_stalled_poll_step_is_restarted_by_the_watchdog(fake, tmp_path):
    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            hung = asyncio.Event()
            loads = 0

            async def load_offset() -> int | None:
                nonlocal loads
                loads += 1
                if loads == 1:
                    hung.set()
                    await asyncio.Event().wait()  # never completes
                return await store.channel_offset("telegram:main")

            fake.user_message(TOKEN, PRIVATE, "after the stall")
            poller = Poller(
                "main",
                TelegramConfig(api_url=fake.url),
                TOKEN,
                store_accept(store),
                load_offset,
                poll_timeout=1,
                accept_timeout=0.5,
                watchdog_slack=0.5,
            )
            async with polling(poller):
                await until(lambda: poller.health.updates == 1, timeout=30)
            assert hung.is_set() and poller.health.restarts == 1

    run(main())


def test_text_less_private_messages_get_one_line_and_edits_are_not_messages(fake, tmp_path):
    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            first = fake.user_message(TOKEN, PRIVATE, "original")
            fake.user_message(TOKEN, PRIVATE, "edited", edit_of=first["message"]["message_id"])
            fake.user_message(TOKEN, PRIVATE, sticker=True)
            fake.user_message(TOKEN, GROUP, chat_type="group", photo=True)
            fake.user_message(TOKEN, GROUP, chat_type="group", photo=True, caption="look")
            poller = make_poller(fake, store)
            async with polling(poller):
                await until(lambda: fake.sent(TOKEN), what="the notice")
                await until(lambda: fake.pending_update_ids(TOKEN) == [])
            assert await stored_texts(store) == ["original", "look"]
            assert [(m["chat_id"], m["text"]) for m in fake.sent(TOKEN)] == [(PRIVATE, ONLY_TEXT)]
            polls = fake.requests(TOKEN, "getUpdates")
            assert polls[0]["allowed_updates"] == ["message"]

    run(main())


def test_poller_health_is_exported_as_metrics(fake, tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    async def main() -> bytes:
        async with open_store(tmp_path / "db") as store:
            fake.user_message(TOKEN, PRIVATE, "x")
            poller = make_poller(fake, store)
            registry = CollectorRegistry()
            registry.register(PollerCollector({"main": poller}))
            async with polling(poller):
                await until(lambda: poller.health.updates == 1)
                return generate_latest(registry)

    text = run(main()).decode()
    assert 'corral_telegram_poller_up{bot="main"} 1.0' in text
    assert 'corral_telegram_last_poll_timestamp_seconds{bot="main"}' in text
    assert 'corral_telegram_poll_errors_total{bot="main"} 0.0' in text


# ---------------------------------------------------------------- delivery


DELIVERY = DeliveryConfig(retry_initial=Duration(0.2), retry_max=Duration(1), max_attempts=5)


async def reply_from(store: Store, origin: Origin, text: str, n: int = 0) -> Reply:
    """A message from `origin` and its reply `text`, in the outbox."""
    accepted = await store.accept(f"telegram:main:{origin.chat}", "q", origin, None)
    reply = await store.add_reply(accepted.message, n, text, "reply", push=True)
    assert reply is not None
    return reply


def origin(chat_id: int, thread: str = "") -> Origin:
    return Origin(channel="telegram", account="main", chat=str(chat_id), thread=thread, user="77")


@contextlib.asynccontextmanager
async def delivering(
    fake: FakeTelegram, store: Store, **kw: Any
) -> AsyncIterator[TelegramDelivery]:
    async with BotApi(TOKEN, fake.url) as api:
        d = TelegramDelivery({"main": api}, kw.pop("cfg", DELIVERY), store, Metrics(), **kw)
        task = asyncio.create_task(d.run())
        try:
            yield d
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def delivery_state(store: Store, reply: Reply) -> str:
    (stored,) = [
        s for s in await store.replies_for_message(reply.in_reply_to) if s.reply.id == reply.id
    ]
    return stored.delivery


def test_replies_go_to_the_chat_and_topic_they_came_from(fake, tmp_path):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        fake.user_message(TOKEN, GROUP, "x", chat_type="group")
        fake.user_message(TOKEN, FORUM, "x", chat_type="supergroup", is_forum=True, thread_id=7)
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            await reply_from(store, origin(PRIVATE), "to private")
            await reply_from(store, origin(GROUP), "to group")
            await reply_from(store, origin(FORUM, "7"), "to topic 7")
            await reply_from(store, origin(FORUM, "1"), "to General")
            d.wake.set()
            await until(lambda: len(fake.sent(TOKEN)) == 4)
        got = {m["text"]: (m["chat_id"], m["message_thread_id"]) for m in fake.sent(TOKEN)}
        assert got == {
            "to private": (PRIVATE, None),
            "to group": (GROUP, None),
            "to topic 7": (FORUM, 7),
            "to General": (FORUM, None),  # sendMessage must not name the General topic
        }

    run(main())


def test_a_long_reply_arrives_in_order_in_parts_under_the_limit(fake, tmp_path):
    text = "\n".join(f"line {i:04d} " + "😀" * 30 + " end" for i in range(300))
    assert len(text) > 9000

    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            reply = await reply_from(store, origin(PRIVATE), text)
            d.wake.set()
            await until_delivered(store, reply)
        sent = [m["text"] for m in fake.sent(TOKEN)]
        assert len(sent) >= 3
        assert all(utf16_len(t) <= 4096 for t in sent)
        assert "\n".join(sent) == text

    run(main())


async def until_delivered(store: Store, reply: Reply, state: str = DELIVERED) -> None:
    deadline = time.monotonic() + 30
    while (now := await delivery_state(store, reply)) != state:
        assert time.monotonic() < deadline, f"reply {reply.id} is {now}, not {state}"
        await asyncio.sleep(0.05)


def test_429_waits_at_least_retry_after_and_holds_up_no_other_chat(fake, tmp_path):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        fake.user_message(TOKEN, GROUP, "x", chat_type="group")
        fake.fault(
            TOKEN,
            "sendMessage",
            status=429,
            description="Too Many Requests: retry after 5",
            retry_after=5,
            chat_id=PRIVATE,
        )
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            slow = await reply_from(store, origin(PRIVATE), "rate limited")
            d.wake.set()
            await until(lambda: fake.requests(TOKEN, "sendMessage"))
            limited_at = time.time()
            other = await reply_from(store, origin(GROUP), "other chat")
            d.wake.set()
            await until_delivered(store, other)
            await until_delivered(store, slow)
        sent = {m["text"]: m["at"] for m in fake.sent(TOKEN)}
        assert sent["other chat"] < sent["rate limited"]
        assert sent["other chat"] < limited_at + 4  # not held behind the limited chat
        assert sent["rate limited"] >= limited_at + 4.9
        assert fake.early_sends(TOKEN) == []  # nothing sent to that chat before retry_after

    run(main())


def test_a_group_upgraded_to_a_supergroup_gets_its_reply_there(fake, tmp_path):
    async def main() -> None:
        fake.user_message(TOKEN, GROUP, "x", chat_type="group")
        fake.upgrade_to_supergroup(TOKEN, GROUP, -100555)
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            reply = await reply_from(store, origin(GROUP), "moved")
            d.wake.set()
            await until_delivered(store, reply)
            assert d.migrated == {("main", GROUP): -100555}
        assert [(m["chat_id"], m["text"]) for m in fake.sent(TOKEN)] == [(-100555, "moved")]

    run(main())


def test_blocked_and_unknown_chats_are_dead_letters_at_once(fake, tmp_path):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        fake.block(TOKEN, PRIVATE)
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            blocked = await reply_from(store, origin(PRIVATE), "blocked")
            nowhere = await reply_from(store, origin(31337), "nowhere")
            d.wake.set()
            await until_delivered(store, blocked, DEAD)
            await until_delivered(store, nowhere, DEAD)
            assert len(fake.requests(TOKEN, "sendMessage")) == 2  # one attempt each

    run(main())


def test_server_errors_and_dropped_connections_are_retried(fake, tmp_path):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        fake.fault(TOKEN, "sendMessage", status=502, description="Bad Gateway")
        fake.fault(TOKEN, "sendMessage", drop=True)
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            reply = await reply_from(store, origin(PRIVATE), "eventually")
            d.wake.set()
            await until_delivered(store, reply)
        assert [m["text"] for m in fake.sent(TOKEN)] == ["eventually"]
        assert len(fake.requests(TOKEN, "sendMessage")) == 3

    run(main())


def test_a_reply_cut_off_mid_way_resumes_without_repeating_parts(fake, tmp_path):
    text = "\n\n".join(f"part {i} " + "x" * 3000 for i in range(3))

    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        async with open_store(tmp_path / "db") as store, delivering(fake, store) as d:
            # the second sendMessage fails: parts 0 is out, 1 and 2 are not
            original = d.send_part
            sends = 0

            async def failing_second(*args: Any, **kw: Any) -> None:
                nonlocal sends
                sends += 1
                if sends == 2:
                    raise NetworkError("sendMessage", "connection reset")
                await original(*args, **kw)

            d.send_part = failing_second  # type: ignore[method-assign]
            reply = await reply_from(store, origin(PRIVATE), text)
            d.wake.set()
            await until_delivered(store, reply)
        assert [m["text"].split()[1] for m in fake.sent(TOKEN)] == ["0", "1", "2"]

    run(main())


def test_unparsable_markup_is_resent_once_as_plain_text(fake, tmp_path):
    async def main() -> None:
        fake.user_message(TOKEN, PRIVATE, "x")
        async with (
            open_store(tmp_path / "db") as store,
            delivering(fake, store, parse_mode="MarkdownV2") as d,
        ):
            reply = await reply_from(store, origin(PRIVATE), "snake_case is *bold")
            d.wake.set()
            await until_delivered(store, reply)
        modes = [r.get("parse_mode") for r in fake.requests(TOKEN, "sendMessage")]
        assert modes == ["MarkdownV2", None]
        assert fake.sent(TOKEN)[0]["text"] == "snake_case is *bold"

    run(main())


# ---------------------------------------------------------------- typing


def test_typing_is_shown_while_a_turn_runs_and_stops_after(fake):
    async def main() -> None:
        fake.user_message(TOKEN, FORUM, "x", chat_type="supergroup", is_forum=True, thread_id=7)
        async with BotApi(TOKEN, fake.url) as api:
            typing = Typing({"main": api}, every=0.3)
            typing.start(origin(FORUM, "1"))
            typing.start(origin(FORUM, "1"))  # one indicator per chat and topic
            await until(lambda: len(fake.chat_actions(TOKEN)) >= 3)
            typing.stop(origin(FORUM, "1"))
            n = len(fake.chat_actions(TOKEN))
            await asyncio.sleep(1.0)
            assert len(fake.chat_actions(TOKEN)) == n
            typing.start(origin(4444))  # a chat Telegram does not know: stops by itself
            await until(lambda: not typing.tasks)
            await typing.close()
        actions = fake.chat_actions(TOKEN)
        assert {(a["chat_id"], a["action"], a["message_thread_id"]) for a in actions} == {
            (FORUM, "typing", 1)  # sendChatAction needs the General topic's id
        }

    run(main())


# ---------------------------------------------------------------- all of it, as wired


def test_messages_from_private_group_and_topic_are_answered_in_the_same_place(fake, tmp_path):
    """TelegramChannel with a stand-in for the supervisor: accept stores the batch with its
    offset, then answers each new message (as a turn would) through the outbox."""
    stops: list[str] = []

    async def main() -> None:
        async with open_store(tmp_path / "db") as store:
            channel: TelegramChannel

            async def accept(batch: Batch) -> None:
                accepted = await store.accept_batch(batch.cursor, batch.next_offset, batch.messages)
                for a in accepted:
                    if not a.duplicate:
                        await store.add_reply(
                            a.message, 0, f"echo: {a.message.text}", "reply", push=True
                        )
                stops.extend(s.session for s in batch.stops)
                channel.delivery.wake.set()

            bots = {"main": TelegramConfig(token_env="TG", api_url=fake.url, sessions="topic")}
            channel = TelegramChannel(
                bots, {"main": TOKEN}, accept, store, DELIVERY, Metrics(), poll_timeout=1
            )
            fake.user_message(TOKEN, PRIVATE, "from private")
            fake.user_message(TOKEN, GROUP, "from group", chat_type="group")
            fake.user_message(
                TOKEN, FORUM, "from topic", chat_type="supergroup", is_forum=True, thread_id=9
            )
            fake.user_message(TOKEN, PRIVATE, "/stop")
            tasks = [asyncio.create_task(run()) for run in channel.services().values()]
            try:
                await until(lambda: len(fake.sent(TOKEN)) == 3, what="three replies")
                assert [h.state for h in channel.status()] == ["polling"]
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await channel.close()

    run(main())
    got = {(m["chat_id"], m["message_thread_id"], m["text"]) for m in fake.sent(TOKEN)}
    assert got == {
        (PRIVATE, None, "echo: from private"),
        (GROUP, None, "echo: from group"),
        (FORUM, 9, "echo: from topic"),
    }
    assert stops == [f"telegram:main:{PRIVATE}"]
