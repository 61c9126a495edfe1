"""Several `corral serve` nodes on one real PostgreSQL: any node accepts, the node that
holds a session's lease runs it, and a dead node's sessions move on with their history."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

from tests.harness import Corral, processes_with_mark, wait_for
from tests.receiver import Receiver

HISTORY = "tests.agents:history"
SLOW_HISTORY = "tests.agents_cluster:slow_history"
CHAOS = "corral.worker.agents.chaos:agent"


def node_config(pg_url: str, name: str, ttl: str = "3s", **supervisor: Any) -> dict[str, Any]:
    return {
        "store": {"url": pg_url},
        "cluster": {"node": name, "lease_ttl": ttl},
        "supervisor": {"kill_grace": "1s", **supervisor},
    }


def start_nodes(corral: Any, pg_url: str, names: list[str], agent: str, **kw: Any) -> list[Corral]:
    return [corral(node_config(pg_url, n, **kw), agent=agent) for n in names]


def workers_of(node: Corral) -> dict[str, list[int]]:
    """The live worker processes of one node, by session (from their process titles;
    found by the node's mark, so a worker that outlived its node is found too)."""
    out: dict[str, list[int]] = {}
    for p in processes_with_mark(node.mark):
        try:
            title = " ".join(p.cmdline())
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith("corral: worker "):
            out.setdefault(title.removeprefix("corral: worker ").strip(), []).append(p.pid)
    return out


def replies_of(node: Corral, session: str) -> list[dict[str, Any]]:
    status, body = node.request("GET", f"/v1/sessions/{session}/replies?limit=1000")
    assert status == 200, body
    return body["replies"]  # type: ignore[no-any-return]


def test_any_node_accepts_and_the_owner_answers_with_the_history_growing(corral, pg_url):
    a, b = start_nodes(corral, pg_url, ["a", "b"], HISTORY)
    # alternate nodes: each message is accepted on one, run by whichever holds the lease
    texts = [(a if i % 2 == 0 else b).texts("carol", f"m{i}") for i in range(6)]
    assert texts == [["|".join(f"m{j}" for j in range(i + 1))] for i in range(6)]
    # the replies long-poll on either node sees every reply, in order
    assert [r["text"] for r in replies_of(a, "carol")] == [t[0] for t in texts]
    shown = replies_of(b, "carol")
    assert [r["text"] for r in shown] == [t[0] for t in texts]
    # a long-poll waiting on one node is answered by a reply the other node's turn made
    polled: list[Any] = []
    cursor = shown[-1]["cursor"]
    path = f"/v1/sessions/carol/replies?after={cursor}&wait=30"
    waiter = threading.Thread(target=lambda: polled.append(b.request("GET", path)))
    waiter.start()
    time.sleep(0.5)
    # another node's rows in `ls` are as of its last renewal (up to lease_ttl/5 old)
    owner = wait_for(lambda: next((r["node"] for r in a.ls() if r["session"] == "carol"), None))
    (b if owner == "a" else a).request(
        "POST", "/v1/messages", {"session": "carol", "text": "m6"}
    )  # accepted on the node that does not run carol
    waiter.join(40)
    assert polled and polled[0][0] == 200
    assert [r["text"] for r in polled[0][1]["replies"]] == ["|".join(f"m{j}" for j in range(7))]


def test_ls_on_any_node_lists_every_session_with_its_node_and_status_lists_the_nodes(
    corral, pg_url
):
    a, b = start_nodes(corral, pg_url, ["a", "b"], CHAOS)
    for i in range(6):
        status, _ = a.request("POST", "/v1/messages", {"session": f"s{i}", "text": "sleep 60"})
        assert status == 202

    def listed() -> list[dict[str, Any]] | None:
        rows = [r for r in b.ls() if r["state"] == "busy"]
        return rows if len(rows) == 6 else None

    rows = wait_for(listed, timeout=30)
    assert {r["session"] for r in rows} == {f"s{i}" for i in range(6)}
    assert {r["node"] for r in rows} <= {"a", "b"} and all(r["node"] for r in rows)
    on_a = {s for s, pids in workers_of(a).items() if pids}
    on_b = {s for s, pids in workers_of(b).items() if pids}
    assert not on_a & on_b
    assert {r["session"] for r in rows if r["node"] == "a"} == on_a
    table = a.cli("ls")
    assert table.returncode == 0 and "NODE" in table.stdout.splitlines()[0]
    # `show` on one node shows a session the other runs
    remote = next(r for r in rows if r["node"] == "b") if on_b else None
    if remote is not None:
        shown = a.cli("show", remote["session"], "--json")
        assert shown.returncode == 0, shown.stderr
        body = json.loads(shown.stdout)
        assert (body["state"], body["node"], body["pid"]) == ("busy", "b", remote["pid"])
    status = json.loads(a.cli("status", "--json").stdout)
    assert status["node"] == "a"
    assert {n["name"] for n in status["nodes"]} == {"a", "b"}
    assert sum(n["sessions"] for n in status["nodes"]) == 6
    text = b.cli("status").stdout
    assert "node a" in text and "node b" in text
    leases = a.metrics()["corral_cluster_leases"] + b.metrics()["corral_cluster_leases"]
    assert leases == 6


def test_a_draining_node_hands_its_sessions_over_without_waiting_for_the_lease(corral, pg_url):
    # a lease of 60 s: a session moves on within the test only if it is handed over.
    # Node a runs alone first, so it owns every session (with two nodes up, either
    # may claim a new one: the accepting node's claim races the other's hint)
    (a,) = start_nodes(corral, pg_url, ["a"], HISTORY, ttl="60s")
    for i in range(4):
        assert a.texts(f"d{i}", "one") == ["one"]
    (b,) = start_nodes(corral, pg_url, ["b"], HISTORY, ttl="60s")
    owned_by_a = [r["session"] for r in a.ls() if r["node"] == "a"]
    assert sorted(owned_by_a) == [f"d{i}" for i in range(4)]
    assert a.stop() == 0
    for session in owned_by_a:
        body = b.send(session, "two", wait=20)
        assert body["status"] == "done", body
        assert [r["text"] for r in body["replies"]] == ["one|two"]  # its history moved too


def test_kill_from_another_node_stops_the_owners_worker_and_the_user_is_told(corral, pg_url):
    a, b = start_nodes(corral, pg_url, ["a", "b"], CHAOS)
    status, _ = a.request("POST", "/v1/messages", {"session": "dave", "text": "hang"})
    assert status == 202
    wait_for(lambda: any(r["state"] == "busy" for r in a.ls() if r["session"] == "dave"), 30)
    owner = next(r["node"] for r in a.ls() if r["session"] == "dave")
    other = b if owner == "a" else a
    killed = other.cli("kill", "dave", "--json")
    assert killed.returncode == 0, killed.stderr
    assert json.loads(killed.stdout)["reaped"] is True
    replies = wait_for(lambda: replies_of(other, "dave"), timeout=20)
    assert replies[0]["kind"] == "error" and "[killed]" in replies[0]["text"]
    missing = other.cli("kill", "nobody")
    assert missing.returncode != 0


def test_release_from_another_node_lifts_a_quarantine(corral, pg_url):
    limits = {"restart_intensity": 1, "restart_period": "60s", "quarantine": "10m"}
    nodes = [corral({**node_config(pg_url, n), "limits": limits}, agent=CHAOS) for n in ("a", "b")]
    a, b = nodes
    for _ in range(2):
        a.send("eve", "crash", wait=30)

    def quarantined() -> bool:
        return any(r["state"] == "quarantined" for r in a.ls() + b.ls() if r["session"] == "eve")

    wait_for(quarantined, timeout=30)
    refused = a.send("eve", "hello", wait=30)
    assert refused["replies"][0]["kind"] == "error"
    assert "quarantined" in refused["replies"][0]["text"]
    owner = next(r["node"] for r in a.ls() if r["session"] == "eve")
    other = b if owner == "a" else a
    released = other.cli("release", "eve")
    assert released.returncode == 0, released.stderr
    assert other.texts("eve", "hello again") == ["hello again"]


def test_kill_9_of_a_node_under_load_loses_nothing_and_shows_no_reply_twice(
    corral, pg_url, tmp_path: Path
):
    # the bar: three nodes, 40 sessions x 4 messages sent to random nodes
    nodes = start_nodes(corral, pg_url, ["a", "b", "c"], SLOW_HISTORY)
    sessions, per_session = 40, 4
    rng = random.Random(12)
    results: dict[str, list[list[str]]] = {f"u{i}": [] for i in range(sessions)}
    first_reply: dict[str, float] = {}  # after the kill
    alive = list(nodes)
    errors: list[str] = []

    def client(session: str) -> None:
        for k in range(per_session):
            message_id = f"{session}-{k}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # ends answered, or at the deadline
                node = rng.choice(alive)
                try:
                    body = node.send(session, f"{session}.{k}", wait=20, id=message_id)
                except Exception:  # the node died under the request: ask another
                    time.sleep(0.2)
                    continue
                if body["status"] in ("done", "error"):
                    results[session].append([r["text"] for r in body["replies"]])
                    first_reply.setdefault(session, time.monotonic())
                    break
            else:
                errors.append(f"{message_id} not answered")

    threads = [threading.Thread(target=client, args=(s,)) for s in results]
    for t in threads:
        t.start()
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:  # the most live workers any one session has, cluster-wide
        while not sampling.is_set():  # ends when the test is done sending
            counts: dict[str, int] = {}
            for node in nodes:
                for session, pids in workers_of(node).items():
                    counts[session] = counts.get(session, 0) + len(pids)
            samples.append(max(counts.values(), default=0))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    victim = nodes[1]
    owned = wait_for(
        lambda: {r["session"] for r in victim.ls() if r["state"] == "busy"}, timeout=30
    )
    alive.remove(victim)
    victim.kill9()
    killed_at = time.monotonic()
    first_reply.clear()
    for t in threads:
        t.join(300)
    sampling.set()
    sampler.join(30)
    assert samples and max(samples) == 1, f"a session had {max(samples)} live workers"
    assert not errors
    took = time.monotonic() - killed_at
    resumed = [first_reply[s] - killed_at for s in owned if s in first_reply]
    print(f"sessions of the killed node: {len(owned)}; first replies after", resumed)
    # lease_ttl (3 s) + the poll + a turn, with a wide margin for two busy cores
    assert resumed and max(resumed) < 3 + 30
    for session, got in results.items():
        expected = [["|".join(f"{session}.{j}" for j in range(k + 1))] for k in range(per_session)]
        assert got == expected, (session, got)
        # as the long-poll shows them: one reply per message, none twice
        shown = [r["text"] for r in replies_of(nodes[0], session)]
        assert shown == [e[0] for e in expected], (session, shown)
    assert took < 300
    # the killed node comes back (same name, same state dir) and takes work again
    victim.start(timeout=60)
    assert victim.texts("u0", "back") == [
        "|".join([*(f"u0.{j}" for j in range(per_session)), "back"])
    ]
    status = json.loads(victim.cli("status", "--json").stdout)
    assert {n["name"] for n in status["nodes"]} == {"a", "b", "c"}


def test_a_dead_nodes_sessions_resume_elsewhere_within_the_lease_ttl(corral, pg_url):
    a, b = start_nodes(corral, pg_url, ["a", "b"], CHAOS)
    for i in range(4):
        a.request("POST", "/v1/messages", {"session": f"t{i}", "text": "sleep 2; echo first"})
    wait_for(lambda: len(workers_of(a)) + len(workers_of(b)) == 4, timeout=30)
    victim, survivor = (a, b) if workers_of(a) else (b, a)
    theirs = set(workers_of(victim))
    victim.kill9()
    killed_at = time.monotonic()
    # the dead node's workers die with it (parent-death signal), its turns run again
    for session in theirs:
        texts = wait_for(lambda s=session: [r["text"] for r in replies_of(survivor, s)], 60)
        assert texts == ["first"]
    resumed = time.monotonic() - killed_at
    assert resumed < 3 + 20  # lease_ttl + the poll + a turn of 2 s, with a wide margin
    for session in theirs:
        assert survivor.texts(session, "echo again") == ["again"]


def test_a_stopped_node_finds_its_leases_gone_and_writes_nothing(corral, pg_url):
    a, b = start_nodes(corral, pg_url, ["a", "b"], CHAOS)
    status, _ = a.request("POST", "/v1/messages", {"session": "frank", "text": "sleep 6; echo x"})
    assert status == 202
    wait_for(lambda: "frank" in workers_of(a) or "frank" in workers_of(b), timeout=30)
    victim, survivor = (a, b) if "frank" in workers_of(a) else (b, a)
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        # past the lease: the survivor takes the session and runs the turn again
        wait_for(lambda: "frank" in workers_of(survivor), timeout=30)
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    # the stopped node wakes up, finds its lease gone and kills its worker at once
    wait_for(lambda: "frank" not in workers_of(victim), timeout=15)
    samples = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        samples.append(
            len(workers_of(victim).get("frank", [])) + len(workers_of(survivor).get("frank", []))
        )
        time.sleep(0.1)
    assert max(samples) <= 1
    replies = wait_for(lambda: replies_of(survivor, "frank"), timeout=30)
    assert [r["text"] for r in replies] == ["x"]
    # its worker ended itself at its fence while the node was stopped (or, failing
    # that, the node stopped it on waking)
    log = victim.log()
    assert "ended itself at its lease's fence" in log or "lease lost" in log, log[-2000:]


def test_a_node_cut_from_the_database_stops_its_workers_and_comes_back(corral, pg_url, pg_server):
    (a,) = start_nodes(corral, pg_url, ["a"], CHAOS)
    assert a.texts("gina", "echo before") == ["before"]
    status, _ = a.request("POST", "/v1/messages", {"session": "gina", "text": "sleep 8; echo mid"})
    assert status == 202
    wait_for(lambda: "gina" in workers_of(a), timeout=30)
    with psycopg.connect(pg_url) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
    with pg_server.admin() as admin:
        # the database refuses new connections from the node and drops its current ones
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (dbname,),
        )
        try:
            wait_for(lambda: "gina" not in workers_of(a), timeout=20)
            # the worker may end itself at its fence a moment before the node fences
            wait_for(lambda: "stopping its" in a.log(), timeout=20)
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    # the node comes back by itself: the interrupted turn is answered, new ones run
    assert a.texts("gina", "echo after", wait=60) == ["after"]
    assert [r["text"] for r in replies_of(a, "gina")] == ["before", "mid", "after"]


@pytest.mark.parametrize("name", ["a"])
def test_a_second_node_with_the_same_name_refuses_to_start(corral, pg_url, tmp_path, name):
    corral(node_config(pg_url, name))
    other = Corral(tmp_path / "other", node_config(pg_url, name))
    with pytest.raises(RuntimeError, match="another node named"):
        other.start(timeout=60)


def test_webhook_replies_are_delivered_once_each_in_order_per_session_across_nodes(corral, pg_url):
    with Receiver([200]) as rx:
        hooks = {
            "channels.webhook.hooks": {"url": rx.url},
            "delivery": {"retry_initial": "200ms", "retry_max": "2s"},
        }
        a, b = (corral({**node_config(pg_url, n), **hooks}, agent=HISTORY) for n in ("a", "b"))
        rng = random.Random(3)
        sessions = [f"w{i}" for i in range(6)]
        for k in range(3):
            for s in sessions:
                node = rng.choice([a, b])
                status, _ = node.request(
                    "POST",
                    "/v1/channels/hooks/messages",
                    {"session": s, "text": f"{s}.{k}", "id": f"{s}-{k}"},
                )
                assert status == 202
        rx.wait_requests(18, timeout=60)
        time.sleep(1.0)  # a second delivery of anything would arrive by now
        delivered = rx.delivered()
        assert sorted(d["id"] for d in delivered) == sorted(
            f"{s}-{k}:0" for s in sessions for k in range(3)
        )
        for s in sessions:
            texts = [d["text"] for d in delivered if d["session"] == s]
            assert texts == ["|".join(f"{s}.{j}" for j in range(k + 1)) for k in range(3)]
