"""Operating corral: the control socket and CLI, bounded drain, systemd notify."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import psutil

from tests.harness import Corral, wait_for

CHAOS = "corral.worker.agents.chaos:agent"


def test_ls_json_shows_every_live_worker_with_pid_state_and_rss(corral):
    c = corral(agent=CHAOS)
    c.texts("alpha", "hi")
    c.texts("beta", "balloon 40")
    c.request("POST", "/v1/messages", {"session": "gamma", "text": "hang"})
    rows = wait_for(lambda: (r := c.ls()) and len(r) == 3 and all(x["rss"] for x in r) and r)
    by = {r["session"]: r for r in rows}
    assert by["alpha"]["state"] == "idle" and by["beta"]["state"] == "idle"
    assert by["gamma"]["state"] == "busy" and by["gamma"]["turn_age"] is not None
    for r in rows:
        proc = psutil.Process(r["pid"])
        assert proc.is_running()
        assert r["rss"] > 1024 * 1024
    assert by["beta"]["rss"] > 40 * 1024 * 1024
    table = c.cli("ls").stdout.splitlines()
    assert table[0].split()[:3] == ["SESSION", "STATE", "PID"]
    assert any(line.split()[:2] == ["gamma", "busy"] for line in table[1:])


def test_kill_ends_a_worker_and_its_row_is_gone(corral):
    c = corral({"supervisor": {"kill_grace": "2s"}}, agent=CHAOS)
    c.texts("idle1", "hi")
    pid = c.ls()[0]["pid"]
    result = c.cli("kill", "idle1")
    assert result.returncode == 0, result.stderr
    assert "killed idle1" in result.stdout
    assert not psutil.pid_exists(pid)
    assert c.ls() == []

    # a hung turn that ignores SIGTERM: graceful kill waits for kill_grace, the user is told
    replies: dict = {}
    t = threading.Thread(
        target=lambda: replies.update(c.send("stuck", "ignore-term; hang", wait=30))
    )
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    t0 = time.monotonic()
    result = c.cli("kill", "stuck")
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert took >= 1.5  # SIGTERM was ignored: SIGKILL came after kill_grace
    t.join(30)
    assert replies["status"] == "error"
    assert replies["replies"][-1]["text"] == "turn stopped: stopped by an operator [killed]"
    assert c.ls() == []

    # --force does not wait for the grace period
    t = threading.Thread(target=lambda: c.send("stuck2", "ignore-term; hang", wait=30))
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    t0 = time.monotonic()
    result = c.cli("kill", "--force", "stuck2")
    assert result.returncode == 0
    assert time.monotonic() - t0 < 1.5 + 1.0
    t.join(30)
    assert c.ls() == []
    assert c.metrics()['corral_worker_exits_total{reason="killed"}'] == 3


def test_unknown_sessions_and_bad_keys_exit_nonzero(corral):
    c = corral()
    for args in (("show", "nobody"), ("kill", "nobody"), ("release", "nobody"), ("show", "a b")):
        result = c.cli(*args)
        assert result.returncode != 0
        assert result.stderr.startswith("Error: ")


def test_show_and_status(corral):
    c = corral(agent=CHAOS)
    c.texts("sam", "hi")
    shown = json.loads(c.cli("show", "sam", "--json").stdout)
    assert shown["session"] == "sam" and shown["state"] == "idle" and shown["pid"]
    assert "state:" in c.cli("show", "sam").stdout
    st = json.loads(c.cli("status", "--json").stdout)
    assert st["pid"] == c.proc.pid
    assert st["workers"]["idle"] == 1 and st["draining"] is False
    assert psutil.Process(st["zygote_pid"]).ppid() == c.proc.pid
    assert "serving" in c.cli("status").stdout


def test_control_socket_is_private(corral):
    c = corral()
    mode = stat.S_IMODE(os.stat(c.state / "control.sock").st_mode)
    assert mode == 0o600


def test_client_commands_fail_fast_without_a_supervisor(tmp_path):
    c = Corral(tmp_path)
    t0 = time.monotonic()
    result = c.cli("ls")
    assert result.returncode == 1
    assert "not found: is 'corral serve' running?" in result.stderr
    assert time.monotonic() - t0 < 10

    # a socket that accepts but never answers: the client gives up at --timeout
    c.state.mkdir(parents=True)
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(c.state / "control.sock"))
    mute.listen()
    try:
        t0 = time.monotonic()
        result = c.cli("status", "--timeout", "1")
        took = time.monotonic() - t0
    finally:
        mute.close()
    assert result.returncode == 1
    assert "did not answer within 1s" in result.stderr
    assert took < 8


def test_drain_with_hung_turns_is_bounded_and_keeps_their_messages(corral):
    grace = 2.0
    c = corral({"supervisor": {"kill_grace": f"{grace}s", "drain_timeout": "60s"}}, agent=CHAOS)
    for s in ("h1", "h2", "calm"):
        c.texts(s, "warm")
    c.request("POST", "/v1/messages", {"session": "h1", "text": "hang", "id": "hung-1"})
    c.request(
        "POST",
        "/v1/messages",
        {"session": "h2", "text": "ignore-term; orphan; hang", "id": "hung-2"},
    )
    wait_for(lambda: len([r for r in c.ls() if r["state"] == "busy"]) == 2)
    t0 = time.monotonic()
    result = c.cli("drain", "--timeout", "2")
    code = c.proc.wait(30)
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert code == 0
    print(f"drain took {took:.2f}s (bound {2 + grace + 1:.0f}s)")
    assert took < 2 + grace + 1 + 1.0  # one extra second for two busy cores
    assert not c.leftovers(timeout=2)
    db = sqlite3.connect(c.state / "corral.db")
    pending = dict(db.execute("SELECT id, attempts FROM messages WHERE state = 'pending'"))
    # still in the inbox, and the drain's interruption is not held against them
    assert pending == {"hung-1": 0, "hung-2": 0}


def test_http_answers_503_while_draining(corral):
    c = corral({"supervisor": {"drain_timeout": "5s"}}, agent=CHAOS)
    c.request("POST", "/v1/messages", {"session": "slow", "text": "sleep 3"})
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    c.proc.terminate()
    time.sleep(0.5)
    status, body = c.request("POST", "/v1/messages", {"session": "new", "text": "hi"})
    assert status == 503
    assert "draining" in body["error"]
    assert c.proc.wait(30) == 0
    db = sqlite3.connect(c.state / "corral.db")
    assert db.execute("SELECT state FROM messages").fetchall() == [("done",)]  # finished in time


def test_a_second_supervisor_on_the_same_state_refuses_to_start(corral):
    c = corral()
    second = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(c.config_path)],
        env=c.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 2
    assert "another corral is running on" in second.stderr
    assert c.texts("x", "still serving") == ["still serving"]


def test_config_check(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[limits]\nrss_max = "200MiB"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nrss_maxx = 5\n")
    c = Corral(tmp_path / "x")
    assert c.cli("config", "check", str(good)).returncode == 0
    result = c.cli("config", "check", str(bad))
    assert result.returncode == 1
    assert "limits.rss_maxx: unknown key" in result.stderr


def test_systemd_notify_ready_watchdog_status_stopping(corral, tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    got: list[str] = []
    try:
        c = corral()

        def collect(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    got.append(sock.recv(4096).decode())
                except TimeoutError:
                    continue

        collect(2.0)
        assert any("READY=1" in m for m in got)
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in got)
        pings = [m for m in got if m == "WATCHDOG=1"]
        assert len(pings) >= 5, got  # every 200 ms for a 400 ms watchdog
        c.proc.terminate()
        collect(2.0)
        assert any("STOPPING=1" in m for m in got)
        assert c.proc.wait(30) == 0
    finally:
        sock.close()
