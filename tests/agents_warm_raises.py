"""An agent whose warm-up raises: its workers must work all the same."""

from __future__ import annotations

from typing import Any


def warm_up(options: dict[str, Any]) -> None:
    raise RuntimeError("warm-up exploded on purpose")


def agent(turn, ctx):  # type: ignore[no-untyped-def]
    ctx.reply(f"cold {turn.text}")
