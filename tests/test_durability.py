"""Nothing accepted is lost; every reply goes back where its message came from."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import threading
import time
import urllib.error
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.protocol.types import Origin
from corral.supervisor.store import FETCHED, Store
from tests.crashes import TEXT, assert_answered_interrupted_twice, crash_twice_during
from tests.harness import Corral, running
from tests.receiver import Receiver

CHAOS = "corral.worker.agents.chaos:agent"


def post_until_accepted(c: Corral, body: dict, deadline: float) -> None:
    """POST with the same id until corral accepts it (it may be down in between)."""
    while time.monotonic() < deadline:  # ends when accepted or at the deadline
        try:
            status, _ = c.request("POST", "/v1/messages", body, timeout=10)
            if status == 202:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"never accepted: {body}")


def all_replies(c: Corral, session: str) -> list[dict]:
    status, body = c.request("GET", f"/v1/sessions/{session}/replies?limit=1000")
    assert status == 200
    return body["replies"]


def test_sigkill_mid_run_and_restart_every_message_gets_exactly_one_reply(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    sessions = [f"s{i:02d}" for i in range(20)]
    messages = [(s, f"{s}-m{n}") for n in range(10) for s in sessions]
    deadline = time.monotonic() + 120
    old_pids: set[int] = set()

    def killer() -> None:
        # wait until a good part is accepted and some turns are running, then SIGKILL
        while True:  # ends once 80 messages are in the inbox
            try:
                n = (
                    sqlite3.connect(c.state / "corral.db")
                    .execute("SELECT count(*) FROM messages")
                    .fetchone()[0]
                )
            except sqlite3.Error:
                n = 0
            if n >= 80:
                break
            time.sleep(0.02)
        old_pids.update(p.pid for p in psutil.Process(c.proc.pid).children(recursive=True))
        c.kill9()
        time.sleep(0.5)
        c.start()

    k = threading.Thread(target=killer)
    k.start()
    with ThreadPoolExecutor(20) as pool:
        list(
            pool.map(
                lambda m: post_until_accepted(
                    c, {"session": m[0], "text": f"sleep 0.1; echo {m[1]}", "id": m[1]}, deadline
                ),
                messages,
            )
        )
    k.join(60)
    assert old_pids, "the supervisor was not killed mid-run"

    wanted = {s: {m for ss, m in messages if ss == s} for s in sessions}
    while time.monotonic() < deadline:
        got = {s: all_replies(c, s) for s in sessions}
        if all(len(got[s]) >= len(wanted[s]) for s in sessions):
            break
        time.sleep(0.5)
    for s in sessions:
        per_message = Counter(r["in_reply_to"] for r in got[s])
        assert set(per_message) == wanted[s]
        assert all(n == 1 for n in per_message.values()), per_message
        assert all(r["text"] == r["in_reply_to"] for r in got[s])
    # nothing of the killed run survived it
    assert not running(old_pids)
    # re-posting an id accepted before the crash is still one message
    status, body = c.request(
        "POST", "/v1/messages?wait=10", {"session": "s00", "text": "again", "id": "s00-m0"}
    )
    assert status == 200 and [r["text"] for r in body["replies"]] == ["s00-m0"]
    assert len(all_replies(c, "s00")) == 10
    assert c.stop() == 0
    assert not c.leftovers()


def test_a_message_interrupted_twice_by_crashes_is_answered_with_an_error(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    c.request("POST", "/v1/messages", {"session": "doomed", "text": TEXT, "id": "doomed-1"})
    crash_twice_during(c, "doomed-1")
    assert_answered_interrupted_twice(c, "doomed", "doomed-1")


def test_restart_after_sigkill_finds_no_stale_lock_socket_port_or_worker(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    assert c.texts("keep", "echo one") == ["one"]
    old_worker = c.ls()[0]["pid"]
    c.kill9()
    c.start()  # same state dir, same ports, same control socket path
    assert not running([old_worker])
    assert c.texts("keep", "echo two") == ["two"]  # the transcript lock is free
    rows = c.ls()
    assert [r["session"] for r in rows] == ["keep"] and rows[0]["pid"] != old_worker
    assert (c.state / "control.sock").exists()
    assert c.stop() == 0
    assert not c.leftovers()


def webhook_config(receiver: Receiver, secret: str = "", **delivery: object) -> dict:
    return {
        "channels.webhook.hooks": {"url": receiver.url, "secret": secret},
        "delivery": {"retry_initial": "200ms", "retry_max": "2s", **delivery},
    }


def test_replies_go_only_to_the_channel_their_message_came_from(corral):
    with Receiver([200]) as rx:
        c = corral(webhook_config(rx, secret="s3cret"))
        status, _ = c.request(
            "POST",
            "/v1/channels/hooks/messages",
            {
                "session": "mix",
                "text": "via hook",
                "chat": "room-7",
                "thread": "t-3",
                "user": "ann",
                "id": "w1",
            },
        )
        assert status == 202
        assert c.texts("mix", "via http") == ["via http"]
        rx.wait_requests(1)
        time.sleep(1.0)  # anything else that was going to arrive has arrived
        delivered = rx.delivered()
        assert len(delivered) == 1
        d = delivered[0]
        assert d["text"] == "via hook" and d["in_reply_to"] == "w1" and d["session"] == "mix"
        assert d["id"] == "w1:0" and d["kind"] == "reply"
        assert d["origin"]["channel"] == "hooks"
        assert (d["origin"]["chat"], d["origin"]["thread"], d["origin"]["user"]) == (
            "room-7",
            "t-3",
            "ann",
        )
        raw = rx.requests[0]["raw"]
        stamp = rx.requests[0]["headers"]["X-Corral-Timestamp"].encode()
        signed = stamp + b"." + raw  # the timestamp is signed with the body
        expected = "sha256=" + hmac.new(b"s3cret", signed, hashlib.sha256).hexdigest()
        assert rx.requests[0]["headers"]["X-Corral-Signature"] == expected
        # the HTTP channel sees only its own reply
        assert [r["text"] for r in all_replies(c, "mix")] == ["via http"]
        assert c.metrics()['corral_replies_delivered_total{channel="hooks"}'] == 1


def test_unknown_webhook_channel_is_a_404(corral):
    c = corral()
    status, body = c.request("POST", "/v1/channels/nope/messages", {"session": "a", "text": "x"})
    assert status == 404 and "nope" in body["error"]


def test_webhook_answering_503_twice_gets_the_reply_once_on_the_third_try(corral):
    with Receiver([503, 503, 200]) as rx:
        c = corral(webhook_config(rx))
        c.request(
            "POST", "/v1/channels/hooks/messages", {"session": "r", "text": "hello", "id": "r1"}
        )
        reqs = rx.wait_requests(3)
        time.sleep(2.5)  # no fourth try comes
        assert [r["status"] for r in rx.requests] == [503, 503, 200]
        assert all(r["body"]["id"] == "r1:0" for r in reqs)
        # backoff with jitter: at least half of 200 ms, then at least half of 400 ms
        assert reqs[1]["at"] - reqs[0]["at"] >= 0.09
        assert reqs[2]["at"] - reqs[1]["at"] >= 0.19
        m = c.metrics()
        assert m['corral_delivery_failures_total{channel="hooks"}'] == 2
        assert m['corral_replies_delivered_total{channel="hooks"}'] == 1


def test_webhook_answering_400_is_tried_once_and_dead_lettered(corral):
    with Receiver([400]) as rx:
        c = corral(webhook_config(rx))
        c.request(
            "POST", "/v1/channels/hooks/messages", {"session": "r", "text": "hello", "id": "bad1"}
        )
        rx.wait_requests(1)
        time.sleep(2.0)
        assert len(rx.requests) == 1
        assert c.metrics()['corral_dead_letters_total{channel="hooks"}'] == 1
        db = sqlite3.connect(c.state / "corral.db")
        assert db.execute(
            "SELECT delivery, last_error FROM replies WHERE id = 'bad1:0'"
        ).fetchone() == (
            "dead",
            "HTTP 400: not retried",
        )


def test_delivery_gives_up_after_max_attempts(corral):
    with Receiver([500]) as rx:
        c = corral(webhook_config(rx, max_attempts=3))
        c.request("POST", "/v1/channels/hooks/messages", {"session": "r", "text": "x", "id": "m"})
        rx.wait_requests(3)
        time.sleep(3.0)
        assert len(rx.requests) == 3
        assert c.metrics()['corral_dead_letters_total{channel="hooks"}'] == 1


def test_a_slow_receiver_does_not_hold_up_another_channel_or_turns(corral):
    with Receiver([200], delay=8.0) as slow, Receiver([200]) as fast:
        c = corral(
            {
                "channels.webhook.slow": {"url": slow.url},
                "channels.webhook.fast": {"url": fast.url},
            }
        )
        t0 = time.monotonic()
        c.request("POST", "/v1/channels/slow/messages", {"session": "a", "text": "to slow"})
        c.request("POST", "/v1/channels/fast/messages", {"session": "b", "text": "to fast"})
        assert c.texts("a", "http meanwhile") == ["http meanwhile"]  # the session is not held up
        fast.wait_requests(1, timeout=5)
        assert time.monotonic() - t0 < 5
        assert [r["text"] for r in fast.delivered()] == ["to fast"]
        slow.wait_requests(1, timeout=20)


origins = st.builds(
    Origin,
    channel=st.sampled_from(["http", "hooks", "ops"]),
    chat=st.text(max_size=5),
    thread=st.text(max_size=5),
    user=st.text(max_size=5),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), origins, st.integers(1, 3)), max_size=25)
)
def test_property_every_reply_is_routed_by_its_origin_and_nothing_else(tmp_path_factory, sent):
    """Whatever mix of sessions and origins: a channel gets exactly its own replies,
    with the origin of the message they answer."""
    path: Path = tmp_path_factory.mktemp("store") / "corral.db"

    async def run() -> None:
        store = Store(path)
        await store.open()
        expected: dict[str, dict[str, Origin]] = {"http": {}, "hooks": {}, "ops": {}}
        try:
            for i, (session, origin, n) in enumerate(sent):
                acc = await store.accept(session, f"text {i}", origin, f"id{i}")
                for k in range(n):
                    push = origin.channel != "http"
                    reply = await store.add_reply(acc.message, k, f"r{i}.{k}", "reply", push=push)
                    assert reply is not None and reply.origin == origin
                    expected[origin.channel][reply.id] = origin
            for channel in ("hooks", "ops"):
                routed: dict[str, Origin] = {}
                while due := await store.due_deliveries(channel, time.time() + 1, 1000):
                    for r in due:
                        routed[r.reply.id] = r.reply.origin
                        await store.mark_delivery(r.reply.id, "delivered", 1)
                assert routed == expected[channel]
            for session in ("a", "b", "c"):
                polled = await store.replies_after(session, "http", 0, 1000)
                assert all(r.delivery == FETCHED for r in polled)
                assert {r.reply.id for r in polled} == {
                    rid
                    for rid in expected["http"]
                    if rid.startswith("id") and _session_of(sent, rid) == session
                }
        finally:
            await store.close()

    asyncio.run(run())


def _session_of(sent: list, reply_id: str) -> str:
    return sent[int(reply_id.split(":")[0][2:])][0]


def test_a_sessions_abnormal_exits_are_remembered_across_restarts(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    for _ in range(2):
        assert c.send("flaky", "crash")["status"] == "error"
    assert c.texts("flaky", "echo ok") == ["ok"]
    row = c.ls()[0]
    assert (row["restarts"], row["last_exit"]) == (2, "crashed")
    assert c.stop() == 0
    c.start()
    assert c.texts("flaky", "echo again") == ["again"]
    row = c.ls()[0]
    assert (row["restarts"], row["last_exit"]) == (2, "crashed")
    assert c.stop() == 0


def test_a_pending_retry_holds_back_the_sessions_later_replies_without_spinning(corral):
    with Receiver([503, 200]) as rx:
        c = corral(webhook_config(rx, retry_initial="2s", retry_max="2s"), agent=CHAOS)
        body = {"session": "o", "text": "echo a; echo b", "id": "ab"}
        c.request("POST", "/v1/channels/hooks/messages", body)
        rx.wait_requests(1)
        supervisor = psutil.Process(c.proc.pid)
        supervisor.cpu_percent()
        time.sleep(1.0)  # the retry of "a" is due in 1-2 s; "b" must wait for it
        busy = supervisor.cpu_percent()
        assert busy < 50, f"the supervisor used {busy:.0f}% of a core while waiting to retry"
        rx.wait_requests(3, timeout=15)
        assert [r["body"]["text"] for r in rx.requests] == ["a", "a", "b"]
        assert [r["body"]["id"] for r in rx.requests if r["status"] == 200] == ["ab:0", "ab:1"]


def test_webhook_origin_fields_are_bounded(corral):
    with Receiver([200]) as rx:
        c = corral(webhook_config(rx))
        body = {"session": "a", "text": "x", "chat": "c" * 2000}
        status, answer = c.request("POST", "/v1/channels/hooks/messages", body)
        assert status == 400 and "chat must be at most 1024" in answer["error"]
