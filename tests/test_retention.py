"""Retention: the store and the transcripts stay bounded under steady load."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from corral.worker.transcript import Transcript, TranscriptLocked
from tests.harness import Corral, wait_for

BATCH = 1500
SESSIONS = 10


def db_bytes(c: Corral) -> int:
    return sum(
        os.path.getsize(p)
        for p in (c.state / "corral.db", c.state / "corral.db-wal")
        if os.path.exists(p)
    )


def replies(c: Corral, session: str, after: int = 0) -> list[dict]:
    code, body = c.request("GET", f"/v1/sessions/{session}/replies?after={after}&limit=1000")
    assert code == 200, body
    return body["replies"]


def status(c: Corral) -> dict:
    r = c.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_database_levels_off_over_three_batches_with_keep_2s(tmp_path):
    c = Corral(
        tmp_path,
        {"retention": {"keep": "2s"}, "limits": {"max_queue": BATCH}},
    ).start()
    text = "y" * 2000  # about 8 KB per message and reply: 1,500 make some 6 MB
    sizes = []

    def post(i: int) -> int:
        code, body = c.request(
            "POST", "/v1/messages", {"session": f"s{i % SESSIONS}", "text": f"{i} {text}"}
        )
        assert code == 202, body
        return i

    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            list(pool.map(post, range(BATCH)))
            wait_for(lambda: status(c)["inbox"] == 0, timeout=180, interval=0.5)
            sizes.append(db_bytes(c))
            # everything of this batch is older than keep and pruned before the next
            wait_for(lambda: all(not replies(c, f"s{i}") for i in range(SESSIONS)), timeout=60)
    print(f"database + WAL after each batch of {BATCH}: {sizes}")
    # without retention each batch adds as much again (the third would be ~3x the first)
    assert sizes[2] < 1.4 * sizes[0], sizes
    assert "retention: pruned" in c.log()
    assert c.stop() == 0


def test_the_replies_long_poll_never_serves_a_pruned_reply(tmp_path):
    c = Corral(tmp_path, {"retention": {"keep": "1s"}}).start()
    first = c.send("alice", "old")
    assert [r["text"] for r in first["replies"]] == ["old"]
    [old] = replies(c, "alice")
    # pruned once keep has passed; the long-poll from the start then has nothing
    wait_for(lambda: not replies(c, "alice"), timeout=30)
    code, body = c.request("GET", "/v1/sessions/alice/replies?wait=1")
    assert code == 200 and body["replies"] == [], body
    c.send("alice", "new")
    got = replies(c, "alice")
    assert [r["text"] for r in got] == ["new"]
    assert got[0]["cursor"] > old["cursor"]  # cursors never go back
    code, body = c.request("GET", f"/v1/sessions/alice/replies?after={old['cursor'] - 1}")
    assert [r["text"] for r in body["replies"]] == ["new"]
    assert c.stop() == 0


def test_a_transcript_keeps_its_newest_entries_and_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    t = Transcript(path, max_entries=10)
    for i in range(55):
        t.append("user", f"m{i}", f"t{i}")
    texts = [e.text for e in t.read()]
    assert len(texts) <= 20 and texts[-1] == "m54"
    assert texts == [f"m{i}" for i in range(55 - len(texts), 55)]  # the newest, in order
    with pytest.raises(TranscriptLocked):  # the compacted file is locked too
        Transcript(path, lock_timeout=0.3)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    t.close()
    again = Transcript(path, max_entries=10)
    again.append("user", "after", "t55")
    assert again.read()[-1].text == "after"
    again.close()


def test_a_transcript_over_its_bound_at_open_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    t = Transcript(path, max_entries=1_000_000)
    for i in range(300):
        t.append("user", f"m{i}", f"t{i}")
    t.close()
    t = Transcript(path, max_entries=100)
    assert [e.text for e in t.read()] == [f"m{i}" for i in range(200, 300)]
    t.close()
