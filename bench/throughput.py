"""Throughput: echo messages per second, HTTP -> supervisor -> worker -> reply.

16 sessions, one client each in a closed loop (a session runs one turn at a
time, so more clients per session would only queue), one pooled aiohttp client.
The same client against a bare aiohttp echo server (bench/baseline.py --mode
echo) gives the ceiling this client and this machine allow. CPU use of the
client and of each server's processes is reported, to show who was the limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.client import client, ms, percentile, post
from bench.common import Bench
from bench.servers import BaselineServer, CorralServer, CpuMeter

SESSIONS = 16
WARMUP = 1.0


async def closed_loop(
    base: str, pid: int, seconds: float, warmup: float = WARMUP
) -> dict[str, Any]:
    """Messages/s over `seconds` after a warm-up, with client and server CPU use."""
    sessions = [f"tp-{i}" for i in range(SESSIONS)]
    counted: list[float] = []
    failures = 0
    window: dict[str, float] = {}
    async with client() as http:

        async def loop(session: str) -> None:
            nonlocal failures
            n = 0
            while True:  # ends when cancelled at the end of the window
                n += 1
                r = await post(http, base, session, f"m{n}")
                if "start" in window and r.sent >= window["start"]:
                    if r.done:
                        counted.append(r.seconds)
                    else:
                        failures += 1

        tasks = [asyncio.create_task(loop(s)) for s in sessions]
        try:
            await asyncio.sleep(warmup)
            meter = CpuMeter(pid, set())
            meter.start()
            window["start"] = time.perf_counter()
            await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - window["start"]
            cpu = meter.stop()
            done = len(counted)  # replies to requests sent in the window, back before its end
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    rate = done / elapsed
    # the server's own CPU per message (its loop and other threads; a corral's workers
    # apart): less at the mercy of a busy machine than messages/s
    own = cpu.get("loop_thread", 0) + cpu.get("other_threads", 0)
    return {
        "messages_per_s": round(rate, 1),
        "server_cpu_us_per_message": round(own / 100 / rate * 1e6) if rate else None,
        "p50_ms": ms(percentile(counted, 50)),
        "p99_ms": ms(percentile(counted, 99)),
        "failures": failures,
        "cpu_pct": cpu,
    }


async def run(bench: Bench) -> dict[str, Any]:
    seconds = bench.plan.throughput_seconds
    result: dict[str, Any] = {"sessions": SESSIONS, "seconds": seconds}
    # the second corral run commits without fsync (a switch corral has for benchmarks
    # only): the difference is what durability costs
    for key, env in (("corral", {}), ("corral_no_fsync", {"CORRAL_BENCH_NO_FSYNC": "1"})):
        bench.say(f"throughput: {key}, {SESSIONS} sessions, {seconds:g} s")
        server = CorralServer(
            bench.tmp, f"throughput-{key}", config={"supervisor": {"idle_timeout": "1h"}}, env=env
        )
        try:
            await server.start()
            result[key] = await closed_loop(server.base, server.pid, seconds, bench.plan.settle)
        finally:
            await server.stop()
        if env and server.log_line("CORRAL_BENCH_NO_FSYNC") is None:
            result[key]["note"] = "this corral ignores CORRAL_BENCH_NO_FSYNC: commits were synced"
    bench.say(f"throughput: bare aiohttp echo, {seconds:g} s")
    bare_server = BaselineServer(bench.tmp, "bare-echo", "echo", 5.0)
    try:
        await bare_server.start()
        assert bare_server.proc is not None
        result["bare_aiohttp"] = await closed_loop(
            bare_server.base, bare_server.proc.pid, seconds, bench.plan.settle
        )
    finally:
        bare_server.kill()
    bare = result["bare_aiohttp"]["messages_per_s"]
    result["ratio"] = round(result["corral"]["messages_per_s"] / bare, 3) if bare else None
    result["ratio_no_fsync"] = (
        round(result["corral_no_fsync"]["messages_per_s"] / bare, 3) if bare else None
    )
    result["goal_ratio"] = 0.5
    return result
