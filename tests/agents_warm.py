"""An agent with a warm-up (importable by the zygote): replies with where it was warmed."""

from __future__ import annotations

import os
from typing import Any

warmed: dict[str, Any] = {}


def warm_up(options: dict[str, Any]) -> None:
    warmed["pid"] = os.getpid()
    warmed["greeting"] = options.get("greeting", "")
    warmed["calls"] = warmed.get("calls", 0) + 1


def agent(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies "warmed in PID (CALLS calls) GREETING; worker PID"."""
    ctx.reply(
        f"warmed in {warmed.get('pid')} ({warmed.get('calls', 0)} calls) "
        f"{warmed.get('greeting')}; worker {os.getpid()}"
    )
