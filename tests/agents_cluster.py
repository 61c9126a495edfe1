"""Agents for the cluster tests."""

from __future__ import annotations

import time

from corral.protocol.types import Turn
from corral.worker.runtime import Context


def slow_history(turn: Turn, ctx: Context) -> None:
    """Like tests.agents:history, with a turn long enough that a node can die in it."""
    time.sleep(0.4)
    seen = [e.text for e in ctx.history() if e.role == "user"]
    ctx.reply("|".join([*seen, turn.text]))
