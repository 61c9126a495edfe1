"""`corral serve` on a PostgreSQL store: the same user-visible behaviour as on SQLite;
nodes of one database need names of their own (tests/test_cluster.py: the cluster)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.harness import Corral

CHAOS = "corral.worker.agents.chaos:agent"


def test_a_supervisor_on_postgresql_answers_and_keeps_one_message_per_id(corral, pg_url):
    c = corral({"store": {"url": pg_url}})
    assert c.texts("alice", "hello there") == ["hello there"]
    first = c.send("alice", "once", id="client-1")
    again = c.send("alice", "once", id="client-1")
    assert first["id"] == again["id"] and again["replies"] == first["replies"]
    status = c.cli("status", "--json")
    assert status.returncode == 0


def test_a_second_node_with_the_same_name_on_the_same_database_refuses_to_start(
    corral, pg_url, tmp_path
):
    corral({"store": {"url": pg_url}})
    other = Corral(tmp_path / "other", {"store": {"url": pg_url}})
    proc = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "serve", "--config", str(other.config_path)],
        env=other.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cluster.node: another node named" in proc.stderr
    # no URL with credentials in it (the sandbox's advice on authentication may say "password")
    assert not re.search(r"postgres(ql)?://[^@\s/]*:[^@\s/]*@", proc.stderr)


def test_a_turn_cut_by_a_kill_9_runs_again_after_restart_on_postgresql(corral, pg_url):
    c = corral({"store": {"url": pg_url}}, agent=CHAOS)
    status, accepted = c.request(
        "POST", "/v1/messages", {"session": "bob", "text": "sleep 3; echo done"}
    )
    assert status == 202 and accepted["status"] == "accepted"
    time.sleep(1.0)  # the turn is running
    c.kill9()
    c2 = corral({"store": {"url": pg_url}}, agent=CHAOS)
    deadline = time.monotonic() + 60
    texts: list[str] = []
    while time.monotonic() < deadline and not texts:
        _, body = c2.request("GET", "/v1/sessions/bob/replies?wait=5")
        texts = [r["text"] for r in body["replies"]]
    assert texts == ["done"]
