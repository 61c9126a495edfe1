"""A message whose turn is cut by two supervisor crashes, and what its sender then sees."""

from __future__ import annotations

import json
import sqlite3
import time

from tests.harness import Corral

TEXT = "echo part; sleep 600"  # a reply before the hang: the error must not collide with it


def crash_twice_during(c: Corral, message_id: str) -> None:
    """kill -9 the supervisor twice, each time once its run has started the message's turn."""
    db = sqlite3.connect(c.state / "corral.db")
    try:
        for _ in range(2):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait until this run has started the turn
                (attempts,) = db.execute(
                    "SELECT attempts FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                rows = json.loads(c.cli("ls", "--json").stdout or '{"sessions": []}')["sessions"]
                if rows and rows[0]["state"] == "busy" and rows[0]["attempt"] == attempts:
                    break
                time.sleep(0.1)
            c.kill9()
            c.start()
    finally:
        db.close()


def assert_answered_interrupted_twice(c: Corral, session: str, message_id: str) -> None:
    """The retried message is not run a third time: its sender gets the error, after the
    reply its first run made; the session then works again."""
    status, body = c.request(
        "POST", "/v1/messages?wait=20", {"session": session, "text": TEXT, "id": message_id}
    )
    assert status == 200
    assert body["status"] == "error"
    assert [r["text"] for r in body["replies"]] == [
        "part",
        "turn not run again: it was interrupted 2 times [crashed]",
    ]
    assert c.texts(session, "echo alive") == ["alive"]
    assert c.stop() == 0
    assert not c.leftovers()
