"""Faults of the supervisor's own machinery (the zygote, descriptors, a burst of spawns)
are not the sessions' faults: nothing is charged to them, and their messages are answered."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import aiohttp
import psutil

from tests.harness import REPO, running, wait_for

CHAOS = "corral.worker.agents.chaos:agent"


def status(c) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    result = c.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def send_all(c, texts: dict[str, str], wait: float = 120) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Send one message per session, all at once; the answers by session."""

    async def one(http: aiohttp.ClientSession, session: str, text: str) -> dict[str, Any]:
        async with http.post(
            f"{c.base}/v1/messages",
            params={"wait": str(wait)},
            json={"session": session, "text": text},
        ) as r:
            return {"http": r.status, **(await r.json())}

    async def everything() -> dict[str, dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=wait + 60)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            bodies = await asyncio.gather(*(one(http, s, t) for s, t in texts.items()))
        return dict(zip(texts, bodies, strict=True))

    return asyncio.run(everything())


def test_burst_of_new_sessions_queues_spawns_instead_of_failing(corral):  # type: ignore[no-untyped-def]
    c = corral(
        {
            "supervisor": {"idle_timeout": "10m"},
            "limits": {"max_queue": 1000},
            # 1,000 clients at once: above the default bound on HTTP connections (512)
            "channels.http": {"max_connections": 2000},
        }
    )
    n = 1000  # the red team's burst: 1,362 "cannot reach the zygote: [Errno 11]"
    answers = send_all(c, {f"burst-{i}": f"hello {i}" for i in range(n)})
    assert len(answers) == n
    bad = {k: v for k, v in answers.items() if v.get("status") != "done"}
    assert not bad, list(bad.items())[:3]
    for i in range(n):
        assert answers[f"burst-{i}"]["replies"] == [{"text": f"hello {i}", "kind": "reply"}]
    assert "cannot reach the zygote" not in c.log()
    assert "cannot start workers" not in c.log()
    assert c.metrics().get("corral_spawn_failures_total", 0) == 0
    rows = c.ls()
    assert not [r for r in rows if r["state"] == "quarantined"]
    # nobody was demoted to SCHED_IDLE for the supervisor's trouble
    zygote = psutil.Process(status(c)["zygote_pid"])
    idle = [p.pid for p in zygote.children() if os.sched_getscheduler(p.pid) == os.SCHED_IDLE]
    assert not idle


def test_turns_of_a_killed_zygote_run_again_and_no_session_is_blamed(corral):  # type: ignore[no-untyped-def]
    c = corral(agent=CHAOS)
    sessions = [f"s{i}" for i in range(5)]
    for s in sessions:
        assert c.texts(s, "warm up") == ["warm up"]
    old = status(c)["zygote_pid"]
    answers: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(
            target=lambda s=s: answers.update({s: c.send(s, "sleep 2; echo finished", wait=60)})
        )
        for s in sessions
    ]
    for t in threads:
        t.start()
    wait_for(lambda: sum(r["state"] == "busy" for r in c.ls()) == len(sessions), interval=0.05)
    os.kill(old, signal.SIGKILL)
    for t in threads:
        t.join(90)
    for s in sessions:
        body = answers[s]
        assert body["status"] == "done", body
        assert [r["text"] for r in body["replies"]] == ["finished"]
    metrics = c.metrics()
    assert metrics['corral_worker_exits_total{reason="crashed"}'] == 0
    assert metrics['corral_worker_exits_total{reason="zygote_lost"}'] == len(sessions)
    new = status(c)["zygote_pid"]
    assert new and new != old
    for row in c.ls():
        assert row["state"] != "quarantined"
    assert c.texts("s0", "after") == ["after"]


def test_sigstopped_zygote_is_detected_and_replaced(corral):  # type: ignore[no-untyped-def]
    c = corral(agent=CHAOS)
    assert c.texts("before", "warm up") == ["warm up"]
    old = status(c)["zygote_pid"]
    os.kill(old, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # a new session needs a spawn: it waits for the ping to find the zygote frozen
        body = c.send("new", "hello", wait=60)
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert body["status"] == "done", body
    assert [r["text"] for r in body["replies"]] == ["hello"]
    assert took < 30
    st = status(c)
    assert st["zygotes_replaced"] >= 1
    assert st["zygote_pid"] != old
    assert "health ping" in c.log()
    assert not running([old])
    # the session whose worker died with the frozen zygote was not blamed for it
    assert c.metrics()['corral_worker_exits_total{reason="crashed"}'] == 0
    assert c.texts("before", "again") == ["again"]


def test_descriptor_limit_is_raised_at_start_and_shown(corral, monkeypatch):  # type: ignore[no-untyped-def]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 512)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        c = corral()  # inherits the low soft limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    st = status(c)
    assert st["fds_limit"] == hard
    assert 0 < st["fds"] < hard
    text = c.cli("status")
    assert text.returncode == 0
    assert f"of {hard}" in text.stdout


def test_new_sessions_are_refused_before_descriptors_run_out(corral):  # type: ignore[no-untyped-def]
    c = corral({"supervisor": {"idle_timeout": "10m"}})
    assert c.texts("first", "hello") == ["hello"]
    assert c.proc is not None
    limit = status(c)["fds"] + 120  # room for a few dozen workers above the reserve of 64
    resource.prlimit(c.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
    refused, answered = [], []
    for i in range(200):
        code, body = c.request(
            "POST", "/v1/messages?wait=30", {"session": f"n{i}", "text": f"hi {i}"}, timeout=90
        )
        if code == 429:
            refused.append(body)
        else:
            assert code == 200, (code, body)
            assert body["status"] == "done", body
            answered.append(body)
    assert answered, "every new session was refused"
    assert refused, "no new session was refused"
    assert "file descriptors" in refused[0]["error"]
    # sessions that already run go on, and nothing was charged to anyone
    assert c.texts("first", "still here") == ["still here"]
    assert c.metrics()["corral_spawn_failures_total"] == 0
    assert "Too many open files" not in c.log()
    st = status(c)
    assert st["fds"] <= st["fds_limit"] == limit


def test_spawns_failing_for_lack_of_descriptors_are_not_charged_to_the_session(tmp_path):  # type: ignore[no-untyped-def]
    # four spawns fail with EMFILE, more than restart_intensity (1): before, the session was
    # quarantined for 10 minutes and its next worker demoted to SCHED_IDLE
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.spawn_faults", "emfile", str(tmp_path / "state")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["failed"] == 4
    assert result["ended"] and result["texts"] == ["hello"]
    assert result["recent"] == 0
    assert result["quarantined"] is None
    assert result["restarts"] == 0
    assert not result["demoted"] and not result["sched_idle"]
    assert result["failures_now"] == 0


def test_a_dead_zygote_is_replaced_before_anyone_needs_it(corral):  # type: ignore[no-untyped-def]
    c = corral()
    assert c.texts("idle", "hello") == ["hello"]
    old = status(c)["zygote_pid"]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (pid := status(c)["zygote_pid"]) not in (None, old) and pid)
    assert psutil.Process(new).is_running()
    metrics = c.metrics()
    assert metrics['corral_worker_exits_total{reason="zygote_lost"}'] == 1  # its idle worker
    assert metrics['corral_worker_exits_total{reason="crashed"}'] == 0
    assert c.texts("idle", "again") == ["again"]
