"""The supervisor's own services are supervised, and the small policies it is built from.

Unit tests of the pure parts (the restart window, crash loops, worker slots), and
in-process tests that inject a fault into a real supervisor's watchdog: the watchdog is
restarted and memory bounds are still enforced afterwards, systemd is not fed while it
is down, and a service that keeps failing makes the supervisor give up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.supervisor import watchdog
from corral.supervisor.config import LimitsConfig
from corral.supervisor.crashloop import CrashLoops
from corral.supervisor.metrics import Metrics
from corral.supervisor.services import Services, window
from corral.supervisor.sessions import SessionTable
from corral.supervisor.store import SessionRecord
from tests.harness import REPO

# ---- pure parts


def test_the_restart_window_keeps_only_events_within_the_period() -> None:
    assert window([], 100.0, 10.0) == [100.0]
    assert window([85.0, 91.0, 95.0], 100.0, 10.0) == [91.0, 95.0, 100.0]
    assert window([90.0], 100.0, 10.0) == [90.0, 100.0]  # the edge is inside


class FakeStore:
    def __init__(self) -> None:
        self.quarantines: dict[str, float | None] = {}
        self.abnormal: list[tuple[str, str]] = []

    async def session_records(self) -> dict[str, SessionRecord]:
        return {}

    async def record_abnormal_exit(self, key: str, reason: str) -> None:
        self.abnormal.append((key, reason))

    async def set_quarantine(self, key: str, until: float | None) -> None:
        self.quarantines[key] = until


def test_a_crash_loop_past_the_intensity_is_quarantined_and_released() -> None:
    async def scenario() -> None:
        store = FakeStore()
        released: list[str] = []
        limits = LimitsConfig(restart_intensity=2, restart_period=60, quarantine=600)  # type: ignore[arg-type]
        loops = CrashLoops(store, limits, on_release=released.append)  # type: ignore[arg-type]
        assert await loops.record("s", "idle") is None  # not abnormal: no count
        assert loops.recent("s") == 0 and loops.backoff("s") == 0.0
        assert await loops.record("s", "crashed") is None
        assert await loops.record("s", "rss_limit") is None
        assert loops.backoff("s") == pytest.approx(0.2)  # doubles per recent exit
        until = await loops.record("s", "crashed")  # the third within the period
        assert until is not None and loops.quarantined("s") == until
        assert store.quarantines["s"] == until
        assert loops.records["s"].restarts == 3 and loops.records["s"].last_exit == "crashed"
        assert await loops.release("s") and loops.quarantined("s") is None
        assert store.quarantines["s"] is None
        assert not await loops.release("s")  # not quarantined any more
        loops.close()

    asyncio.run(scenario())


def test_worker_slots_are_handed_to_the_sessions_in_line() -> None:
    table = SessionTable(max_workers=1)
    a, b, c = (table.get_or_create(k) for k in "abc")
    assert table.take_slot(a)
    assert not table.take_slot(b) and not table.take_slot(c) and table.waiting
    assert table.next_waiting() is None  # no slot free yet
    table.free_slot(a)
    assert table.next_waiting() is b
    assert table.take_slot(b)
    table.forget(c)  # gone while in line: skipped
    table.free_slot(b)
    assert table.next_waiting() is None and not table.waiting
    assert table.slots_used == 0


# ---- services


def test_a_failing_service_is_restarted_and_past_the_intensity_the_supervisor_gives_up() -> None:
    async def scenario() -> None:
        fatal: list[str] = []
        services = Services(on_fatal=fatal.append, intensity=3, period=60, backoff=0.01)
        runs = 0
        health_while_down: list[bool] = []

        async def flaky() -> None:
            nonlocal runs
            runs += 1
            if runs > 1:
                health_while_down.append(services.healthy())
            if runs <= 2:
                raise RuntimeError("injected")
            await asyncio.sleep(3600)

        services.start("flaky", flaky)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if runs == 3:
                break
        assert runs == 3 and services.restarts["flaky"] == 2
        assert services.healthy() and health_while_down == [True, True]
        assert not fatal

        async def broken() -> None:
            raise RuntimeError("always")

        services.start("broken", broken)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if fatal:
                break
        assert fatal and "service broken failed 4 times" in fatal[0]
        assert not services.healthy()  # a dead service: systemd is no longer fed
        await services.close()

    asyncio.run(scenario())


def test_the_loop_tick_feeds_systemd_only_while_every_service_is_up() -> None:
    async def scenario() -> tuple[int, int]:
        up = False
        lag = watchdog.LoopLag(Metrics(), healthy=lambda: up)
        fed: list[float] = []
        lag.on_tick.append(lambda: fed.append(lag.lag))
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.5)
        while_down = len(fed)
        up = True
        await asyncio.sleep(0.5)
        task.cancel()
        return while_down, len(fed)

    while_down, total = asyncio.run(scenario())
    assert while_down == 0 and total >= 2


# ---- a real supervisor, in a process of its own, with a fault injected into its watchdog


def run_scenario(name: str, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.inprocess", name, str(tmp / "state")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_a_watchdog_that_raises_is_restarted_and_memory_is_still_bounded(tmp_path: Path) -> None:
    result = run_scenario("watchdog_recovers", tmp_path)
    assert result["failures"] == 2 and result["restarts"] == 2
    assert result["ended"] and len(result["texts"]) == 1
    text = result["texts"][0]
    assert "memory limit exceeded" in text and text.endswith("[rss_limit]")


def test_a_watchdog_that_keeps_failing_stops_the_supervisor(tmp_path: Path) -> None:
    result = run_scenario("never_recovers", tmp_path)
    assert result["fatal"] is not None and "service watchdog failed" in result["fatal"]
    assert not result["healthy"]
