"""Replies with the message text."""

from __future__ import annotations

from corral.protocol.types import Turn
from corral.worker.runtime import Context


def agent(turn: Turn, ctx: Context) -> None:
    ctx.reply(turn.text)
