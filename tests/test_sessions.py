"""Sessions through their life: quarantine and release, slots, and turns that end as their
worker dies. Each of these invariants used to be one line and a comment in the supervisor.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import Corral, wait_for

CHAOS = "corral.worker.agents.chaos:agent"
DYING = "tests.agents_sessions:agent"
# three abnormal exits within a minute quarantine a session, for ten minutes: long
# enough that only `corral release` (or a bug) can end it while a test runs
CRASH_LOOP = {"limits": {"restart_intensity": 2, "restart_period": "60s", "quarantine": "10m"}}
QUARANTINE_SECONDS = 600
IDLE_COUNTS = {"starting": 0, "idle": 1, "busy": 0, "stopping": 0, "quarantined": 0}


def quarantine(c: Corral, session: str) -> dict[str, Any]:
    """Crash the session's workers until it is quarantined; its row in `corral ls`, and the
    reason its last worker's end was given."""
    for _ in range(3):
        body = c.send(session, "crash")
        assert body["status"] == "error", body
        # "crashed"; on a saturated machine a worker at idle priority can take over a second
        # to finish dying once its socket is closed, and is then said to have broken the
        # protocol: an abnormal exit all the same
        reason = re.fullmatch(
            r"turn stopped: .* \[(crashed|protocol_error)\]", body["replies"][-1]["text"]
        )
        assert reason, body
    rows = wait_for(
        lambda: [r for r in c.ls() if r["session"] == session and r["state"] == "quarantined"]
    )
    return {**rows[0], "last_reason": reason.group(1)}


def refused(c: Corral, session: str) -> None:
    """A message to the session is answered at once with the quarantine error."""
    body = c.send(session, "echo are you there?")
    assert body["status"] == "error", body
    assert [r["kind"] for r in body["replies"]] == ["error"]
    text = body["replies"][0]["text"]
    assert text.startswith("session quarantined after repeated worker failures"), text
    assert f"`corral release {session}`" in text and text.endswith("[quarantined]"), text


def replies(c: Corral, session: str, after: int = 0) -> list[dict[str, Any]]:
    status, body = c.request("GET", f"/v1/sessions/{session}/replies?after={after}&limit=1000")
    assert status == 200, body
    return body["replies"]  # type: ignore[no-any-return]


def replies_until(c: Corral, session: str, count: int, after: int = 0) -> list[dict[str, Any]]:
    """Long-poll the session's replies until `count` have come (30 s at most)."""
    got: list[dict[str, Any]] = []
    for _ in range(30):  # ends when `count` replies have come, or after 30 polls of 1 s
        status, body = c.request("GET", f"/v1/sessions/{session}/replies?after={after}&wait=1")
        assert status == 200, body
        got += body["replies"]
        after = body["cursor"]
        if len(got) >= count:
            return got
    raise AssertionError(f"{session}: {len(got)} of {count} replies: {got}")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _ControlConnection(http.client.HTTPConnection):
    """HTTP over the control socket, without a `corral` CLI process to start (that takes
    longer than the moments this file looks at)."""

    def __init__(self, path: Path) -> None:
        super().__init__("corral", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def show_now(c: Corral, session: str) -> dict[str, Any] | None:
    """The session as `corral show --json` would print it, or None if there is none."""
    conn = _ControlConnection(c.state / "control.sock")
    try:
        conn.request("GET", f"/v1/sessions/{session}")
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    return body if resp.status == 200 else None  # type: ignore[no-any-return]


# ---- quarantine and release


def test_release_lifts_a_quarantine_at_once_and_ls_shows_it_before(corral):
    c = corral(CRASH_LOOP, agent=CHAOS)
    row = quarantine(c, "loop")
    assert row["state"] == "quarantined" and row["pid"] is None, row
    assert (row["restarts"], row["last_exit"]) == (3, row["last_reason"])
    # ten minutes from the third crash, a moment ago (same machine, same clock)
    assert QUARANTINE_SECONDS - 60 < row["quarantined_until"] - time.time() <= QUARANTINE_SECONDS
    table = c.cli("ls").stdout.splitlines()
    assert any(line.split()[:2] == ["loop", "quarantined"] for line in table[1:]), table
    refused(c, "loop")
    assert c.texts("other", "echo unaffected") == ["unaffected"]

    result = c.cli("release", "loop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "released loop"
    # ten minutes early: only the release can have lifted it
    body = c.send("loop", "echo back")
    assert body["status"] == "done", body
    assert [r["text"] for r in body["replies"]] == ["back"]
    row = next(r for r in c.ls() if r["session"] == "loop")
    assert row["state"] == "idle" and row["quarantined_until"] is None, row
    assert row["restarts"] == 3  # released, not forgotten
    again = c.cli("release", "loop")
    assert again.returncode == 1
    assert "is not quarantined" in again.stderr


def test_a_quarantine_outlives_a_supervisor_restart(corral):
    c = corral(CRASH_LOOP, agent=CHAOS)
    until = quarantine(c, "loop")["quarantined_until"]
    assert c.stop() == 0
    c.start()  # the same state dir
    rows = c.ls()
    assert [(r["session"], r["state"], r["pid"]) for r in rows] == [("loop", "quarantined", None)]
    assert rows[0]["quarantined_until"] == pytest.approx(until, abs=0.01)  # not a new ten minutes
    refused(c, "loop")

    # a release is remembered as well: the next run serves the session
    assert c.cli("release", "loop").returncode == 0
    assert c.stop() == 0
    c.start()
    assert c.ls() == []
    assert c.texts("loop", "echo back") == ["back"]


def test_release_of_a_session_with_no_worker_makes_no_ghost(corral):
    c = corral(CRASH_LOOP, agent=CHAOS)
    assert c.texts("bystander", "echo here") == ["here"]
    quarantine(c, "loop")
    refused(c, "loop")  # its queue is empty again
    before = json.loads(c.cli("status", "--json").stdout)
    assert before["sessions"] == 2
    assert before["workers"] == {**IDLE_COUNTS, "quarantined": 1}

    result = c.cli("release", "loop", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["session"] == "loop" and shown["quarantined_until"] is None, shown
    assert shown["pid"] is None and shown["queue"] == 0, shown

    # nothing to do: the session is not listed, counted or exported as live any more;
    # `show` finds it in the store only, with no worker (sessions past their worker)
    assert [r["session"] for r in c.ls()] == ["bystander"]
    assert [line.split()[0] for line in c.cli("ls").stdout.splitlines()[1:]] == ["bystander"]
    show = json.loads(c.cli("show", "loop", "--json").stdout)
    assert show["state"] == "inactive" and show["pid"] is None, show
    after = json.loads(c.cli("status", "--json").stdout)
    assert after["sessions"] == 1 and after["inbox"] == 0, after
    assert after["workers"] == IDLE_COUNTS, after
    metrics = c.metrics()
    assert not [k for k in metrics if 'session="loop"' in k], metrics
    assert {s: metrics[f'corral_workers{{state="{s}"}}'] for s in IDLE_COUNTS} == IDLE_COUNTS
    # and it is served like any other session when a message comes
    assert c.texts("loop", "echo back") == ["back"]


# ---- slots


def test_an_idle_worker_yields_its_slot_to_a_waiting_session(corral):
    c = corral({"supervisor": {"max_workers": 1, "idle_timeout": "10m"}}, agent=CHAOS)
    status, _ = c.request(
        "POST", "/v1/messages", {"session": "first", "text": "sleep 4; echo first", "id": "f1"}
    )
    assert status == 202
    first = wait_for(lambda: (row := show_now(c, "first")) and row["state"] == "busy" and row)
    # the only slot is busy, so nothing can be evicted: the second session waits
    status, _ = c.request(
        "POST", "/v1/messages", {"session": "second", "text": "echo second", "id": "s1"}
    )
    assert status == 202
    waiting = show_now(c, "second")
    assert waiting is not None and (waiting["state"], waiting["pid"]) == ("starting", None)
    assert show_now(c, "first")["state"] == "busy"  # type: ignore[index]
    # the first turn ends; its worker, now idle, gives up the slot long before idle_timeout
    got = replies_until(c, "second", 1)
    assert [(r["in_reply_to"], r["text"]) for r in got] == [("s1", "second")]
    assert [(r["in_reply_to"], r["text"]) for r in replies(c, "first")] == [("f1", "first")]
    wait_for(lambda: not alive(first["pid"]))
    rows = c.ls()
    assert [(r["session"], r["state"]) for r in rows] == [("second", "idle")], rows
    assert c.metrics()['corral_worker_exits_total{reason="evicted"}'] == 1


# ---- turns that end as their worker dies


@pytest.mark.parametrize(
    ("text", "expected", "status"),
    [
        pytest.param(
            "echo one; echo two; exit-after-done",
            [("one", "reply"), ("two", "reply")],
            "done",
            id="dies-right-after-done",
        ),
        pytest.param(
            "echo one; exit",
            [
                ("one", "reply"),
                ("turn stopped: the worker exited in the middle of the turn [crashed]", "error"),
            ],
            "error",
            id="dies-before-done",
        ),
    ],
)
def test_an_ending_turn_is_answered_once(corral, text, expected, status):
    """A worker that exits as its turn ends: right after Done (the turn's end answers it)
    or right before (its reap does). Either way once, in ?wait and in the long-poll alike.
    The ordinary path; the race inside it is reached by the slow-store test below."""
    c = corral(agent=DYING)
    sessions = [f"end{i}" for i in range(8)]  # eight at once, so deaths and turn ends interleave
    with ThreadPoolExecutor(len(sessions)) as pool:
        bodies = list(pool.map(lambda s: c.send(s, text, id=f"{s}-1"), sessions))
    for body in bodies:
        assert body["status"] == status, body
        assert [(r["text"], r["kind"]) for r in body["replies"]] == expected, body
    # every worker died and was reaped: nothing more will be said about these turns
    crashed = 'corral_worker_exits_total{reason="crashed"}'
    wait_for(lambda: c.metrics().get(crashed) == len(sessions))
    wait_for(lambda: c.ls() == [])
    for s in sessions:
        got = [(r["in_reply_to"], r["text"], r["kind"]) for r in replies(c, s)]
        assert got == [(f"{s}-1", t, k) for t, k in expected], got
    assert c.metrics()[crashed] == len(sessions)
    assert c.texts("end0", "echo again") == ["again"]


def test_an_ending_turn_is_answered_once_while_the_store_is_slow(corral):
    """The worker sends its replies and Done and exits at once, while the store is held
    up (another writer holds SQLite's write lock for longer than the second the supervisor
    keeps reading a dead worker's socket). The turn's end, still waiting for the store,
    must not be cut short by that deadline, nor answered a second time by the reap."""
    c = corral(agent=DYING)
    got: dict[str, Any] = {}
    sender = threading.Thread(
        target=lambda: got.update(
            c.send("slow", "sleep 1; echo one; echo two; exit-after-done", wait=60, id="slow-1")
        )
    )
    sender.start()
    try:
        turn = wait_for(lambda: (row := show_now(c, "slow")) and row["turn"] and row, interval=0.01)
        lock = sqlite3.connect(c.state / "corral.db", isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN IMMEDIATE")  # every write of the supervisor waits from now on
            wait_for(lambda: not alive(turn["pid"]), interval=0.01)
            time.sleep(2.0)  # past the deadline for reading what the dead worker left
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    finally:
        sender.join(90)
    assert got["status"] == "done", got
    assert [(r["text"], r["kind"]) for r in got["replies"]] == [("one", "reply"), ("two", "reply")]
    wait_for(lambda: c.ls() == [])  # reaped
    polled = [(r["in_reply_to"], r["text"], r["kind"]) for r in replies(c, "slow")]
    assert polled == [("slow-1", "one", "reply"), ("slow-1", "two", "reply")]
    status = json.loads(c.cli("status", "--json").stdout)
    assert status["inbox"] == 0 and c.metrics()["corral_inbox_depth"] == 0, status
    # finished for good: the next run does not run it again
    assert c.stop() == 0
    c.start()
    assert c.texts("slow", "echo next") == ["next"]
    assert [r["text"] for r in replies(c, "slow")] == ["one", "two", "next"]


def test_a_message_that_meets_a_dead_worker_before_its_reap_is_put_back_and_answered(corral):
    """A worker dies by itself while idle between turns, and messages for its session come
    before the supervisor has reaped it. The first one's start finds the worker dead: it is
    put back, and a new worker answers every message, once each, in order, as a first
    attempt (the start that never reached a worker is not counted).

    The reap waits for the zygote's report of the exit; the zygote is stopped (SIGSTOP)
    for that moment, so the messages surely come inside the window instead of by luck.
    """
    c = corral(agent=DYING)
    zygote = psutil.Process(json.loads(c.cli("status", "--json").stdout)["zygote_pid"])
    for n in range(3):
        s = f"racer{n}"
        body = c.send(s, "whoami; exit-in 1.5", id=f"{s}-0")
        assert body["status"] == "done", body
        old = int(body["replies"][0]["text"].split()[0])
        cursor = replies(c, s)[-1]["cursor"]
        ids = [f"{s}-{i}" for i in (1, 2, 3)]
        zygote.suspend()
        try:
            assert alive(old), "the worker died before the zygote was stopped"
            wait_for(lambda old=old: not alive(old), interval=0.01)  # a zombie: nobody reaps it
            for i, id_ in enumerate(ids, 1):
                status, _ = c.request(
                    "POST", "/v1/messages", {"session": s, "text": f"whoami; echo m{i}", "id": id_}
                )
                assert status == 202
            seen = show_now(c, s)
        finally:
            zygote.resume()
        assert seen is not None and seen["pid"] == old, f"the race was not reached: {seen}"
        got = replies_until(c, s, 6, after=cursor)
        new = wait_for(lambda s=s: (row := show_now(c, s)) and row["state"] == "idle" and row)
        assert new["pid"] != old
        wanted = [
            (id_, text, "reply")
            for i, id_ in enumerate(ids, 1)
            for text in (f"{new['pid']} attempt 1", f"m{i}")
        ]
        assert [(r["in_reply_to"], r["text"], r["kind"]) for r in got] == wanted
        # nothing more came for them
        later = [(r["in_reply_to"], r["text"], r["kind"]) for r in replies(c, s, after=cursor)]
        assert later == wanted
