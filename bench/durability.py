"""Durability: accepted messages per second, the durable store against the same run
with commits not synced (issue 4).

An accept is acknowledged (202) only once its message is committed to SQLite; the
baseline is the same supervisor with `CORRAL_BENCH_NO_FSYNC=1` (WAL commits without
fsync), so the difference is what "accepted means durable" costs. Clients POST
without `?wait` as fast as 202s come back, over many sessions; turns run behind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.client import client
from bench.common import Bench
from bench.servers import CorralServer

CLIENTS = 32
SESSIONS = 64


async def accept_rate(base: str, seconds: float) -> dict[str, Any]:
    accepted = 0
    failures = 0
    stop = time.perf_counter() + seconds
    async with client() as http:

        async def loop(i: int) -> None:
            nonlocal accepted, failures
            n = 0
            while time.perf_counter() < stop:  # ends at the end of the window
                n += 1
                body = {"session": f"d{(i + n * CLIENTS) % SESSIONS}", "text": f"m{i}.{n}"}
                async with http.post(f"{base}/v1/messages", json=body) as resp:
                    await resp.read()
                    if resp.status == 202:
                        accepted += 1
                    else:
                        failures += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(CLIENTS)))
        elapsed = time.perf_counter() - t0
    return {"accepted_per_s": round(accepted / elapsed, 1), "failures": failures}


async def run(bench: Bench) -> dict[str, Any]:
    seconds = bench.plan.throughput_seconds
    config = {"limits": {"max_queue": 100_000}, "supervisor": {"idle_timeout": "1h"}}
    results: dict[str, Any] = {}
    for name, env in (("durable", {}), ("not_synced", {"CORRAL_BENCH_NO_FSYNC": "1"})):
        bench.say(f"durability: accepts, {name}, {CLIENTS} clients, {seconds:g} s")
        server = CorralServer(bench.tmp, f"durability-{name}", config=config, env=env)
        try:
            await server.start()
            results[name] = await accept_rate(server.base, seconds)
        finally:
            await server.stop()
    durable = results["durable"]["accepted_per_s"]
    loose = results["not_synced"]["accepted_per_s"]
    results["ratio"] = round(durable / loose, 3) if loose else None
    return results
