"""Bounds, proved with real processes and the chaos agent.

Each fault must end only its own worker, with an error reply naming the bound,
within the bound plus kill_grace plus a margin; the session goes on with a fresh
worker; other sessions never notice; nothing the supervisor started survives it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

from tests.harness import processes_with_mark

CHAOS = "corral.worker.agents.chaos:agent"
GRACE = 1.0
MARGIN = 6.0  # two busy cores: generous on purpose

LIMITS = {
    "turn_timeout": "6s",
    "no_progress_timeout": "2s",
    "rss_max": "200MiB",
    "cpu_time_per_turn": "30s",
    "output_per_turn": "64KiB",
}


def start(corral, **limits):  # type: ignore[no-untyped-def]
    return corral(
        {"limits": {**LIMITS, **limits}, "supervisor": {"kill_grace": f"{GRACE}s"}}, agent=CHAOS
    )


def fault(c, session, text, bound):  # type: ignore[no-untyped-def]
    """Send a fault; its replies and how long the error took."""
    t0 = time.monotonic()
    body = c.send(session, text, wait=bound + GRACE + MARGIN + 10)
    took = time.monotonic() - t0
    assert body["status"] == "error", body
    assert took < bound + GRACE + MARGIN, f"took {took:.1f}s"
    error = body["replies"][-1]
    assert error["kind"] == "error"
    return body["replies"], error["text"], took


def reason(text: str) -> str:
    m = re.search(r"\[(\w+)\]$", text)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize(
    ("command", "expected", "bound", "words"),
    [
        ("hang", "no_progress", 2, "no progress for 2s"),
        ("progress-forever", "turn_timeout", 6, "turn took longer than 6s"),
        ("balloon 300", "rss_limit", 0, "memory limit exceeded (rss"),
        ("flood", "output_limit", 0, "output limit exceeded"),
        ("crash", "crashed", 0, "exit code 3"),
        ("segv", "crashed", 0, "SIGSEGV"),
        ("exit", "crashed", 0, "exited in the middle of the turn"),
        ("garbage", "protocol_error", 0, "broke the protocol"),
        ("stop-self", "no_progress", 2, "no progress"),
        ("ignore-term; hang", "no_progress", 2 + GRACE, "no progress"),
        ("ignore-term; stop-self", "no_progress", 2 + GRACE, "no progress"),
        ("ignore-term; orphan; hang", "no_progress", 2 + GRACE, "no progress"),
        ("orphan; crash", "crashed", 0, "exit code 3"),
        ("orphan; balloon 300", "rss_limit", 0, "memory limit exceeded"),
        ("echo before; crash", "crashed", 0, "exit code 3"),
    ],
)
def test_fault_ends_only_its_worker_and_the_user_is_told(corral, command, expected, bound, words):
    c = start(corral)
    before = c.texts("victim", "warm up")
    assert before == ["warm up"]
    replies, text, _ = fault(c, "victim", command, bound)
    assert reason(text) == expected
    assert text.startswith("turn stopped: ")
    assert words in text
    if command.startswith("echo before"):
        assert replies[0] == {"text": "before", "kind": "reply"}
    if expected == "rss_limit":
        mib = int(re.search(r"rss (\d+) MiB", text).group(1))
        assert mib > 200
    # the session goes on with a fresh worker
    assert c.texts("victim", "are you back?") == ["are you back?"]


def test_spinning_worker_hits_the_cpu_bound(corral):
    c = start(corral, cpu_time_per_turn="2s", no_progress_timeout="60s", turn_timeout="60s")
    _, text, _ = fault(c, "spinner", "spin", 2)
    assert reason(text) == "cpu_limit"
    assert "CPU time limit exceeded" in text
    assert "in this turn" in text  # the sampler's bound, not the kernel's RLIMIT_CPU backstop


def test_work_within_its_bounds_is_left_alone(corral):
    c = start(corral)
    assert c.texts("ok", "sleep 1; echo slept") == ["slept"]
    assert c.texts("ok", "balloon 50; echo held") == ["held"]
    assert c.texts("ok", "spin 0.5; echo spun") == ["spun"]
    assert c.texts("ok", "orphan; echo forked") == ["forked"]


def test_two_balloons_that_together_pass_the_limit(corral):
    c = start(corral)
    assert c.texts("b", "balloon 120") == ["ok: balloon 120"]
    _, text, _ = fault(c, "b", "balloon 120", 0)
    assert reason(text) == "rss_limit"


def test_descendants_of_a_stopped_worker_do_not_survive(corral):
    c = start(corral)
    # the grandchildren of `orphan` call setsid: they are in no process group of ours
    assert c.texts("o", "orphan; orphan; echo two strays") == ["two strays"]
    assert len(processes_with_mark(c.mark)) == 5  # supervisor, zygote, worker, two strays
    _, text, _ = fault(c, "o", "ignore-term; orphan; hang", 2 + GRACE)
    assert reason(text) == "no_progress"
    deadline = time.monotonic() + 5
    while len(processes_with_mark(c.mark)) > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    left = processes_with_mark(c.mark)
    assert len(left) == 2, [p.cmdline() for p in left]  # only the supervisor and its zygote


def test_crash_loop_quarantines_the_session_until_it_expires(corral):
    c2 = corral(
        {
            "limits": {
                **LIMITS,
                "restart_intensity": 2,
                "restart_period": "60s",
                "quarantine": "4s",
            },
            "supervisor": {"kill_grace": f"{GRACE}s"},
        },
        agent=CHAOS,
    )
    for _ in range(3):
        _, text, _ = fault(c2, "loop", "crash", 0)
        assert reason(text) == "crashed"
    body = c2.send("loop", "hello?")
    assert body["status"] == "error"
    assert body["replies"][0]["text"].endswith("[quarantined]")
    assert c2.texts("other", "unaffected") == ["unaffected"]
    time.sleep(5)
    assert c2.texts("loop", "released") == ["released"]


def test_healthy_sessions_never_notice_faults(corral):
    c = start(corral)
    failures: list[str] = []
    stop = threading.Event()
    pings = [0]

    def ping(session: str) -> None:
        n = 0
        while not stop.is_set():  # ends when the faults are done
            n += 1
            try:
                body = c.send(session, f"ping {n}", wait=30)
                if [r["text"] for r in body["replies"]] != [f"ping {n}"]:
                    failures.append(f"{session}: {body}")
            except Exception as e:
                failures.append(f"{session}: {e!r}")
            pings[0] += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=ping, args=(f"healthy{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    faults = [
        "hang",
        "spin 3",
        "balloon 300",
        "flood",
        "crash",
        "garbage",
        "ignore-term; orphan; hang",
    ]
    fault_threads = [
        threading.Thread(target=c.send, args=(f"faulty{i}", cmd), kwargs={"wait": 30})
        for i, cmd in enumerate(faults)
    ]
    for t in fault_threads:
        t.start()
    for t in fault_threads:
        t.join(60)
    stop.set()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert pings[0] > 40


def test_a_killed_zygote_takes_its_workers_and_is_replaced(corral):
    c = start(corral)
    assert c.texts("z1", "echo before") == ["before"]
    zygote = json.loads(c.cli("status", "--json").stdout)["zygote_pid"]
    result: dict = {}
    # a stray that double-forked away from its worker: re-parented to the supervisor
    # when the zygote and the worker are gone, and killed there
    t = threading.Thread(target=lambda: result.update(c.send("z2", "orphan; hang", wait=30)))
    t.start()
    time.sleep(1.5)
    marked = {p.pid for p in processes_with_mark(c.mark)}
    os.kill(zygote, signal.SIGKILL)
    t.join(40)
    # the zygote's death is not the session's fault: the turn ran again on a new worker
    # (and hung again, so no_progress ends it this time), never answered `crashed`
    assert result["status"] == "error"
    assert reason(result["replies"][-1]["text"]) == "no_progress"
    # z1's idle worker and z2's busy one
    assert c.metrics()['corral_worker_exits_total{reason="zygote_lost"}'] == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and marked & {p.pid for p in processes_with_mark(c.mark)} - {
        c.proc.pid
    }:
        time.sleep(0.1)
    assert not marked & {p.pid for p in processes_with_mark(c.mark)} - {c.proc.pid}
    assert c.texts("z1", "echo after") == ["after"]  # a new zygote serves the session
    new_zygote = json.loads(c.cli("status", "--json").stdout)["zygote_pid"]
    assert new_zygote != zygote


def test_workers_run_below_the_supervisor_and_a_faulty_session_runs_idle(corral):
    c = start(corral)
    assert c.texts("calm", "echo hi") == ["hi"]
    calm = next(r["pid"] for r in c.ls() if r["session"] == "calm")
    # its own process group, but the supervisor's session: under autogroup scheduling a
    # session of its own would get a CPU share equal to the supervisor's
    assert os.getpgid(calm) == calm
    assert os.getsid(calm) == os.getsid(c.proc.pid)
    assert os.getpriority(os.PRIO_PROCESS, calm) == os.getpriority(os.PRIO_PROCESS, c.proc.pid) + 10
    assert os.sched_getscheduler(calm) == os.SCHED_OTHER

    _, text, _ = fault(c, "rowdy", "crash", 0)
    assert reason(text) == "crashed"
    assert c.texts("rowdy", "echo back") == ["back"]
    rowdy = next(r["pid"] for r in c.ls() if r["session"] == "rowdy")
    assert os.sched_getscheduler(rowdy) == os.SCHED_IDLE
    assert json.loads(c.cli("show", "rowdy", "--json").stdout)["demoted"] is True
    assert os.sched_getscheduler(calm) == os.SCHED_OTHER


def test_a_worker_that_floods_between_turns_is_stopped(corral):
    c = corral({"limits": {"output_per_turn": "64KiB"}}, agent="tests.agents:chatty_thread")
    assert c.texts("chatty", "go") == ["started"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        exits = c.metrics().get('corral_worker_exits_total{reason="output_limit"}', 0)
        if exits:
            break
        time.sleep(0.2)
    assert exits == 1
    assert c.ls() == []  # no ghost: stopped, reaped, nothing queued
    assert "output limit exceeded (more than 64 KiB between turns) [output_limit]" in c.log()
