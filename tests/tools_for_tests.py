"""Tools for the openai agent's tests (importable by workers: the repo is on PYTHONPATH)."""

from __future__ import annotations

import os
from typing import Literal, Optional


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def fail(reason: str = "no reason") -> str:
    """Always raises, to show that a failing tool does not end the turn."""
    raise ValueError(f"tool failed on purpose: {reason}")


def worker_pid() -> int:
    """The id of the process this tool runs in."""
    return os.getpid()


def describe(
    name: str,
    tags: list[str],
    weight: float | None = None,
    loud: bool = False,
    mode: Literal["short", "long"] = "short",
    *,
    note: Optional[str],  # noqa: UP045 - the old spelling must work too
) -> dict[str, object]:
    """Describe a thing in words.

    Longer explanation that is not part of the description.

    Args:
        name: what the thing is called
        tags (list[str]): labels for it,
            spread over two lines
        weight: in kilograms
        loud: shout the description

    Returns:
        a description
    """
    return {"name": name, "tags": tags, "weight": weight, "loud": loud, "note": note, "mode": mode}
