"""An agent for tests/test_sessions.py: a worker that dies at chosen moments around a turn.

The message is `;`-separated commands, run in order:

    echo TEXT          reply TEXT
    whoami             reply "<worker pid> attempt <turn attempt>"
    sleep SECS         sleep
    exit               exit (code 0) now, in the middle of the turn
    exit-after-done    exit (code 0) the moment this turn's Done frame has been written
    exit-in SECS       a thread exits the worker (code 0) SECS seconds from now: after
                       this turn has ended, when the turn is quicker than that

A turn that sent no reply replies "ok".
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from corral.protocol import frames
from corral.protocol.types import Turn
from corral.worker.runtime import Context


def _exit_after_done(ctx: Context) -> None:
    conn = ctx._conn
    send = conn.send

    def send_then_exit(frame: Any) -> None:
        send(frame)
        if isinstance(frame, frames.Done):
            os._exit(0)

    conn.send = send_then_exit  # type: ignore[method-assign]


def _exit_in(seconds: float) -> None:
    def later() -> None:
        time.sleep(seconds)
        os._exit(0)

    threading.Thread(target=later, daemon=True).start()


def agent(turn: Turn, ctx: Context) -> None:
    replied = False
    for command in filter(None, (c.strip() for c in turn.text.split(";"))):
        word, _, arg = command.partition(" ")
        match word:
            case "echo":
                ctx.reply(arg.strip())
                replied = True
            case "whoami":
                ctx.reply(f"{os.getpid()} attempt {turn.attempt}")
                replied = True
            case "sleep":
                time.sleep(float(arg))
            case "exit":
                os._exit(0)
            case "exit-after-done":
                _exit_after_done(ctx)
            case "exit-in":
                _exit_in(float(arg))
            case _:
                raise ValueError(f"unknown command {command!r}")
    if not replied:
        ctx.reply("ok")
