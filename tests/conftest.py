from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import STARTED, Corral
from tests.pg import pg_empty_url, pg_server, pg_template, pg_url  # noqa: F401 (fixtures)

# The suite runs the supervisor on asyncio's loop, the one a plain install gets, also
# where uvloop is installed (the test extra has it); test_event_loops runs it on both.
os.environ.setdefault("CORRAL_EVENT_LOOP", "asyncio")


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[Callable[..., Corral]]:
    """Start `corral serve` with extra TOML; stopped, and checked for leftovers, at teardown."""
    started: list[Corral] = []

    def start(
        config: dict[str, dict[str, Any]] | None = None,
        agent: str = "corral.worker.agents.echo:agent",
    ) -> Corral:
        c = Corral(tmp_path / f"run{len(started)}", config, agent)
        started.append(c)
        return c.start()

    yield start
    for c in started:
        if c.proc is not None and c.proc.poll() is None:
            code = c.stop()
            assert code == 0, f"corral serve exited {code}:\n{c.log()[-4000:]}"
        left = c.leftovers()
        assert not left, f"processes left behind: {left}"


@pytest.fixture(autouse=True)
def stop_what_the_test_started() -> Iterator[None]:
    """A test that fails half-way leaves no supervisor running (its own checks already
    stop and inspect what it started when it passes)."""
    yield
    while STARTED:
        c = STARTED.pop()
        if c.proc is not None and c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)
