"""`corral serve`: start everything, run until SIGTERM/SIGINT, stop within bounds."""

from __future__ import annotations

import asyncio
import logging
import signal

from corral.protocol.config import Config
from corral.supervisor.channels.http import HttpChannel
from corral.supervisor.core import Supervisor
from corral.supervisor.spawner import SpawnError

log = logging.getLogger("corral")


async def serve(config: Config) -> int:
    """Run the supervisor; the process exit code."""
    loop = asyncio.get_running_loop()
    sup = Supervisor(config)
    http = HttpChannel(sup, config)
    try:
        await sup.start()
        await http.start()
    except SpawnError as e:
        log.error("cannot start: %s", e)
        await sup.close()
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        await http.stop()
        await sup.close()
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.request_stop)
    log.info("corral is serving: agent %s, state in %s", config.agent.entrypoint, config.state_path)
    await sup.wait_stop_requested()
    log.info("stopping: draining for up to %gs", config.supervisor.drain_timeout)
    await sup.drain()
    await http.stop()
    await sup.close()
    log.info("stopped")
    return 0
