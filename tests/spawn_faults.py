"""Run a real supervisor in a process of its own whose spawns fail for its own reasons
(descriptors running out), and print what happened as one line of JSON:
`python -m tests.spawn_faults SCENARIO STATE_DIR`. A process of its own for the reason
given in tests/inprocess.py (a supervisor kills its process's other children as strays).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from corral.protocol.types import HTTP_CHANNEL, Origin
from corral.supervisor.config import parse_config
from corral.supervisor.supervisor import Supervisor


def config(state: Path) -> Any:
    return parse_config(
        f"""
[supervisor]
state_dir = "{state}"
kill_grace = "1s"
drain_timeout = "1s"
[limits]
restart_intensity = 1
"""
    )


async def emfile_is_not_the_sessions_fault(state: Path) -> dict[str, Any]:
    sup = Supervisor(config(state))
    await sup.start()
    real = socket.socketpair
    failed = {"n": 0}

    def out_of_descriptors(*args: Any, **kwargs: Any) -> Any:
        if failed["n"] < 4:  # more than restart_intensity, were they counted
            failed["n"] += 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(*args, **kwargs)

    socket.socketpair = out_of_descriptors  # type: ignore[assignment]
    try:
        accepted = await sup.accept("innocent", "hello", Origin(channel=HTTP_CHANNEL))
        ended, replies = await sup.inbox.wait_turn(accepted.message.id, 60)
        w = sup.sessions.get("innocent")
        worker = w.worker if w is not None else None
        return {
            "failed": failed["n"],
            "ended": ended,
            "texts": [r.text for r in replies],
            "recent": sup.crashloops.recent("innocent"),
            "quarantined": sup.crashloops.quarantined("innocent"),
            "restarts": (sup.crashloops.records.get("innocent") or _no_record()).restarts,
            "demoted": bool(worker and worker.demoted),
            "sched_idle": bool(
                worker and os.sched_getscheduler(worker.pid) == os.SCHED_IDLE  # type: ignore[attr-defined]
            ),
            "failures_now": sup.spawner.failures,
        }
    finally:
        socket.socketpair = real
        await sup.drain()
        await sup.close()


def _no_record() -> Any:
    class NoRecord:
        restarts = 0

    return NoRecord()


SCENARIOS = {"emfile": emfile_is_not_the_sessions_fault}

if __name__ == "__main__":
    result = asyncio.run(SCENARIOS[sys.argv[1]](Path(sys.argv[2])))
    print(json.dumps(result))
