"""`corral top` as an operator sees it: in a real terminal (a tmux pane), and piped."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import MARK, Corral, wait_for

CHAOS = "corral.worker.agents.chaos:agent"


class Pane:
    """`corral top` in a detached tmux session on a private tmux server."""

    def __init__(self, c: Corral, *args: str) -> None:
        self.server = f"corral-test-{uuid.uuid4().hex[:8]}"
        self.name = "top"
        env = {k: v for k, v in c.env().items() if k in ("CORRAL_CONFIG", "PYTHONPATH", MARK)}
        command = " ".join(
            [
                "env",
                *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                shlex.quote(sys.executable),
                "-m corral.cli.main top",
                *map(shlex.quote, args),
            ]
        )
        self.tmux(
            "new-session",
            "-d",
            "-s",
            self.name,
            "-x",
            "200",
            "-y",
            "40",
            "-e",
            "TERM=xterm-256color",
            command,
        )
        self.socket_path = self.tmux("display-message", "-p", "#{socket_path}").stdout.strip()

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.server, *args], capture_output=True, text=True, timeout=30
        )

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name).stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", self.name).returncode == 0

    def close(self) -> None:
        self.tmux("kill-server")
        if self.socket_path:  # tmux leaves its socket file behind
            Path(self.socket_path).unlink(missing_ok=True)


@pytest.fixture
def pane() -> Iterator[list[Pane]]:
    panes: list[Pane] = []
    yield panes
    for p in panes:
        p.close()


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def row(screen: str, session: str) -> list[str] | None:
    for line in screen.splitlines():
        cells = line.replace("│", " ").split()
        if cells and cells[0] == session:
            return cells
    return None


@needs_tmux
def test_top_shows_live_sessions_and_a_new_one_appears_without_a_keypress(corral, pane):
    c = corral(agent=CHAOS)
    c.texts("alice", "hi")
    p = Pane(c, "--interval", "0.5")
    pane.append(p)
    screen = wait_for(lambda: (s := p.screen()) and row(s, "alice") and s, timeout=30)
    assert "SESSION" in screen and "STATE" in screen and "RSS" in screen
    assert "loop lag" in screen and "workers:" in screen
    assert row(screen, "alice")[1] == "idle"

    c.request("POST", "/v1/messages", {"session": "bob", "text": "hang"})
    screen = wait_for(lambda: (s := p.screen()) and row(s, "bob") and s, timeout=15)
    assert row(screen, "bob")[1] == "busy"

    p.keys("q")
    wait_for(lambda: not p.alive(), timeout=15)


@needs_tmux
def test_top_kills_the_selected_session_after_a_confirmation(corral, pane):
    c = corral(agent=CHAOS)
    c.texts("alice", "hi")
    pid = c.ls()[0]["pid"]
    p = Pane(c, "--interval", "0.5")
    pane.append(p)
    wait_for(lambda: row(p.screen(), "alice"), timeout=30)
    p.keys("k")
    screen = wait_for(lambda: (s := p.screen()) and "Kill session alice" in s and s, timeout=10)
    assert f"worker {pid}" in screen
    p.keys("n")
    wait_for(lambda: "alice: not killed" in p.screen(), timeout=10)
    assert c.ls()[0]["pid"] == pid

    p.keys("k")
    wait_for(lambda: "Kill session alice" in p.screen(), timeout=10)
    p.keys("y")
    wait_for(lambda: "killed alice" in p.screen(), timeout=20)
    assert c.ls() == []
    wait_for(lambda: row(p.screen(), "alice") is None, timeout=10)
    p.keys("q")
    wait_for(lambda: not p.alive(), timeout=15)


@needs_tmux
def test_top_on_a_stopped_supervisor_says_no_answer_and_still_quits(corral, pane):
    c = corral()
    c.texts("alice", "hi")
    p = Pane(c, "--interval", "0.5", "--timeout", "1")
    pane.append(p)
    wait_for(lambda: row(p.screen(), "alice"), timeout=30)
    assert c.proc is not None
    c.proc.send_signal(signal.SIGSTOP)
    try:
        screen = wait_for(lambda: (s := p.screen()) and "no answer" in s and s, timeout=15)
        assert "did not answer within 1s" in screen
        assert row(screen, "alice") is not None  # the last rows stay
        p.keys("q")
        wait_for(lambda: not p.alive(), timeout=15)
    finally:
        c.proc.send_signal(signal.SIGCONT)


def test_top_not_in_a_terminal_prints_the_table_again_each_interval(corral):
    c = corral()
    c.texts("alice", "hi")
    result = c.cli("top", "--interval", "0.3", "--count", "3")
    assert result.returncode == 0, result.stderr
    tables = [t for t in result.stdout.split("\n\n") if t.strip()]
    assert len(tables) == 3
    for t in tables:
        lines = t.splitlines()
        assert "loop lag" in lines[0]
        assert lines[1].split()[:2] == ["SESSION", "STATE"]
        assert lines[2].split()[:2] == ["alice", "idle"]
    assert "\x1b[" not in result.stdout  # no terminal codes in a pipe


def test_top_not_in_a_terminal_with_no_supervisor_says_so_and_keeps_going(tmp_path):
    c = Corral(tmp_path)  # never started
    env = dict(c.env())
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "top", "--interval", "0.2", "--count", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.count("no answer from corral") == 2
    assert "is 'corral serve' running?" in result.stdout
