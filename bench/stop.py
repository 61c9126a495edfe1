"""Stop: SIGTERM -> exit with every worker hung in a turn, against drain_timeout + kill_grace.

W sessions each start a `hang` turn (no deadline fires: the turn and no-progress
timeouts are long); once all W workers are busy, the supervisor gets SIGTERM.
A second round uses `ignore-term; hang`, so the workers survive SIGTERM and
only kill_grace's SIGKILL ends them.
It should give the turns drain_timeout, SIGTERM the workers, SIGKILL what is left
after kill_grace, and exit 0; then no process carrying the run's marker may be
left.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.client import client
from bench.common import Bench
from bench.servers import CorralServer, marked

DRAIN = 2.0
GRACE = 1.0


VARIANTS = {"hang": "hang", "ignore_term_hang": "ignore-term; hang"}


async def run(bench: Bench) -> dict[str, Any]:
    return {name: await run_variant(bench, name, text) for name, text in VARIANTS.items()}


async def run_variant(bench: Bench, name: str, text: str) -> dict[str, Any]:
    n = bench.plan.stop_workers
    bench.say(f"stop: SIGTERM with {n} workers hung in {text!r}")
    server = CorralServer(
        bench.tmp,
        f"stop-{name}",
        agent="corral.worker.agents.chaos:agent",
        config={
            "supervisor": {
                "drain_timeout": f"{DRAIN:g}s",
                "kill_grace": f"{GRACE:g}s",
                "max_workers": n + 50,
            },
            "limits": {"turn_timeout": "10m", "no_progress_timeout": "10m"},
        },
    )
    result: dict[str, Any] = {
        "hung_workers": n,
        "drain_timeout_s": DRAIN,
        "kill_grace_s": GRACE,
        "bound_s": DRAIN + GRACE,
    }
    try:
        await server.start()
        async with client(32) as http:
            bodies = [{"session": f"hung-{i}", "text": text} for i in range(n)]

            async def accept(body: dict[str, str]) -> int:
                async with http.post(f"{server.base}/v1/messages", json=body) as resp:
                    return resp.status

            codes = await asyncio.gather(*(accept(b) for b in bodies))
        if any(c != 202 for c in codes):
            raise RuntimeError(f"stop: not every hang was accepted: {codes}")
        deadline = time.monotonic() + 120
        busy = 0
        while time.monotonic() < deadline:  # ends when all are busy, or at the deadline
            busy = (await server.status())["workers"].get("busy", 0)
            if busy >= n:
                break
            await asyncio.sleep(0.1)
        result["busy_at_sigterm"] = busy
    finally:
        seconds, code = await server.stop(timeout=60)
        at_exit = len(marked(server.mark))
        left = await server.leftovers(timeout=2.0)
    result.update(
        {
            "stop_seconds": round(seconds, 3),
            "over_bound_ms": round((seconds - DRAIN - GRACE) * 1000, 1),
            "exit_code": code,
            "processes_left_at_exit": at_exit,
            "processes_left_after_2s": len(left),
        }
    )
    return result
