"""A node whose supervisor is stopped (SIGSTOP) past its lease: its workers end
themselves at the fence the supervisor last sent, so another node that takes the
session over never runs it beside them."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg

from corral.protocol.types import reply_id
from tests.harness import wait_for
from tests.test_cluster import CHAOS, replies_of, start_nodes, workers_of


def test_a_stopped_supervisors_workers_end_before_another_node_runs_their_session(corral, pg_url):
    a, b = start_nodes(corral, pg_url, ["a", "b"], CHAOS)
    status, _ = a.request("POST", "/v1/messages", {"session": "hal", "text": "sleep 6; echo x"})
    assert status == 202
    wait_for(lambda: "hal" in workers_of(a) or "hal" in workers_of(b), timeout=30)
    victim, survivor = (a, b) if "hal" in workers_of(a) else (b, a)
    assert victim.proc is not None
    samples: list[tuple[float, int, int]] = []  # (time, victim's workers, survivor's)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():  # ends when the test has seen enough
            v = len(workers_of(victim).get("hal", []))
            s = len(workers_of(survivor).get("hal", []))
            samples.append((time.monotonic(), v, s))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stopped_at = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        # the stopped node's worker ends itself at its fence, before the lease expires
        wait_for(lambda: "hal" not in workers_of(victim), timeout=15)
        gone_after = time.monotonic() - stopped_at
        # past the lease: the survivor takes the session over and runs the turn again
        wait_for(lambda: "hal" in workers_of(survivor), timeout=30)
        taken_after = time.monotonic() - stopped_at
        replies = wait_for(lambda: replies_of(survivor, "hal"), timeout=30)
        assert [r["text"] for r in replies] == ["x"]
        assert survivor.texts("hal", "echo after", wait=60) == ["after"]
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    # the stopped node runs again, rejoins, and runs sessions again
    assert victim.texts("ivy", "echo back", wait=60) == ["back"]
    time.sleep(1.0)
    sampling.set()
    sampler.join(timeout=10)
    assert max(v + s for _, v, s in samples) <= 1, samples
    assert gone_after < taken_after
    assert "hal" not in workers_of(victim)
    assert victim.metrics()['corral_worker_exits_total{reason="lease_lost"}'] == 1
    print(f"fence: worker gone {gone_after:.2f}s after SIGSTOP, taken over at {taken_after:.2f}s")


def test_a_turn_cut_off_by_the_fence_runs_again_on_the_node_that_still_holds_its_lease(
    corral, pg_url
):
    (a,) = start_nodes(corral, pg_url, ["a"], CHAOS)
    status, _ = a.request("POST", "/v1/messages", {"session": "jo", "text": "sleep 4; echo x"})
    assert status == 202
    wait_for(lambda: "jo" in workers_of(a), timeout=30)
    assert a.proc is not None
    # stopped past the workers' fence (1.75 s after a renewal at lease_ttl 3s): no other
    # node takes the session, so this node still holds it when it runs again
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "jo" not in workers_of(a), timeout=15)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    replies = wait_for(lambda: replies_of(a, "jo"), timeout=60)
    assert [r["text"] for r in replies] == ["x"]
    assert a.metrics()['corral_worker_exits_total{reason="lease_lost"}'] == 1
    assert a.texts("jo", "echo after") == ["after"]


def test_a_node_stopped_inside_a_transaction_does_not_keep_its_sessions_past_the_lease(
    corral, pg_url
):
    """A fenced write holds its session's lease row FOR SHARE until its commit; a node
    stopped between the write and the commit must not keep the session from the others
    longer than its lease (the database ends the stalled transaction)."""
    a, b = start_nodes(corral, pg_url, ["a", "b"], CHAOS)
    status, _ = a.request(
        "POST", "/v1/messages", {"session": "ivy", "text": "sleep 4; echo x", "id": "ivy-1"}
    )
    assert status == 202
    wait_for(lambda: "ivy" in workers_of(a) or "ivy" in workers_of(b), timeout=30)
    victim, survivor = (a, b) if "ivy" in workers_of(a) else (b, a)
    assert victim.proc is not None
    with psycopg.connect(pg_url) as blocker, psycopg.connect(pg_url, autocommit=True) as watch:
        # the turn's reply, written first by this transaction: the node's insert of it
        # waits for this one inside its own transaction, holding the lease row
        blocker.execute(
            "INSERT INTO corral.replies (id, message_id, session, idx, text, kind, channel, "
            "origin, created_at) VALUES (%s, 'ivy-1', 'ivy', 0, 'x', 'text', 'http', '{}', 0)",
            (reply_id("ivy-1", 0),),
        )
        wait_for(
            lambda: watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%%INSERT INTO corral.replies%%' AND pid <> pg_backend_pid()"
            ).fetchone(),
            timeout=30,
        )
        os.kill(victim.proc.pid, signal.SIGSTOP)
        blocker.rollback()  # the node's insert goes on; its commit never comes
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: "ivy" in workers_of(survivor), timeout=30)
        took_over = time.monotonic() - stopped_at
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    assert took_over < 20, took_over  # lease_ttl 3 s; the stalled transaction ends sooner
    replies = wait_for(lambda: replies_of(survivor, "ivy"), timeout=30)
    assert [r["text"] for r in replies] == ["x"]  # the stopped node's reply never committed
    wait_for(lambda: "ivy" not in workers_of(victim), timeout=15)
    assert victim.proc.poll() is None, victim.log()[-3000:]
    assert victim.texts("ivy2", "echo alive") == ["alive"]  # the node works on


def test_a_turn_that_ends_after_its_lease_was_taken_is_answered_once_by_the_new_holder(
    corral, pg_url
):
    """The lease moves while a turn runs (another node claimed it), and the turn ends
    before this node's next renewal notices: its reply and finish are refused
    (LeaseLost). That is no crash of the session's worker, and the ?wait still gets
    the answer of the run that counts."""
    (a,) = start_nodes(corral, pg_url, ["a"], CHAOS, ttl="60s")  # renewals 12 s apart
    assert a.texts("kim", "echo warm") == ["warm"]
    with psycopg.connect(pg_url, autocommit=True) as db:

        def beat() -> object:
            return db.execute("SELECT heartbeat_at FROM corral.nodes WHERE name = 'a'").fetchone()

        last = beat()
        wait_for(lambda: beat() != last, timeout=30)  # a renewal just happened: 12 s to the next
        answer: dict[str, dict] = {}
        waiting = threading.Thread(
            target=lambda: answer.update(body=a.send("kim", "sleep 2; echo x", wait=60, id="kim-2"))
        )
        waiting.start()
        wait_for(lambda: any(r["session"] == "kim" and r["state"] == "busy" for r in a.ls()))
        # another node claims the session, for 3 s, and leaves it to expire
        moved = db.execute(
            "UPDATE corral.leases SET node = 'ghost', epoch = epoch + 1, "
            "expires_at = now() + interval '3 seconds' WHERE session = 'kim' AND node = 'a'"
        ).rowcount
        assert moved == 1
        waiting.join(90)
    body = answer["body"]
    assert body["status"] == "done" and [r["text"] for r in body["replies"]] == ["x"], body
    assert [r["text"] for r in replies_of(a, "kim")] == ["warm", "x"]  # once, not twice
    log = a.log()
    # the scenario happened: the turn's end met the moved lease (not a renewal first)
    assert "the end of message kim-2 is not written here" in log, log[-4000:]
    assert "LeaseLost" not in log and "internal error" not in log, log[-4000:]
    samples = a.metrics()
    assert samples.get('corral_worker_exits_total{reason="crashed"}', 0) == 0, samples
    wait_for(lambda: a.metrics()["corral_inbox_depth"] == 0, timeout=20)
    assert a.texts("kim", "echo after") == ["after"]
