"""The short cuts taken for speed keep every promise of the long way round.

- A message to a session whose worker is idle has its first start counted in the
  accept's commit: a crash still counts, and twice interrupted is still an error.
- Operations submitted in one loop iteration share one commit, and one that fails
  still fails alone.
"""

from __future__ import annotations

import json
import sqlite3
import time

from tests.crashes import TEXT, assert_answered_interrupted_twice, crash_twice_during
from tests.harness import Corral

CHAOS = "corral.worker.agents.chaos:agent"


def test_a_message_to_an_idle_worker_interrupted_twice_is_answered_with_an_error(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    assert c.texts("doomed", "echo warm") == ["warm"]  # the worker is idle now
    status, _ = c.request(
        "POST", "/v1/messages", {"session": "doomed", "text": TEXT, "id": "doomed-1"}
    )
    assert status == 202
    crash_twice_during(c, "doomed-1")
    assert_answered_interrupted_twice(c, "doomed", "doomed-1")


def test_messages_to_an_idle_worker_are_counted_once_each(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    for n in range(5):
        assert c.texts("warm", f"echo {n}") == [str(n)]
    db = sqlite3.connect(c.state / "corral.db")
    rows = db.execute("SELECT attempts, state FROM messages ORDER BY seq").fetchall()
    assert rows == [(1, "done")] * 5
    assert c.stop() == 0


# ---- the agent's warm-up, run by the zygote before it forks


def test_the_agents_warm_up_runs_once_in_the_zygote_with_the_options(tmp_path):
    c = Corral(
        tmp_path,
        config={"agent.options": {"greeting": "hi"}},
        agent="tests.agents_warm:agent",
    ).start()
    zygote = json.loads(c.cli("status", "--json").stdout)["zygote_pid"]
    first = c.texts("a", "x")
    second = c.texts("b", "x")
    for (text,) in (first, second):
        assert text.startswith(f"warmed in {zygote} (1 calls) hi; worker ")
        assert text.rsplit(" ", 1)[1] != str(zygote)
    assert first != second  # two workers, one warm-up
    assert c.stop() == 0
    assert not c.leftovers()


def test_a_warm_up_that_raises_leaves_workers_working_and_the_log_says_why(tmp_path):
    c = Corral(tmp_path, agent="tests.agents_warm_raises:agent").start()
    assert c.texts("s", "x") == ["cold x"]
    assert c.stop() == 0
    assert "warm-up exploded on purpose" in c.log()
    assert "warm_up failed; workers start cold" in c.log()


def test_a_warm_up_that_leaves_a_thread_running_is_refused_at_start(tmp_path):
    c = Corral(tmp_path, agent="tests.agents_warm_thread:agent")
    try:
        c.start()
    except RuntimeError as e:
        assert "threads are running after its import and warm_up (left-behind)" in str(e)
    else:
        raise AssertionError("corral started on a zygote that has a thread running")
    assert not c.leftovers()


def test_the_openai_warm_up_sends_nothing_and_leaves_no_thread_or_connection():
    import threading

    import psutil

    from corral.worker.agents import openai as openai_agent
    from tests.fake_openai import FakeOpenAI

    fake = FakeOpenAI().start()
    try:
        me = psutil.Process()
        threads, sockets = threading.active_count(), len(me.net_connections())
        openai_agent.warm_up({"model": "m", "base_url": fake.base_url})
        assert fake.chat_requests() == []
        assert threading.active_count() == threads
        assert len(me.net_connections()) == sockets
        # the client a turn will use is built, for the configured endpoint
        assert [ident[0] for ident in openai_agent._clients] == [fake.base_url]
    finally:
        openai_agent._clients.clear()
        fake.stop()


# ---- ?wait: one future and one timer per request


def test_a_wait_on_a_turn_still_running_answers_pending_at_its_timeout(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    started = time.monotonic()
    status, body = c.request(
        "POST", "/v1/messages?wait=1", {"session": "slow", "text": "sleep 30"}, timeout=20
    )
    waited = time.monotonic() - started
    assert status == 200 and body["status"] == "pending" and body["replies"] == []
    assert 0.9 < waited < 10
    # the same wait ends with the turn when the turn ends first
    status, body = c.request(
        "POST", "/v1/messages?wait=30", {"session": "quick", "text": "echo fast"}, timeout=40
    )
    assert status == 200 and body["status"] == "done"
    assert [r["text"] for r in body["replies"]] == ["fast"]
    assert c.stop() == 0


def test_a_long_wait_answers_at_once_when_the_supervisor_drains(tmp_path):
    import threading

    c = Corral(tmp_path, {"supervisor": {"drain_timeout": "20s"}}, agent=CHAOS).start()
    got: dict = {}

    def waiting() -> None:
        got["answer"] = c.request(
            "POST", "/v1/messages?wait=120", {"session": "s", "text": "sleep 8"}, timeout=130
        )
        got["at"] = time.monotonic()

    t = threading.Thread(target=waiting)
    t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [r for r in c.ls() if r["state"] == "busy"]:
        time.sleep(0.05)
    assert c.proc is not None
    c.proc.terminate()
    terminated = time.monotonic()
    t.join(60)
    status, body = got["answer"]
    assert status == 200 and body["status"] == "pending"
    assert got["at"] - terminated < 5  # not at the turn's end (8 s), nor at the wait's
    assert c.proc.wait(60) == 0
