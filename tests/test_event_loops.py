"""The supervisor on each event loop it can run on: asyncio's and uvloop's.

The rest of the suite runs on asyncio's loop (conftest pins CORRAL_EVENT_LOOP), the
one a plain install gets; `pip install 'corral[fast]'` gets uvloop, picked when it is
installed. uvloop's transports are not asyncio's classes (its Unix transport is not
even registered as an asyncio.Transport: an isinstance check on it failed every
worker's first frame once), so the paths that touch a transport, a signal or a child
run here on both: replies over HTTP and the control socket, a hung turn ended by its
deadline, a worker killed from outside, a stop with a turn running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.harness import wait_for

CHAOS = "corral.worker.agents.chaos:agent"
LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(params=LOOPS)
def loop_name(request, monkeypatch):  # type: ignore[no-untyped-def]
    if request.param == "uvloop":
        pytest.importorskip("uvloop")  # in the test extra: CI always has it
    monkeypatch.setenv("CORRAL_EVENT_LOOP", request.param)
    return request.param


def test_the_supervisor_serves_and_stops_on_each_loop(corral, loop_name):
    c = corral(
        {"limits": {"no_progress_timeout": "2s"}, "supervisor": {"kill_grace": "1s"}},
        agent=CHAOS,
    )
    expected = "uvloop" if loop_name == "uvloop" else "asyncio"
    line = next(x for x in c.log().splitlines() if "corral is serving" in x)
    assert f"event loop {expected}" in line, line

    # replies, several sessions at once, over HTTP and from the CLI
    assert c.texts("alice", "echo hello") == ["hello"]
    got: dict[str, list[str]] = {}

    def converse(session: str) -> None:
        got[session] = [t for n in range(3) for t in c.texts(session, f"echo {session} {n}")]

    threads = [threading.Thread(target=converse, args=(f"s{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {f"s{i}": [f"s{i} {n}" for n in range(3)] for i in range(6)}
    sent = c.cli("send", "bob", "echo from the cli", "--wait", "20")
    assert sent.returncode == 0 and sent.stdout == "from the cli\n", sent

    # a hung turn ends at its deadline, with the reason, and the session goes on
    body = c.send("carol", "hang", wait=30)
    assert body["status"] == "error", body
    assert body["replies"][-1]["text"].endswith("[no_progress]"), body
    assert c.texts("carol", "echo back") == ["back"]

    # a worker killed from outside: the session is told, then answered by a new one
    row = next(r for r in c.ls() if r["session"] == "alice")
    os.kill(row["pid"], signal.SIGKILL)
    wait_for(lambda: all(r["pid"] != row["pid"] for r in c.ls() if r["session"] == "alice"))
    assert c.texts("alice", "echo again") == ["again"]
    samples = c.metrics()
    assert samples['corral_workers{state="idle"}'] >= 1, samples

    # a stop with a turn running: bounded, exit 0, nothing left (the fixture checks)
    slow = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "send", "dave", "sleep 30", "--wait", "60"],
        env=c.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(r["session"] == "dave" and r["state"] == "busy" for r in c.ls()))
        started = time.monotonic()
        assert c.stop() == 0, c.log()[-3000:]
        assert time.monotonic() - started < 2 + 1 + 5  # drain_timeout + kill_grace + margin
    finally:
        slow.kill()
        slow.wait(10)


def test_out_of_descriptors_each_loop_recovers_and_says_what_it_can(corral, loop_name):
    """With no descriptor left, asyncio leaves new connections in the backlog and
    reports each failed accept (corral logs one line a burst); libuv (uvloop) accepts
    and closes them at once, the client sees a reset, and nothing reaches corral. On
    both, corral's own probe says the descriptors ran out (one line), and both serve
    again once descriptors are free, without a traceback."""
    c = corral()
    assert c.proc is not None
    proc = psutil.Process(c.proc.pid)
    limit = proc.rlimit(psutil.RLIMIT_NOFILE)
    outcomes: list[str] = []
    held: list[socket.socket] = []
    try:
        proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds(), limit[1]))
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
            held.append(s)
            s.settimeout(1.5)
            try:
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: corral\r\n\r\n")
                outcomes.append("answered" if s.recv(100) else "closed")
            except ConnectionResetError:
                outcomes.append("reset")
            except TimeoutError:
                outcomes.append("waiting")
        time.sleep(2.5)  # asyncio retries each second; corral probes each second
    finally:
        proc.rlimit(psutil.RLIMIT_NOFILE, limit)
        for s in held:
            s.close()
    assert c.texts("ok", "serving again") == ["serving again"]
    log = c.log()
    lines = [x for x in log.splitlines() if "cannot accept" in x]
    # A descriptor freed meanwhile may answer one connection: the limit is set to the
    # count of open descriptors, and corral's probe may hold /dev/null open at that moment.
    if loop_name == "asyncio":
        assert "waiting" in outcomes and set(outcomes) <= {"waiting", "answered"}, outcomes
        assert len(lines) == 1 and "Too many open files" in lines[0], lines
    else:  # closed (FIN) or reset, never left waiting
        refused = {"closed", "reset"}
        assert refused & set(outcomes) and set(outcomes) <= refused | {"answered"}, outcomes
        assert lines == [], lines
    out = [x for x in log.splitlines() if "out of file descriptors" in x]
    assert len(out) == 1 and "ERROR" in out[0] and "LimitNOFILE" in out[0], out
    assert "Traceback" not in log, log[-3000:]


def test_an_unknown_event_loop_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_EVENT_LOOP", "trio")
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)  # the built-in defaults
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result
    assert "CORRAL_EVENT_LOOP='trio'" in result.stderr and "auto, asyncio or uvloop" in (
        result.stderr
    ), result.stderr
