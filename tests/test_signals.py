"""Signals and a slow supervisor, as an operator meets them: SIGHUP reloads (it used to
kill corral silently), SIGINT during the start, a second SIGTERM during a drain, and
`corral send` to a supervisor that does not answer."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

from tests.harness import Corral, wait_for

CHAOS = "corral.worker.agents.chaos:agent"


def test_sighup_reloads_instead_of_killing_corral(corral):
    c = corral()
    assert c.proc is not None
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "nothing changed" in c.log())
    assert c.proc.poll() is None
    assert c.texts("alice", "still here") == ["still here"]


def test_sigint_while_the_agent_is_still_loading_exits_cleanly_without_a_traceback(tmp_path):
    c = Corral(tmp_path, agent="tests.agents_slow:agent")  # its import takes 30 s
    log = open(c.log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(c.config_path)],
        env=c.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    c.proc = proc
    try:
        wait_for(lambda: "per-worker cgroups" in c.log())  # the zygote is being started
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(25)  # well before the agent's 30 s import would end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = c.log()
    assert code == 0, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "SIGINT: stopping" in text and "stopped during start" in text
    assert not c.leftovers(), "a zygote or worker outlived the interrupted start"


def test_a_second_sigterm_during_a_drain_skips_the_rest_of_drain_timeout(corral):
    c = corral({"supervisor": {"drain_timeout": "120s", "kill_grace": "2s"}}, agent=CHAOS)
    answer: dict[str, Any] = {}
    t = threading.Thread(target=lambda: answer.update(c.send("bob", "ignore-term; hang")))
    t.start()
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining for up to 120s; waiting for 1 running turns: bob" in c.log())
    started = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    code = c.proc.wait(60)  # far less than the 120 s drain_timeout
    took = time.monotonic() - started
    t.join(30)
    assert code == 0, c.log()
    assert took < 60
    assert "SIGTERM again: skipping the rest of drain_timeout" in c.log()
    # the worker ignored SIGTERM: SIGKILL after kill_grace got it; nothing is left
    assert not c.leftovers()
    # the interrupted turn stays in the inbox for the next start
    with sqlite3.connect(c.state / "corral.db") as db:
        states = db.execute("SELECT state FROM messages WHERE session = 'bob'").fetchall()
    assert states == [("pending",)]


def test_send_to_a_stopped_supervisor_says_it_did_not_answer_and_how_to_retry(corral):
    c = corral()
    assert c.proc is not None
    c.proc.send_signal(signal.SIGSTOP)
    try:
        result = c.cli("send", "--timeout", "2", "carol", "hello")
    finally:
        c.proc.send_signal(signal.SIGCONT)
    assert result.returncode == 1
    assert "did not answer within 2s" in result.stderr
    assert "cannot reach" not in result.stderr
    assert "--id " in result.stderr
    message_id = result.stderr.split("--id ")[1].split()[0]
    # the retry the message suggests is the same message, not a second one
    again = c.cli("send", "--id", message_id, "--wait", "10", "--json", "carol", "hello")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["id"] == message_id
    history = json.loads(c.cli("history", "carol", "--json").stdout)["entries"]
    assert [e["kind"] for e in history].count("message") == 1


def test_send_dash_reads_the_text_from_stdin(corral):
    c = corral()
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "send", "--wait", "10", "dora", "-"],
        env=c.env(),
        input="from a pipe\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from a pipe\n"


def test_send_wait_shows_the_agents_progress_notes_on_stderr_as_they_come(corral):
    c = corral(agent="tests.agents_progress:agent")
    result = c.cli("send", "--wait", "30", "erin", "the job")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done: the job\n"
    notes = [line for line in result.stderr.splitlines() if line.startswith("... step")]
    assert len(notes) >= 3, result.stderr  # polled twice a second; a step lasts a second
    assert notes == sorted(notes) and len(set(notes)) == len(notes)
    assert "step 4 of 4" in notes[-1]


def test_drain_says_which_sessions_it_waits_for(corral):
    c = corral({"supervisor": {"drain_timeout": "3s", "kill_grace": "1s"}}, agent=CHAOS)
    c.request("POST", "/v1/messages", {"session": "bob", "text": "hang"})
    wait_for(lambda: [r for r in c.ls() if r["state"] == "busy"])
    result = c.cli("drain")
    assert result.returncode == 0, result.stderr
    assert "waiting for 1 sessions: bob (busy); running turns get" in result.stderr
    assert "drain_timeout" in result.stderr
    assert result.stdout.strip() == "drained"
    assert c.proc is not None and c.proc.wait(30) == 0
