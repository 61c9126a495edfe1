"""Agents used by the tests (importable by the zygote: tests run with the repo on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os


def pid_echo(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies "<worker pid> <text>"."""
    ctx.reply(f"{os.getpid()} {turn.text}")


def raiser(turn, ctx):  # type: ignore[no-untyped-def]
    """Raises on "boom", echoes anything else."""
    if turn.text == "boom":
        raise ValueError("boom requested")
    ctx.reply(turn.text)


async def async_echo(turn, ctx):  # type: ignore[no-untyped-def]
    """An async agent: two replies with an await between them."""
    ctx.reply(f"first {turn.text}")
    await asyncio.sleep(0.01)
    ctx.progress("halfway")
    ctx.reply(f"second {turn.text}")


def history(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies with the user texts seen so far in this session, then logs a line."""
    seen = [e.text for e in ctx.history() if e.role == "user"]
    ctx.log.info("history has %d user lines", len(seen))
    ctx.reply("|".join([*seen, turn.text]))


def chatty_thread(turn, ctx):  # type: ignore[no-untyped-def]
    """Replies, and leaves a thread behind that, once the turn is over, logs 1 KiB
    lines forever."""
    import threading
    import time

    def chatter() -> None:
        time.sleep(0.5)
        while True:  # ends with the worker
            ctx.log.info("x" * 1024)

    threading.Thread(target=chatter, daemon=True).start()
    ctx.reply("started")


def log_text(turn, ctx):  # type: ignore[no-untyped-def]
    """Logs the message's text as it is (newlines and all), then echoes it."""
    ctx.log.warning("the user said: %s", turn.text)
    ctx.reply("logged")
