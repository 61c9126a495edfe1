"""The session transcript: kernel lock for the worker's life, torn lines tolerated."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from corral.worker.transcript import MAX_ENTRIES, Transcript, TranscriptLocked
from tests.harness import Corral


def test_a_torn_last_line_is_skipped_and_appends_go_on(tmp_path):
    path = tmp_path / "s.jsonl"
    t = Transcript(path)
    t.append("user", "hello", "m1")
    t.close()
    with open(path, "ab") as f:
        f.write(b'{"role":"assistant","text":"half a li')  # a writer killed mid-line
    t = Transcript(path)
    t.append("user", "again", "m2")
    assert [(e.role, e.text) for e in t.read()] == [("user", "hello"), ("user", "again")]
    t.close()


def _hold_lock(path, ready):  # type: ignore[no-untyped-def]
    Transcript(path)
    ready.set()
    signal.pause()


def test_the_lock_is_held_while_the_owner_lives_and_dies_with_it(tmp_path):
    path = tmp_path / "s.jsonl"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready))
    holder.start()
    assert ready.wait(10)
    with pytest.raises(TranscriptLocked):
        Transcript(path, lock_timeout=0.3)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    Transcript(path, lock_timeout=5).close()  # no stale lock after a SIGKILL


def test_a_sandboxed_worker_compacts_its_transcript_in_place_and_the_turn_goes_on(tmp_path):
    # 2,100 replies in one turn: past twice MAX_ENTRIES lines the worker compacts, with
    # only the descriptor it opened before restricting itself (the path is out of reach)
    c = Corral(tmp_path, agent="corral.worker.agents.chaos:agent").start()
    try:
        replies = c.send("s", "echo x; " * 2100, wait=120)["replies"]
        assert [r["text"] for r in replies] == ["x"] * 2100  # no crash mid-turn
        assert c.texts("s", "echo after") == ["after"]
        lines = (c.state / "sessions" / "s.jsonl").read_bytes().splitlines()
        assert MAX_ENTRIES <= len(lines) <= 2 * MAX_ENTRIES
        assert lines[-1].startswith(b'{"role":"assistant","text":"after"')
    finally:
        assert c.stop() == 0
