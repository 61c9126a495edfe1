"""`corral serve`: start everything, run until SIGTERM/SIGINT/`corral drain`, stop within bounds."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

from corral.protocol.procfs import set_title
from corral.supervisor import views
from corral.supervisor.channels.http import HttpChannel
from corral.supervisor.config import Config, ConfigError, split_listen, telegram_tokens
from corral.supervisor.control import ControlServer, ControlSocketBusy
from corral.supervisor.metrics import MetricsServer
from corral.supervisor.reload import Reloader
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
    os.chmod(state_dir, 0o700)  # every message is in it: private, even if it existed wider
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


def listening(config: Config) -> str:
    """Where each channel listens, for the start-up line."""
    where = [
        f"http on {config.channels.http.listen}",
        *(f"webhook {name} on {config.channels.http.listen}" for name in config.channels.webhook),
        *(
            f"telegram {name} polling {bot.api_url}"
            for name, bot in config.channels.telegram.items()
        ),
        f"metrics on {config.metrics.listen}",
        f"control socket {config.control_socket_path}",
    ]
    return ", ".join(where)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `serve` runs on, from CORRAL_EVENT_LOOP: unset or "auto", uvloop's
    if it is installed (`pip install 'corral[fast]'`), else asyncio's own (None);
    "asyncio", asyncio's; "uvloop", uvloop's or a StartError saying it is missing.

    Both run the same code: uvloop is a drop-in implementation of asyncio's loop on
    libuv, with less overhead per callback, socket read and write."""
    choice = os.environ.get("CORRAL_EVENT_LOOP", "") or "auto"
    if choice not in ("auto", "asyncio", "uvloop"):
        raise StartError(f"CORRAL_EVENT_LOOP={choice!r}: expected auto, asyncio or uvloop")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartError(
                "CORRAL_EVENT_LOOP=uvloop, but uvloop is not installed: pip install 'corral[fast]'"
            ) from None
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def event_loop_name() -> str:
    """What the running loop is, for the start-up log line: "uvloop 0.21.0" or "asyncio"."""
    module = type(asyncio.get_running_loop()).__module__
    if module.startswith("uvloop"):
        import uvloop

        return f"uvloop {uvloop.__version__}"
    return "asyncio"


def open_store(config: Config) -> AnyStore:
    # for the durability benchmark only: the same run without fsync at commit
    no_fsync = os.environ.get("CORRAL_BENCH_NO_FSYNC") == "1"
    if no_fsync:
        log.warning("CORRAL_BENCH_NO_FSYNC=1: commits are not synced; accepted is not durable")
    return make_store(config, durable=not no_fsync)


class StartError(Exception):
    """A start-up step failed; the message names the config key to look at."""


async def started(key: str, value: object, step: Awaitable[None]) -> None:
    """Await one start-up step; an OSError becomes a StartError naming `key`."""
    try:
        await step
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            why = "the address is already in use (another corral, or another program?)"
        raise StartError(f"{key} = {str(value)!r}: {why}") from None


class Signals:
    """SIGTERM/SIGINT stop (a second one hurries the drain); SIGHUP reloads once serving.
    Installed before anything starts, so a signal during the start stops it cleanly."""

    STOP = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, sup: Supervisor, reloader: Reloader) -> None:
        self.sup = sup
        self.reloader = reloader
        self.serving = False
        self.stops = 0
        loop = asyncio.get_running_loop()
        for sig in self.STOP:
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.hangup)

    def stop(self, sig: signal.Signals) -> None:
        self.stops += 1
        if self.stops == 1:
            log.info("%s: stopping (another one skips the rest of drain_timeout)", sig.name)
            self.sup.request_stop()
        elif not self.sup.hurried:
            log.warning(
                "%s again: skipping the rest of drain_timeout; workers get SIGTERM now, "
                "SIGKILL after kill_grace",
                sig.name,
            )
            self.sup.hurry()

    def hangup(self) -> None:
        if not self.serving:
            log.warning("SIGHUP during start: ignored (send it again once corral is serving)")
            return
        log.info("SIGHUP: reloading the config")
        self.reloader.signalled()


async def serve(config: Config, config_path: Path | None = None) -> int:
    """Run the supervisor; the process exit code. `config_path`: the file `config` came
    from, re-read on reload (None: the same lookup again)."""
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
    except StateDirBusy as e:
        log.error("cannot start: %s", e)
        return 2
    except OSError as e:
        log.error(
            "cannot start: supervisor.state_dir = %r: %s",
            str(config.state_path),
            e.strerror or e,
        )
        return 2
    sup = Supervisor(config, store=open_store(config), telegram_tokens=tokens)
    sup.config_path = "" if config_path is None else str(config_path)
    http = HttpChannel(sup, sup.inbox, config)
    control = ControlServer(sup, config.control_socket_path, config.supervisor.control_socket_mode)
    metrics = MetricsServer(
        sup.metrics,
        lambda: views.session_rows(sup),
        *split_listen(config.metrics.listen, "metrics.listen"),
        draining=lambda: sup.draining,
    )

    def http_applied(new: Config) -> None:
        # bodies stay capped by the size the channel started with
        http.max_text = int(new.limits.max_text)

    reloader = Reloader(sup, config_path, on_applied=http_applied, notify=notifier.notify)
    control.reloader = reloader
    async with AsyncExitStack() as stack:
        stack.callback(os.close, lock_fd)
        stack.callback(notifier.close)
        stack.push_async_callback(sup.close)
        # kept to the end: the loop's close removes them (a signal during the close
        # must not become a KeyboardInterrupt)
        signals = Signals(sup, reloader)
        begun = {"supervisor": False}

        async def start() -> None:
            await sup.start()
            begun["supervisor"] = True
            stack.push_async_callback(control.stop)
            socket_key = (
                "supervisor.control_socket"
                if config.supervisor.control_socket
                else "supervisor.state_dir"
            )
            await started(socket_key, config.control_socket_path, control.start())
            stack.push_async_callback(http.stop)
            await started("channels.http.listen", config.channels.http.listen, http.start())
            stack.push_async_callback(metrics.stop)
            await started("metrics.listen", config.metrics.listen, metrics.start())

        starting = asyncio.ensure_future(start())
        stop = asyncio.ensure_future(sup.wait_stop_requested())
        await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during the start: stop without a traceback
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            log.info("stopped during start")
            if begun["supervisor"]:
                await sup.drain()
            return 0
        try:
            starting.result()
        except (SpawnError, ControlSocketBusy, StoreError, StartError, OSError) as e:
            stop.cancel()
            log.error("cannot start: %s", e)
            return 2
        signals.serving = True
        feed_systemd(sup, notifier)
        notifier.notify("READY=1", views.systemd_status(sup))
        log.info(
            "corral is serving: config %s; agent %s; state in %s; %s; event loop %s",
            sup.config_path or "(none: built-in defaults)",
            config.agent.entrypoint,
            config.state_path,
            listening(config),
            event_loop_name(),
        )
        await stop
        notifier.notify("STOPPING=1", "STATUS=draining")
        busy = sorted(w.session for w in sup.busy_workers())
        log.info(
            "stopping: draining for up to %gs; waiting for %d running turns%s",
            sup.drain_timeout,
            len(busy),
            f": {', '.join(busy[:10])}{' ...' if len(busy) > 10 else ''}" if busy else "",
        )
        await sup.drain()
    if sup.fatal is not None:
        log.critical("stopped: %s", sup.fatal)
        return 1
    log.info("stopped")
    return 0
