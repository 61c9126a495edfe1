"""End to end: a real supervisor, real workers, messages over HTTP."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ECHO_PID = "tests.agents:pid_echo"


def test_cli_send_prints_the_reply(corral):
    c = corral()
    result = c.cli("send", "alice", "hello there", "--wait", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello there\n"


def test_cli_send_json_prints_the_body(corral):
    c = corral()
    result = c.cli("send", "alice", "hi", "--wait", "10", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "done" and body["session"] == "alice"
    assert body["replies"] == [{"text": "hi", "kind": "reply"}]


def test_thirty_sessions_get_their_own_replies_in_order_from_thirty_workers(corral):
    c = corral(agent=ECHO_PID)
    sessions = [f"user{i}" for i in range(30)]
    got: dict[str, list[str]] = {s: [] for s in sessions}

    def converse(session: str) -> None:
        for n in range(4):
            got[session].extend(c.texts(session, f"{session} message {n}"))

    with ThreadPoolExecutor(30) as pool:
        list(pool.map(converse, sessions))
    pids = set()
    for s in sessions:
        texts = [t.split(" ", 1)[1] for t in got[s]]
        assert texts == [f"{s} message {n}" for n in range(4)]
        worker_pids = {t.split(" ", 1)[0] for t in got[s]}
        assert len(worker_pids) == 1, f"{s} was served by {worker_pids}"
        pids |= worker_pids
    assert len(pids) == 30

    # the same replies, oldest first, over the long-poll with a cursor
    for s in sessions:
        status, body = c.request("GET", f"/v1/sessions/{s}/replies?limit=2")
        assert status == 200
        first = [r["text"].split(" ", 1)[1] for r in body["replies"]]
        status, body = c.request("GET", f"/v1/sessions/{s}/replies?after={body['cursor']}")
        rest = [r["text"].split(" ", 1)[1] for r in body["replies"]]
        assert first + rest == [f"{s} message {n}" for n in range(4)]

    assert c.stop() == 0
    assert not c.leftovers()


def test_long_poll_wakes_when_a_reply_arrives(corral):
    c = corral()
    result: dict = {}

    def poll() -> None:
        result["started"] = time.monotonic()
        result["response"] = c.request("GET", "/v1/sessions/bob/replies?wait=30")
        result["took"] = time.monotonic() - result["started"]

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    status, body = c.request("POST", "/v1/messages", {"session": "bob", "text": "ping"})
    assert status == 202 and body["status"] == "accepted"
    poller.join(40)
    status, body = result["response"]
    assert status == 200
    assert [r["text"] for r in body["replies"]] == ["ping"]
    assert body["replies"][0]["in_reply_to"] == body["replies"][0]["id"].rsplit(":", 1)[0]
    assert result["took"] < 25  # woke on the reply, not at the end of the wait


def test_long_poll_times_out_empty_with_the_same_cursor(corral):
    c = corral()
    status, body = c.request("GET", "/v1/sessions/nobody/replies?after=7&wait=0.3")
    assert status == 200 and body == {"replies": [], "cursor": 7}


def test_async_agent_and_progress(corral):
    c = corral(agent="tests.agents:async_echo")
    assert c.texts("a", "x") == ["first x", "second x"]


def test_agent_that_raises_gets_an_error_reply_and_the_session_goes_on(corral):
    c = corral(agent="tests.agents:raiser")
    body = c.send("carol", "boom")
    assert body["status"] == "error"
    assert body["replies"][-1]["kind"] == "error"
    assert "ValueError: boom requested" in body["replies"][-1]["text"]
    body = c.send("carol", "still there?")
    assert body["status"] == "done"
    assert [r["text"] for r in body["replies"]] == ["still there?"]


def test_idle_worker_exits_and_a_new_one_serves_the_next_message(corral):
    c = corral({"supervisor": {"idle_timeout": "1s"}}, agent=ECHO_PID)
    first = c.texts("dave", "one")[0].split()[0]
    time.sleep(3)
    import psutil

    assert not psutil.pid_exists(int(first)), "the idle worker should have exited"
    second = c.texts("dave", "two")[0].split()[0]
    assert first != second


def test_least_recently_used_idle_worker_is_evicted_at_max_workers(corral):
    import psutil

    c = corral({"supervisor": {"max_workers": 2}}, agent=ECHO_PID)
    a = c.texts("a", "1")[0].split()[0]
    time.sleep(0.1)
    b = c.texts("b", "1")[0].split()[0]
    cc = c.texts("c", "1")[0].split()[0]  # evicts a, the least recently used
    assert len({a, b, cc}) == 3
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(a)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(int(a))
    assert psutil.pid_exists(int(b)) and psutil.pid_exists(int(cc))
    a2 = c.texts("a", "2")[0].split()[0]  # evicts b
    assert a2 != a


def test_the_same_id_twice_is_one_message(corral):
    c = corral(agent=ECHO_PID)
    first = c.send("erin", "once", id="msg-1")
    second = c.send("erin", "once", id="msg-1")
    assert first["id"] == second["id"] == "msg-1"
    assert first["replies"] == second["replies"]
    _, body = c.request("GET", "/v1/sessions/erin/replies")
    assert len(body["replies"]) == 1


def test_history_reaches_the_agent_and_logs_reach_the_supervisor(corral):
    c = corral(agent="tests.agents:history")
    assert c.texts("fay", "a") == ["a"]
    assert c.texts("fay", "b") == ["a|b"]
    assert "[fay] corral.agent: history has 1 user lines" in c.log()


@pytest.mark.parametrize(
    ("body", "raw", "path", "needle"),
    [
        (None, b"{not json", "/v1/messages", "invalid JSON"),
        ({"session": "a b", "text": "x"}, None, "/v1/messages", "session key"),
        ({"session": "..", "text": "x"}, None, "/v1/messages", "dots"),
        ({"session": "x" * 201, "text": "x"}, None, "/v1/messages", "session key"),
        ({"session": "a", "text": "x" * 70000}, None, "/v1/messages", "text too long"),
        ({"session": "a"}, None, "/v1/messages", "text"),
        ({"session": "a", "text": "x", "extra": 1}, None, "/v1/messages", "extra"),
        ({"session": "a", "text": 5}, None, "/v1/messages", "text"),
        ({"session": "a", "text": "x"}, None, "/v1/messages?wait=soon", "wait"),
        ({"session": "a", "text": "x"}, None, "/v1/messages?wait=-1", "wait"),
    ],
)
def test_bad_input_is_a_400_with_a_reason(corral, body, raw, path, needle):
    c = corral()
    status, answer = c.request("POST", path, body, raw=raw)
    assert status == 400
    assert needle in answer["error"]


def test_bad_query_on_replies_is_a_400(corral):
    c = corral()
    assert c.request("GET", "/v1/sessions/a/replies?limit=5000")[0] == 400
    assert c.request("GET", "/v1/sessions/a%20b/replies")[0] == 400
    assert c.request("GET", "/v1/sessions/a/replies?after=x")[0] == 400


def test_sigterm_stops_the_supervisor_with_exit_0_and_nothing_left(corral):
    c = corral(agent=ECHO_PID)
    for s in ("p", "q", "r"):
        c.texts(s, "hi")
    assert c.stop() == 0
    assert not c.leftovers()
