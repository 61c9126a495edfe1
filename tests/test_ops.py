"""Operating corral past its live workers: `ls --all`, `show` and `history` from the
store, dead letters and their retry, /healthz, JSON errors, and what `kill` says
while it waits."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from corral.supervisor.metrics import Metrics, MetricsServer
from tests.harness import Corral, free_port
from tests.receiver import Receiver
from tests.test_durability import webhook_config
from tests.test_operate import CHAOS, wait_for


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def cli_json(c: Corral, *args: str) -> Any:
    result = c.cli(*args, "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_a_killed_session_stays_in_ls_all_with_its_last_exit_and_can_be_shown(corral):
    c = corral(agent=CHAOS)
    before = time.time()
    c.texts("gone", "hi")
    c.texts("gone", "again")
    c.texts("live", "hi")
    assert c.cli("kill", "gone").returncode == 0
    assert [r["session"] for r in c.ls()] == ["live"]  # plain ls: live workers only

    rows = {r["session"]: r for r in cli_json(c, "ls", "--all")["sessions"]}
    assert list(rows) == ["gone", "live"]
    gone = rows["gone"]
    assert (gone["state"], gone["pid"], gone["last_exit"]) == ("inactive", None, "killed")
    assert gone["messages"] == 2
    assert before - 5 <= gone["last_message_at"] <= time.time() + 5
    assert rows["live"]["state"] == "idle" and rows["live"]["messages"] == 1

    shown = cli_json(c, "show", "gone")
    assert (shown["state"], shown["last_exit"], shown["messages"]) == ("inactive", "killed", 2)
    table = c.cli("ls", "--all").stdout.splitlines()
    assert table[0].split()[-2:] == ["MESSAGES", "LAST-MESSAGE"]
    assert any(line.split()[:2] == ["gone", "inactive"] for line in table[1:])
    assert "last exit:" in c.cli("show", "gone").stdout


def test_a_crashed_sessions_restarts_are_listed_after_the_supervisor_restarts(corral):
    c = corral(agent=CHAOS)
    replies = c.send("flaky", "crash", wait=30)
    assert replies["status"] == "error"
    wait_for(lambda: not c.ls())
    assert c.stop() == 0
    again = Corral(c.tmp, agent=CHAOS).start()  # the same state dir, a new supervisor
    try:
        rows = {r["session"]: r for r in cli_json(again, "ls", "--all")["sessions"]}
        assert (rows["flaky"]["restarts"], rows["flaky"]["last_exit"]) == (1, "crashed")
        assert rows["flaky"]["state"] == "inactive"
        assert cli_json(again, "show", "flaky")["restarts"] == 1
    finally:
        assert again.stop() == 0
    assert not again.leftovers()


def test_history_shows_a_sessions_exchange_oldest_first(corral):
    c = corral()
    assert c.texts("chat", "first") == ["first"]
    assert c.texts("chat", "second") == ["second"]
    c.texts("elsewhere", "not this one")
    entries = cli_json(c, "history", "chat")["entries"]
    assert [(e["kind"], e["text"]) for e in entries] == [
        ("message", "first"),
        ("reply", "first"),
        ("message", "second"),
        ("reply", "second"),
    ]
    message, reply = entries[0], entries[1]
    assert reply["in_reply_to"] == message["id"] and reply["id"] == f"{message['id']}:0"
    assert message["state"] == "done" and reply["state"] == "fetched"
    assert all(e["channel"] == "http" for e in entries)
    times = [e["at"] for e in entries]
    assert times == sorted(times)

    last = cli_json(c, "history", "chat", "--limit", "1")["entries"]
    assert [e["text"] for e in last] == ["second", "second"]
    text = c.cli("history", "chat").stdout
    assert "message" in text and "    second" in text
    assert cli_json(c, "history", "nobody")["entries"] == []


def test_a_dead_lettered_reply_is_listed_and_delivered_by_a_retry(corral):
    with Receiver([503, 200]) as rx:  # down at first, then accepting
        c = corral(webhook_config(rx, max_attempts=1))
        status, _ = c.request(
            "POST", "/v1/channels/hooks/messages", {"session": "dl", "text": "hello", "id": "d1"}
        )
        assert status == 202
        rx.wait_requests(1)
        dead = wait_for(lambda: cli_json(c, "dead-letters")["dead_letters"])
        assert len(dead) == 1
        d = dead[0]
        assert (d["id"], d["channel"], d["session"], d["attempts"]) == ("d1:0", "hooks", "dl", 1)
        assert d["last_error"] == "HTTP 503: gave up after 1 attempts"
        table = c.cli("dead-letters").stdout.splitlines()
        assert table[0].split()[:3] == ["REPLY", "CHANNEL", "SESSION"]
        assert table[1].split()[:2] == ["d1:0", "hooks"]

        unknown = c.cli("dead-letters", "retry", "no-such-reply")
        assert unknown.returncode == 1 and "no-such-reply" in unknown.stderr

        result = cli_json(c, "dead-letters", "retry", "--all")
        assert result == {"retried": ["d1:0"], "not_retried": []}
        rx.wait_requests(2)
        assert [b["id"] for b in rx.delivered()] == ["d1:0"]
        wait_for(lambda: cli_json(c, "dead-letters")["dead_letters"] == [])
        history = cli_json(c, "history", "dl")["entries"]
        assert [(e["kind"], e["state"]) for e in history] == [
            ("message", "done"),
            ("reply", "delivered"),
        ]
        time.sleep(1.0)  # anything else that was going to arrive has arrived
        assert len(rx.requests) == 2
        assert c.metrics()['corral_replies_delivered_total{channel="hooks"}'] == 1


def test_healthz_needs_no_token_and_says_draining_while_draining(corral):
    c = corral(
        {"channels.http": {"token": "s3cret"}, "supervisor": {"kill_grace": "1s"}},
        agent=CHAOS,
    )
    assert get(c.base + "/healthz") == (200, {"status": "ok"})
    assert get(f"http://127.0.0.1:{c.metrics_port}/healthz") == (200, {"status": "ok"})
    assert get(c.base + "/v1/sessions/x/replies")[0] == 401  # the rest still needs the token
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    req = urllib.request.Request(
        c.base + "/v1/messages",
        data=json.dumps({"session": "stuck", "text": "hang"}).encode(),
        headers=auth,
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 202
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    drain = c.cli("drain", "--timeout", "4", "--no-wait")
    assert drain.returncode == 0, drain.stderr
    status, body = get(c.base + "/healthz")
    assert (status, body) == (503, {"status": "draining"})
    metrics_health = get(f"http://127.0.0.1:{c.metrics_port}/healthz")
    assert metrics_health == (503, {"status": "draining"})
    assert c.proc is not None and c.proc.wait(30) == 0


def test_the_metrics_listener_answers_healthz_from_its_draining_callable():
    draining = threading.Event()
    port = free_port()

    async def body() -> list[tuple[int, Any]]:
        server = MetricsServer(Metrics(), list, "127.0.0.1", port, draining=draining.is_set)
        await server.start()
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            first = await asyncio.to_thread(get, url)
            draining.set()
            second = await asyncio.to_thread(get, url)
        finally:
            await server.stop()
        return [first, second]

    assert asyncio.run(body()) == [(200, {"status": "ok"}), (503, {"status": "draining"})]


def test_json_errors_are_json_on_stdout_with_the_plain_exit_codes(corral, tmp_path):
    c = corral()
    for args in (("show", "nobody"), ("history", "a b"), ("kill", "nobody"), ("ls", "--bogus")):
        plain = c.cli(*args)
        as_json = c.cli(*args, "--json")
        assert plain.returncode != 0 and as_json.returncode == plain.returncode, args
        assert plain.stderr.startswith("Error: ") or "Usage:" in plain.stderr
        if "--bogus" not in args:  # an unknown option fails before --json is read
            assert "error" in json.loads(as_json.stdout), args
    usage = c.cli("history", "x", "--limit", "0", "--json")
    assert usage.returncode == 2 and "limit" in json.loads(usage.stdout)["error"]
    nothing = Corral(tmp_path / "none").cli("status", "--json")
    assert nothing.returncode == 1
    assert "is 'corral serve' running?" in json.loads(nothing.stdout)["error"]


def test_kill_of_a_worker_that_ignores_sigterm_says_it_waits_for_sigkill(corral):
    c = corral({"supervisor": {"kill_grace": "3s"}}, agent=CHAOS)
    t = threading.Thread(target=lambda: c.send("stuck", "ignore-term; hang", wait=30))
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    result = c.cli("kill", "stuck")
    t.join(30)
    assert result.returncode == 0, result.stderr
    assert "killed stuck" in result.stdout
    assert "has not exited 1s after SIGTERM" in result.stderr
    assert "SIGKILL follows 3s after SIGTERM (kill_grace)" in result.stderr
    quick = c.cli("kill", "--force", "nobody")
    assert "SIGKILL follows" not in quick.stderr


def test_help_documents_exit_codes_and_completion_prints_a_script(tmp_path):
    helped = Corral(tmp_path).cli("--help")
    assert "Exit codes:" in helped.stdout and "_CORRAL_COMPLETE=bash_source" in helped.stdout
    code = "from corral.cli.main import main; main(prog_name='corral')"
    script = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "_CORRAL_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "_corral_completion" in script.stdout
