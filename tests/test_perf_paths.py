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

from tests.harness import Corral

CHAOS = "corral.worker.agents.chaos:agent"


def test_a_message_to_an_idle_worker_interrupted_twice_is_answered_with_an_error(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    assert c.texts("doomed", "echo warm") == ["warm"]  # the worker is idle now
    text = "echo part; sleep 600"
    status, _ = c.request(
        "POST", "/v1/messages", {"session": "doomed", "text": text, "id": "doomed-1"}
    )
    assert status == 202
    db = sqlite3.connect(c.state / "corral.db")
    for _ in range(2):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until this run has started the turn
            (attempts,) = db.execute(
                "SELECT attempts FROM messages WHERE id = 'doomed-1'"
            ).fetchone()
            rows = json.loads(c.cli("ls", "--json").stdout or '{"sessions": []}')["sessions"]
            if rows and rows[0]["state"] == "busy" and rows[0]["attempt"] == attempts:
                break
            time.sleep(0.1)
        c.kill9()
        c.start()
    status, body = c.request(
        "POST", "/v1/messages?wait=20", {"session": "doomed", "text": text, "id": "doomed-1"}
    )
    assert status == 200
    assert body["status"] == "error"
    assert [r["text"] for r in body["replies"]] == [
        "part",
        "turn not run again: it was interrupted 2 times [crashed]",
    ]
    assert c.texts("doomed", "echo alive") == ["alive"]
    assert c.stop() == 0
    assert not c.leftovers()


def test_messages_to_an_idle_worker_are_counted_once_each(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    for n in range(5):
        assert c.texts("warm", f"echo {n}") == [str(n)]
    db = sqlite3.connect(c.state / "corral.db")
    rows = db.execute("SELECT attempts, state FROM messages ORDER BY seq").fetchall()
    assert rows == [(1, "done")] * 5
    assert c.stop() == 0
