"""Frame floods: a bystander's reply latency with and without ten sessions flooding the
supervisor with small frames.

Two bystander sessions echo in a closed loop for T seconds; then the same with ten
sessions added that each send 60,000 empty log frames per turn (the red team's case,
well under output_per_turn) and start the next as soon as the last is answered; then
the same with progress frames. The figure is bystander p99 with floods / without,
measured in the same run on the same server: goal <= 1.5 (it was > 300 before corral
bounded the frames it handles per worker per loop pass).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.client import client, scrape
from bench.common import Bench
from bench.isolation import Phase, ratio, run_phase, warm_up
from bench.servers import CorralServer, CpuMeter

FLOODERS = 10
BYSTANDERS = 2
GOAL = 1.5
FLOODS = {"log": "logs 60000", "progress": "progress 60000"}


def figures(p: Phase) -> dict[str, Any]:
    x = p.summary()
    return {
        k: x.get(k)
        for k in (
            "requests",
            "replies",
            "errors",
            "unanswered",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "loop_lag_p99_ms",
            "loop_lag_max_ms",
            "cpu_pct",
            "faults",
        )
        if k in x
    }


async def settle(server: CorralServer, sessions: set[str], timeout: float = 60.0) -> None:
    """Wait until the flooders' last turns are over (their clients were cut off at the end
    of the phase; the turns run on), so the next phase starts clean."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # ends when no flooder is busy, or at the deadline
        rows = await server.sessions()
        if not any(r["session"] in sessions and r["state"] == "busy" for r in rows):
            return
        await asyncio.sleep(0.5)


async def run(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    seconds = plan.isolation_seconds
    grace = plan.isolation_grace
    bystanders = [f"bystander-{i}" for i in range(BYSTANDERS)]
    result: dict[str, Any] = {
        "bystanders": BYSTANDERS,
        "flooding_sessions": FLOODERS,
        "seconds_per_phase": seconds,
        "goal_ratio_p99": GOAL,
    }
    bench.say(f"floods: {BYSTANDERS} bystanders, {FLOODERS} flooding sessions")
    server = CorralServer(
        bench.tmp,
        "floods",
        agent="bench.agents:frame_flood",
        # 60,000 frames x 16 bytes: under the 4 MiB budget, so the frame rate is what acts
        config={"limits": {"output_per_turn": "4MiB"}, "supervisor": {"idle_timeout": "1h"}},
    )
    try:
        await server.start()
        async with client() as http:
            flooders = [f"{kind}-flood-{i}" for kind in FLOODS for i in range(FLOODERS)]
            await warm_up(http, server.base, bystanders + flooders)
            pids = {s["pid"] for s in await server.sessions() if s["session"] in bystanders}
            meter = CpuMeter(server.pid, pids)
            base = server.base
            clean = await run_phase(http, base, bystanders, {}, seconds, grace, meter, server)
            c = figures(clean)
            result["fault_free"] = c
            bench.say(f"  without floods: p99 {c['p99_ms']} ms")
            for kind, text in FLOODS.items():
                flooders = {f"{kind}-flood-{i}": text for i in range(FLOODERS)}
                phase = await run_phase(
                    http, server.base, bystanders, flooders, seconds, grace, meter, server
                )
                f = figures(phase)
                clean_again = f["errors"] == 0 and f["unanswered"] == 0
                f["ratio_p99"] = ratio(f["p99_ms"], c["p99_ms"]) if clean_again else None
                f["ratio_p50"] = ratio(f["p50_ms"], c["p50_ms"]) if clean_again else None
                result[f"{kind}_flood"] = f
                bench.say(f"  {kind} flood: p99 {f['p99_ms']} ms, ratio {f['ratio_p99']}")
                await settle(server, set(flooders))
            _, samples, _ = await scrape(http, server.metrics_url)
            result["frames_dropped"] = {k: v for k, v in samples.items() if "frames_dropped" in k}
    finally:
        if server.proc is not None:
            await server.stop()
    return result
