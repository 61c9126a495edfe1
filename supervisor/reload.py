"""Reload: SIGHUP or `corral reload` re-reads the config and applies what can change
while serving.

Limits, the agent (entrypoint and options), delivery settings, webhook channels' url
and secret, and drain_timeout / kill_grace / idle_timeout apply from the next turn:
a running turn finishes on the worker and the deadlines it started with. When what
workers are started with changes (the agent, its options, the frame cap, the CPU
bound, the cgroup memory bound), a new zygote is started first, and every worker of
the old one is retired: idle ones now, busy ones when their turn ends. The old zygote
is stopped once its last worker is reaped.

A reload is all or nothing: a file that does not parse, a changed key that needs a
restart (listen addresses, state_dir, the store, ...), or a new agent that cannot
start keeps the old config, and the refusal names the key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from corral.protocol.control import ReloadResult
from corral.supervisor import cgroups, views
from corral.supervisor.config import Config, ConfigError, find_config_path, load_config
from corral.supervisor.delivery import WebhookDelivery
from corral.supervisor.spawner import Spawner
from corral.supervisor.supervisor import Supervisor, worker_settings

log = logging.getLogger("corral.reload")

# keys (and tables) a reload applies; any other change needs a restart
LIVE = (
    "agent",
    "limits",
    "delivery",
    "supervisor.drain_timeout",
    "supervisor.kill_grace",
    "supervisor.idle_timeout",
)
WEBHOOK_LIVE = ("url", "secret")  # of a webhook channel that exists before and after


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {"dotted.key": value}; a table's absence is a key of its own."""
    if isinstance(value, msgspec.Struct):
        fields = {f: getattr(value, f) for f in value.__struct_fields__}
    elif isinstance(value, dict):
        fields = value
    else:
        return {prefix: value}
    out: dict[str, Any] = {prefix: "<table>"} if prefix else {}
    for name, v in fields.items():
        out.update(leaves(v, f"{prefix}.{name}" if prefix else str(name)))
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ, added and removed ones included."""
    a, b = leaves(old), leaves(new)
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def _is_live(key: str, old: Config, new: Config) -> bool:
    if any(key == live or key.startswith(live + ".") for live in LIVE):
        return True
    parts = key.split(".")
    if parts[:2] == ["channels", "webhook"] and len(parts) == 4 and parts[3] in WEBHOOK_LIVE:
        return parts[2] in old.channels.webhook and parts[2] in new.channels.webhook
    return False


def restart_keys(old: Config, new: Config, keys: list[str]) -> list[str]:
    """The changed keys a reload cannot apply, each table named once (its top key)."""
    fixed = [k for k in keys if not _is_live(k, old, new)]
    return [k for k in fixed if not any(k.startswith(other + ".") for other in fixed)]


class Reloader:
    """Re-reads the config `serve` started with; one reload at a time."""

    def __init__(
        self,
        sup: Supervisor,
        path: Path | None,
        on_applied: Callable[[Config], None] | None = None,
        notify: Callable[..., None] | None = None,
    ) -> None:
        self.sup = sup
        self.notify = notify  # sd_notify: RELOADING=1 while it runs, READY=1 after
        self.path = path  # None: the lookup `serve` made (CORRAL_CONFIG, ./corral.toml)
        self.on_applied = on_applied  # what else holds a piece of the config (the HTTP channel)
        self._lock = asyncio.Lock()

    def signalled(self) -> None:
        """SIGHUP: reload in a task of the supervisor's (its outcome is logged)."""
        self.sup.tasks.start(self.reload(), "reload")

    async def reload(self) -> ReloadResult:
        async with self._lock:
            if self.notify is not None:
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")
            try:
                result = await self._reload()
            finally:
                if self.notify is not None:
                    self.notify("READY=1", views.systemd_status(self.sup))
        if result.error:
            log.error("reload refused, the old config stays: %s", result.error)
        elif result.changed:
            log.info(
                "reloaded %s: %s; the next turns use them", result.path, ", ".join(result.changed)
            )
        else:
            log.info("reloaded %s: nothing changed", result.path)
        return result

    async def _reload(self) -> ReloadResult:
        path = self.path or find_config_path(None)
        shown = str(path) if path else "(built-in defaults)"
        if self.sup.draining:
            return ReloadResult(path=shown, error="corral is stopping")
        try:
            new = await asyncio.to_thread(load_config, str(path) if path else None)
        except ConfigError as e:
            return ReloadResult(path=shown, error=str(e))
        old = self.sup.config
        keys = changed_keys(old, new)
        if fixed := restart_keys(old, new, keys):
            return ReloadResult(
                path=shown,
                error=f"{', '.join(fixed)}: cannot change while serving (restart corral for that)",
            )
        if not keys:
            return ReloadResult(path=shown)
        try:
            await self.restart_zygote(new)
        except Exception as e:  # SpawnError, a timeout: the new agent does not load
            return ReloadResult(
                path=shown, error=f"agent.entrypoint: the new agent cannot start: {e}"
            )
        self.apply(new)
        return ReloadResult(path=shown, changed=keys)

    async def restart_zygote(self, new: Config) -> None:
        """A new zygote if what workers start with changed; the old one's workers retire."""
        sup = self.sup
        max_frame = sup.frame_cap(new.limits)
        settings = worker_settings(new, max_frame)
        if sup.delegation is not None:
            limits = cgroups.worker_limits(int(new.limits.rss_max))
            settings = cgroups.with_cgroups(settings, sup.delegation, limits)
        if settings == sup.spawner.settings:
            return
        spawner = Spawner(settings)
        spawner.zygote_pids = sup.spawner.zygote_pids  # the stray sweep spares every zygote
        await sup.swap_spawner(spawner, max_frame)

    def apply(self, new: Config) -> None:
        sup = self.sup
        sup.config = new
        sup.limits = sup.turns.limits = sup.watchdog.limits = sup.crashloops.limits = new.limits
        sup.drain_timeout = float(new.supervisor.drain_timeout)
        for name, channel in sup.outbox.channels.items():
            if isinstance(channel, WebhookDelivery) and name in new.channels.webhook:
                channel.hook = new.channels.webhook[name]
            if hasattr(channel, "cfg"):
                channel.cfg = new.delivery
        if self.on_applied is not None:
            self.on_applied(new)
        sup.retire_stale()
