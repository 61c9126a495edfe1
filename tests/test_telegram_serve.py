"""Telegram end to end: a real `corral serve` polling the fake Bot API on 127.0.0.1.

What a Telegram user sees (the fake records every sendMessage and sendChatAction)
and what an operator sees (`corral status`, /metrics, the exit code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_telegram import FakeTelegram, fake_telegram, utf16_len
from tests.harness import Corral

TOKEN = "123456:" + "A" * 35
OTHER_TOKEN = "654321:" + "B" * 35  # no such bot at the fake: Telegram answers 401
ENV = "CORRAL_TEST_TG_TOKEN"
OTHER_ENV = "CORRAL_TEST_TG_TOKEN_2"
CHAOS = "corral.worker.agents.chaos:agent"
ECHO = "corral.worker.agents.echo:agent"
PRIVATE = 555
FORUM = -100200
STOP_TEXT = "turn stopped: stopped with /stop in the chat [killed]"


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    with fake_telegram(TOKEN) as f:
        yield f


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """corral serve reads the token from the variable its config names (the harness
    passes the test's environment on)."""
    monkeypatch.setenv(ENV, TOKEN)
    monkeypatch.setenv(OTHER_ENV, OTHER_TOKEN)


def bot(fake: FakeTelegram, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"channels.telegram.main": {"token_env": ENV, "api_url": fake.url, **extra}}


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:  # ends when check() is truthy, or at the deadline
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def sent_to(fake: FakeTelegram, chat: int) -> list[dict[str, Any]]:
    return [m for m in fake.sent(TOKEN) if m["chat_id"] == chat]


def status_json(c: Corral) -> dict[str, Any]:
    result = c.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def poller(c: Corral, name: str = "main") -> dict[str, Any]:
    (p,) = [p for p in status_json(c)["pollers"] if p["bot"] == name]
    return p  # type: ignore[no-any-return]


def test_a_private_message_is_answered_in_that_chat_with_typing_while_it_runs(corral, fake):
    c = corral(bot(fake), agent=CHAOS)
    fake.user_message(TOKEN, PRIVATE, "sleep 1.5; echo hello from corral")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=60)
    assert reply["chat_id"] == PRIVATE
    assert reply["text"] == "hello from corral"
    assert reply.get("message_thread_id") is None
    typing = [a for a in fake.chat_actions(TOKEN) if a["chat_id"] == PRIVATE]
    assert typing and all(a["action"] == "typing" for a in typing)
    assert [s["session"] for s in c.ls()] == [f"telegram:main:{PRIVATE}"]


def test_a_forum_topic_message_is_answered_in_that_topic(corral, fake):
    c = corral(bot(fake, sessions="topic"))
    fake.user_message(
        TOKEN, FORUM, "in topic 7", chat_type="supergroup", is_forum=True, thread_id=7
    )
    fake.user_message(TOKEN, FORUM, "in General", chat_type="supergroup", is_forum=True)
    sent = fake.wait_sent(TOKEN, 2, timeout=60)
    got = {(m["chat_id"], m.get("message_thread_id"), m["text"]) for m in sent}
    # the General topic (1) is the chat itself to sendMessage: no message_thread_id
    assert got == {(FORUM, 7, "in topic 7"), (FORUM, None, "in General")}
    assert sorted(s["session"] for s in c.ls()) == [
        f"telegram:main:{FORUM}:1",
        f"telegram:main:{FORUM}:7",
    ]


def test_a_long_reply_is_split_under_the_limit_and_arrives_in_order(corral, fake):
    corral(bot(fake))
    paragraphs = [f"paragraph {i} " + "🙂word " * 300 for i in range(6)]  # ~1800 units each
    text = "\n\n".join(p.strip() for p in paragraphs)
    assert utf16_len(text) > 2 * 4096
    fake.user_message(TOKEN, PRIVATE, text)
    until(lambda: "".join(m["text"] for m in fake.sent(TOKEN)).count("paragraph") == 6)
    parts = [m["text"] for m in fake.sent(TOKEN)]
    assert len(parts) >= 3
    assert all(0 < utf16_len(p) <= 4096 for p in parts)
    assert "\n\n".join(parts) == text  # cut at paragraph breaks, nothing lost or repeated


def test_kill_9_between_fetch_and_answer_loses_nothing_and_answers_once(tmp_path, fake):
    c = Corral(tmp_path, bot(fake), agent=CHAOS).start()
    try:
        fake.user_message(TOKEN, PRIVATE, "sleep 4; echo answered after the crash")
        # typing shows the turn runs: the update was fetched and stored, not answered
        until(lambda: fake.chat_actions(TOKEN), what="typing in the chat")
        assert fake.sent(TOKEN) == []
        c.kill9()
        assert not c.leftovers(), "a worker outlived its supervisor"
        fake.user_message(TOKEN, PRIVATE, "echo sent while corral was down")
        c.start()
        sent = fake.wait_sent(TOKEN, 2, timeout=90)
        time.sleep(3)  # long enough for a second answer to show up, if there were one
        texts = [m["text"] for m in fake.sent(TOKEN)]
        assert sorted(texts) == ["answered after the crash", "sent while corral was down"]
        assert {m["chat_id"] for m in sent} == {PRIVATE}
        assert c.stop() == 0
    finally:
        if c.proc is not None and c.proc.poll() is None:
            c.kill9()
    assert not c.leftovers()


def test_server_errors_and_a_409_conflict_are_recovered(corral, fake):
    fake.fault(TOKEN, "getUpdates", status=500, description="Internal Server Error", times=2)
    fake.fault(
        TOKEN, "getUpdates", status=409, description="Conflict: terminated by other getUpdates"
    )
    fake.fault(TOKEN, "sendMessage", status=502, description="Bad Gateway")
    c = corral(bot(fake))
    fake.user_message(TOKEN, PRIVATE, "still answered")
    # the 409 holds polling back for a whole poll timeout (25 s), by design
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=120)
    assert reply["text"] == "still answered"
    p = poller(c)
    assert p["state"] == "polling"
    assert p["errors"] >= 3 and p["conflicts"] == 1
    assert c.metrics()['corral_telegram_poll_errors_total{bot="main"}'] >= 3


def test_status_shows_each_pollers_health_and_a_refused_token_stops_only_its_bot(corral, fake):
    config = bot(fake)
    config["channels.telegram.other"] = {"token_env": OTHER_ENV, "api_url": fake.url}
    c = corral(config)
    until(lambda: poller(c, "other")["state"] == "failed", what="the refused bot failed")
    until(lambda: poller(c)["last_poll"] is not None, what="a completed poll")
    main, other = poller(c), poller(c, "other")
    assert main["state"] == "polling" and main["username"] == "corral_bot"
    assert time.time() - 120 < main["last_poll"] <= time.time() + 1
    assert "refused the bot token" in other["last_error"]
    # the other channels, and the good bot, keep serving
    fake.user_message(TOKEN, PRIVATE, "hello")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=60)
    assert reply["text"] == "hello"
    assert c.texts("http-user", "over http") == ["over http"]
    assert poller(c)["offset"] is not None
    text = c.cli("status")
    assert text.returncode == 0
    assert "telegram main:" in text.stdout and "polling as @corral_bot" in text.stdout
    assert "telegram other:" in text.stdout and "failed" in text.stdout
    m = c.metrics()
    assert m['corral_telegram_poller_up{bot="main"}'] == 1
    assert m['corral_telegram_poller_up{bot="other"}'] == 0
    # SIGTERM still exits 0 (checked by the fixture): a refused token is not a crash


def test_only_allowed_chats_are_answered(corral, fake):
    corral(bot(fake, allowed_chats=[PRIVATE]))
    fake.user_message(TOKEN, 777, "not allowed")
    fake.user_message(TOKEN, PRIVATE, "allowed")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=60)
    assert reply["chat_id"] == PRIVATE and reply["text"] == "allowed"
    until(lambda: not fake.pending_update_ids(TOKEN), what="both updates confirmed")
    assert sent_to(fake, 777) == []


def test_stop_in_the_chat_stops_the_running_turn_and_says_so(corral, fake):
    corral(bot(fake), agent=CHAOS)
    fake.user_message(TOKEN, PRIVATE, "sleep 60; echo never")
    until(lambda: fake.chat_actions(TOKEN), what="the turn running")
    fake.user_message(TOKEN, PRIVATE, "/stop")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=30)
    assert reply["text"] == STOP_TEXT
    fake.user_message(TOKEN, PRIVATE, "/stop")
    sent = fake.wait_sent(TOKEN, 2, timeout=30)
    assert sent[1]["text"] == "Nothing is running."
    fake.user_message(TOKEN, PRIVATE, "echo next")  # the session goes on with a new worker
    assert fake.wait_sent(TOKEN, 3, timeout=60)[2]["text"] == "next"


def test_a_missing_token_variable_is_named_and_serve_exits_2(tmp_path, fake, monkeypatch):
    monkeypatch.delenv(ENV)
    c = Corral(tmp_path, bot(fake))
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(c.config_path)],
        env=c.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"channels.telegram.main.token_env: the environment variable {ENV}" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert not os.path.exists(Path(c.state) / "corral.db")


GROUP = -4001


def test_a_group_message_is_answered_in_the_group_with_typing_through_a_7_second_turn(corral, fake):
    c = corral(bot(fake), agent=CHAOS)
    update = fake.user_message(TOKEN, GROUP, "sleep 7; echo the group's answer", chat_type="group")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=90)
    assert (reply["chat_id"], reply["text"]) == (GROUP, "the group's answer")
    # in a group the reply quotes the message it answers (the origin carries it)
    assert reply["reply_to_message_id"] == update["message"]["message_id"]
    typing = [a for a in fake.chat_actions(TOKEN) if a["chat_id"] == GROUP]
    # refreshed about every 4 s while the turn runs: at least twice in 7 s
    assert len(typing) >= 2 and all(a["action"] == "typing" for a in typing)
    assert TOKEN not in c.log() and TOKEN.split(":")[1] not in c.log()


def test_a_kill_9_with_30_updates_in_flight_loses_none(tmp_path, fake):
    c = Corral(tmp_path, bot(fake), agent=CHAOS).start()
    expected = [f"answer {i:02d}" for i in range(30)]
    try:
        for text in expected:
            fake.user_message(TOKEN, PRIVATE, f"sleep 0.2; echo {text}")
        until(lambda: len(fake.sent(TOKEN)) >= 3, what="the first answers")
        c.kill9()
        assert len(fake.sent(TOKEN)) < 30, "all answered before the kill: nothing was in flight"
        assert not c.leftovers(), "a worker outlived its supervisor"
        c.start()
        until(lambda: {m["text"] for m in fake.sent(TOKEN)} >= set(expected), timeout=120)
        time.sleep(3)  # long enough for a late second answer to show up, if there were one
        texts = [m["text"] for m in fake.sent(TOKEN)]
        assert set(texts) == set(expected)
        assert len(texts) - len(expected) <= 1  # at most the reply in flight at the kill
        firsts = sorted(set(texts), key=texts.index)
        assert firsts == expected  # one chat's answers in the order its messages came
        assert c.stop() == 0
    finally:
        if c.proc is not None and c.proc.poll() is None:
            c.kill9()
    assert not c.leftovers()


def test_a_429_with_retry_after_3_is_honoured_and_holds_up_no_other_chat(corral, fake):
    corral(bot(fake))
    fake.fault(
        TOKEN,
        "sendMessage",
        status=429,
        description="Too Many Requests: retry after 3",
        retry_after=3,
        chat_id=PRIVATE,
    )
    fake.user_message(TOKEN, PRIVATE, "rate limited chat")

    def limited() -> float | None:
        asked = [
            p for p in fake.requests(TOKEN, "sendMessage") if str(p["chat_id"]) == str(PRIVATE)
        ]
        return time.time() if asked else None

    limited_at = until(limited, what="the first, refused send")
    fake.user_message(TOKEN, GROUP, "another chat", chat_type="group")
    until(lambda: len(fake.sent(TOKEN)) == 2, what="both replies")
    sent = {m["text"]: m["at"] for m in fake.sent(TOKEN)}
    assert sent["another chat"] < sent["rate limited chat"]  # the other chat was not held up
    assert sent["rate limited chat"] >= limited_at + 2.9  # not before retry_after
    assert fake.early_sends(TOKEN) == []  # no send to that chat inside the 3 s


MARKUP = "tests.agents:markup"


def test_an_agent_asks_for_formatting_and_broken_markup_is_shown_as_typed(corral, fake):
    c = corral(bot(fake), agent=MARKUP)
    fake.user_message(TOKEN, PRIVATE, "markdown *bold* and _italic_")
    fake.user_message(TOKEN, PRIVATE, "html <b>bold</b>")
    fake.user_message(TOKEN, PRIVATE, "plain *as typed*")
    fake.user_message(TOKEN, PRIVATE, "markdown *unclosed")
    sent = fake.wait_sent(TOKEN, 4, timeout=60)
    got = [(m["text"], m["parse_mode"]) for m in sent]
    assert got == [
        ("*bold* and _italic_", "MarkdownV2"),
        ("<b>bold</b>", "HTML"),
        ("*as typed*", None),  # plain text unless the agent asks
        ("*unclosed", None),  # Telegram could not parse it: resent once as plain text
    ]
    # an unknown markup is the agent's error, answered as such
    fake.user_message(TOKEN, PRIVATE, "rtf {\\b x}")
    (last,) = fake.wait_sent(TOKEN, 5, timeout=60)[4:]
    assert last["text"].startswith("turn failed:") and "markup" in last["text"]
    # over HTTP the markup travels as a field of the reply; the text is as the agent wrote it
    (reply,) = c.send("web", "html <i>hi</i>")["replies"]
    assert reply == {"text": "<i>hi</i>", "kind": "reply", "markup": "html"}
    (plain,) = c.send("web", "plain hi")["replies"]
    assert plain == {"text": "hi", "kind": "reply"}
