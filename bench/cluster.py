"""Cluster: one SQLite node vs one, two and three PostgreSQL nodes, and takeover time.

Throughput: 16 sessions, one closed-loop client each, every message POSTed with ?wait
to a node picked at random (so with several nodes most messages are accepted on a
node that does not run their session, and the answer travels back through the
database), echo agent. Messages/s and p50/p99 of the request time.

Takeover: three PostgreSQL nodes; 12 sessions get a first message (warm workers,
leases spread over the nodes); one node is kill -9'd; at once every session it owned
gets a message through a surviving node. The figure is the time from the kill to each
of those replies: lease_ttl (the dead node's leases must expire), the claim poll, a
worker's spawn and the turn.

PostgreSQL: $CORRAL_TEST_PG_URL (a superuser URL), else a throwaway server started
from Debian's packages as tests/pg.py does (fsync off: the figures compare corral's
paths, not the disk; the SQLite node commits with its usual fsync).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from typing import Any

from bench.client import client, ms, percentile, post
from bench.common import Bench
from bench.servers import CorralServer, kill_by_pid

SESSIONS = 16
TAKEOVER_SESSIONS = 12


async def closed_loop(bases: list[str], seconds: float, warmup: float) -> dict[str, Any]:
    rng = random.Random(16)
    counted: list[float] = []
    failures = 0
    window: dict[str, float] = {}
    async with client() as http:

        async def loop(session: str) -> None:
            nonlocal failures
            n = 0
            while True:  # ends when cancelled at the end of the window
                n += 1
                r = await post(http, rng.choice(bases), session, f"m{n}")
                if "start" in window and r.sent >= window["start"]:
                    if r.done:
                        counted.append(r.seconds)
                    else:
                        failures += 1

        tasks = [asyncio.create_task(loop(f"cl-{i}")) for i in range(SESSIONS)]
        try:
            await asyncio.sleep(warmup)
            window["start"] = time.perf_counter()
            await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - window["start"]
            done = len(counted)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "messages_per_s": round(done / elapsed, 1),
        "p50_ms": ms(percentile(counted, 50)),
        "p99_ms": ms(percentile(counted, 99)),
        "failures": failures,
    }


def node_config(url: str, name: str, ttl: str) -> dict[str, dict[str, Any]]:
    return {
        "supervisor": {"idle_timeout": "1h"},
        "store": {"url": url},
        "cluster": {"node": name, "lease_ttl": ttl},
    }


async def start_nodes(
    bench: Bench, key: str, url: str, count: int, ttl: str = "10s"
) -> list[CorralServer]:
    nodes = [
        CorralServer(bench.tmp, f"{key}-{chr(97 + i)}", config=node_config(url, chr(97 + i), ttl))
        for i in range(count)
    ]
    await asyncio.gather(*(n.start() for n in nodes))
    return nodes


async def stop_nodes(nodes: list[CorralServer]) -> None:
    await asyncio.gather(*(n.stop() for n in nodes))


async def takeover(bench: Bench, url: str, ttl: str) -> dict[str, Any]:
    nodes = await start_nodes(bench, f"takeover-{ttl}", url, 3, ttl)
    try:
        async with client() as http:
            sessions = [f"tk-{i}" for i in range(TAKEOVER_SESSIONS)]
            warm = await asyncio.gather(
                *(post(http, nodes[i % 3].base, s, "warm") for i, s in enumerate(sessions))
            )
            if not all(r.done for r in warm):
                return {"error": "warm-up messages not answered"}
            await asyncio.sleep(bench.plan.settle)
            # the victim: the node that runs the most sessions
            by_node: dict[str, list[str]] = {}
            for n in nodes:
                for row in await n.sessions():
                    if row.get("node") == n.name.rsplit("-", 1)[-1]:
                        by_node.setdefault(n.name, []).append(row["session"])
            victim = max(nodes, key=lambda n: len(by_node.get(n.name, [])))
            survivors = [n for n in nodes if n is not victim]
            owned = by_node.get(victim.name, [])
            if not owned:
                return {"error": "the victim owned no session"}
            assert victim.proc is not None
            killed = time.perf_counter()
            kill_by_pid(victim.proc)
            answers = await asyncio.gather(
                *(
                    post(http, survivors[i % 2].base, s, "after", wait=60)
                    for i, s in enumerate(owned)
                )
            )
        seconds = [a.received - killed for a in answers if a.done]
        return {
            "lease_ttl": ttl,
            "sessions_moved": len(owned),
            "answered": len(seconds),
            "first_reply_s": round(min(seconds), 2) if seconds else None,
            "median_s": round(statistics.median(seconds), 2) if seconds else None,
            "last_reply_s": round(max(seconds), 2) if seconds else None,
        }
    finally:
        await stop_nodes(nodes)


async def run(bench: Bench) -> dict[str, Any]:
    from tests.pg import PgServer, start_server  # the tests' throwaway server

    seconds = bench.plan.throughput_seconds
    external = os.environ.get("CORRAL_TEST_PG_URL")
    server = PgServer(external) if external else await asyncio.to_thread(start_server)
    result: dict[str, Any] = {"sessions": SESSIONS, "seconds": seconds}
    try:
        bench.say(f"cluster: one SQLite node, {SESSIONS} sessions, {seconds:g} s")
        sqlite = CorralServer(
            bench.tmp, "cluster-sqlite", config={"supervisor": {"idle_timeout": "1h"}}
        )
        try:
            await sqlite.start()
            result["sqlite_1"] = await closed_loop([sqlite.base], seconds, bench.plan.settle)
        finally:
            await sqlite.stop()
        for count in (1, 2, 3):
            bench.say(f"cluster: {count} PostgreSQL node(s), {SESSIONS} sessions, {seconds:g} s")
            db = await asyncio.to_thread(server.create_database)
            nodes = await start_nodes(bench, f"cluster-pg{count}", server.url(db), count)
            try:
                result[f"pg_{count}"] = await closed_loop(
                    [n.base for n in nodes], seconds, bench.plan.settle
                )
            finally:
                await stop_nodes(nodes)
                await asyncio.to_thread(server.drop_database, db)
        for ttl in ("3s",) if bench.plan.quick else ("3s", "10s"):
            bench.say(f"cluster: takeover after kill -9, lease_ttl {ttl}")
            db = await asyncio.to_thread(server.create_database)
            try:
                result[f"takeover_{ttl}"] = await takeover(bench, server.url(db), ttl)
            finally:
                await asyncio.to_thread(server.drop_database, db)
    finally:
        if not external:
            await asyncio.to_thread(server.stop)
    return result
