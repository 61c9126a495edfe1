"""Run a real supervisor in a process of its own with a fault injected into its watchdog,
and print what happened as one line of JSON: `python -m tests.inprocess SCENARIO STATE_DIR`.

A process of its own, because a supervisor makes itself a subreaper and, at close, kills
its process's other children as strays (the test runner's own servers among them).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from corral.protocol.types import HTTP_CHANNEL, Origin
from corral.supervisor import watchdog
from corral.supervisor.config import parse_config
from corral.supervisor.supervisor import Supervisor


def config(state: Path) -> Any:
    return parse_config(
        f"""
[supervisor]
state_dir = "{state}"
kill_grace = "1s"
drain_timeout = "1s"
[agent]
entrypoint = "corral.worker.agents.chaos:agent"
[limits]
rss_max = "150MiB"
"""
    )


def inject(failures: int | None) -> dict[str, int]:
    """Make the watchdog's sampling raise `failures` times (None: every time)."""
    count = {"failures": 0}
    real = watchdog.sample_all

    def faulty(pids: list[int], *args: Any) -> list[Any]:
        if failures is None or count["failures"] < failures:
            count["failures"] += 1
            raise OSError("injected: /proc could not be read")
        return real(pids, *args)

    watchdog.sample_all = faulty  # type: ignore[assignment]
    return count


async def watchdog_recovers(state: Path) -> dict[str, Any]:
    count = inject(2)
    sup = Supervisor(config(state))
    await sup.start()
    try:
        accepted = await sup.accept("big", "balloon 300; hang", Origin(channel=HTTP_CHANNEL))
        ended, replies = await sup.inbox.wait_turn(accepted.message.id, 60)
        return {
            "failures": count["failures"],
            "restarts": sup.services.restarts["watchdog"],
            "ended": ended,
            "texts": [r.text for r in replies],
        }
    finally:
        await sup.drain()
        await sup.close()


async def watchdog_never_recovers(state: Path) -> dict[str, Any]:
    inject(None)
    sup = Supervisor(config(state))
    await sup.start()
    try:
        await sup.accept("s", "hang", Origin(channel=HTTP_CHANNEL))  # something to sample
        await asyncio.wait_for(sup.wait_stop_requested(), 60)
        return {"fatal": sup.fatal, "healthy": sup.services.healthy()}
    finally:
        await sup.drain()
        await sup.close()


SCENARIOS = {"watchdog_recovers": watchdog_recovers, "never_recovers": watchdog_never_recovers}

if __name__ == "__main__":
    result = asyncio.run(SCENARIOS[sys.argv[1]](Path(sys.argv[2])))
    print(json.dumps(result))
