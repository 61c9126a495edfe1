"""`corral serve`: start everything, run until SIGTERM/SIGINT/`corral drain`, stop within bounds."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from corral.protocol.procfs import set_title
from corral.supervisor import views
from corral.supervisor.channels.http import HttpChannel
from corral.supervisor.config import Config, ConfigError, split_listen, telegram_tokens
from corral.supervisor.control import ControlServer, ControlSocketBusy
from corral.supervisor.metrics import MetricsServer
from corral.supervisor.nodelock import NodeLock
from corral.supervisor.sdnotify import Notifier
from corral.supervisor.spawner import SpawnError
from corral.supervisor.stores import AnyStore, StoreError, make_store
from corral.supervisor.supervisor import Supervisor

log = logging.getLogger("corral")

STATUS_EVERY = 5.0  # seconds between STATUS= updates to systemd


class StateDirBusy(Exception):
    pass


def lock_state_dir(state_dir: Path) -> int:
    """Hold a kernel lock on the state directory for the life of the process.

    Two supervisors on one inbox would run every turn twice. The lock is flock on an
    open file: it dies with the process, so a SIGKILLed run leaves nothing stale.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "corral.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirBusy(f"another corral is running on {state_dir}") from None
    return fd


def feed_systemd(sup: Supervisor, notifier: Notifier) -> None:
    """Called by the supervisor's loop every tick: a stuck loop stops the watchdog pings."""
    loop = asyncio.get_running_loop()
    last = {"watchdog": 0.0, "status": 0.0}
    interval = notifier.watchdog_interval

    def tick() -> None:
        now = loop.time()
        if interval is not None and now - last["watchdog"] >= interval / 2:
            notifier.notify("WATCHDOG=1")
            last["watchdog"] = now
        if now - last["status"] >= STATUS_EVERY:
            notifier.notify(views.systemd_status(sup))
            last["status"] = now

    sup.lag.on_tick.append(tick)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, if it is installed (`pip install 'corral[fast]'`) and not turned
    off with CORRAL_EVENT_LOOP=asyncio; else None: asyncio's own.

    Both run the same code: uvloop is a drop-in implementation of asyncio's loop on
    libuv, with less overhead per callback, socket read and write."""
    if os.environ.get("CORRAL_EVENT_LOOP", "") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def open_store(config: Config) -> AnyStore:
    # for the durability benchmark only: the same run without fsync at commit
    no_fsync = os.environ.get("CORRAL_BENCH_NO_FSYNC") == "1"
    if no_fsync:
        log.warning("CORRAL_BENCH_NO_FSYNC=1: commits are not synced; accepted is not durable")
    return make_store(config, durable=not no_fsync)


async def serve(config: Config) -> int:
    """Run the supervisor; the process exit code."""
    loop = asyncio.get_running_loop()
    # The store, sampler and scrape threads hold the GIL for up to this long before
    # the loop gets it back; 5 ms (the default) shows up as loop lag under load.
    sys.setswitchinterval(0.001)
    set_title(f"corral: supervisor {config.state_path}")
    notifier = Notifier()
    try:
        tokens = telegram_tokens(config)  # read once, at start
    except ConfigError as e:
        log.error("cannot start: %s", e)
        return 2
    try:
        lock_fd = lock_state_dir(config.state_path)
    except (StateDirBusy, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    sup = Supervisor(config, store=open_store(config), telegram_tokens=tokens)
    http = HttpChannel(sup, sup.inbox, config)
    control = ControlServer(sup, config.control_socket_path, config.supervisor.control_socket_mode)
    metrics = MetricsServer(
        sup.metrics,
        lambda: views.session_rows(sup),
        *split_listen(config.metrics.listen, "metrics.listen"),
        draining=lambda: sup.draining,
    )
    async with AsyncExitStack() as stack:
        stack.callback(os.close, lock_fd)
        stack.callback(notifier.close)
        stack.push_async_callback(sup.close)
        try:
            if config.store.url:
                node_lock = NodeLock(config.store.url)
                stack.push_async_callback(node_lock.release)
                await node_lock.acquire()
                sup.services.start("node lock", node_lock.watch)
            await sup.start()
            stack.push_async_callback(control.stop)
            await control.start()
            stack.push_async_callback(http.stop)
            await http.start()
            stack.push_async_callback(metrics.stop)
            await metrics.start()
        except (SpawnError, ControlSocketBusy, StoreError, OSError) as e:
            log.error("cannot start: %s", e)
            return 2
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.request_stop)
        feed_systemd(sup, notifier)
        notifier.notify("READY=1", views.systemd_status(sup))
        log.info(
            "corral is serving: agent %s, state in %s, event loop %s",
            config.agent.entrypoint,
            config.state_path,
            type(loop).__module__.partition(".")[0],
        )
        await sup.wait_stop_requested()
        notifier.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping: draining for up to %gs", sup.drain_timeout)
        await sup.drain()
    if sup.fatal is not None:
        log.critical("stopped: %s", sup.fatal)
        return 1
    log.info("stopped")
    return 0
