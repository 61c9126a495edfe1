"""An agent that reports progress notes over a few seconds, then replies."""

from __future__ import annotations

import time


def agent(turn, ctx):  # type: ignore[no-untyped-def]
    for step in range(1, 5):
        ctx.progress(f"step {step} of 4")
        time.sleep(1.0)
    ctx.reply(f"done: {turn.text}")
