"""What the PostgreSQL store adds to the shared row decoding (store_rows.py): its
diagnostics, where a `text` column cannot hold NUL."""

from __future__ import annotations


def _diagnostic(text: str | None) -> str | None:
    """A corral-made diagnostic for a `text` column, which cannot hold NUL."""
    return None if text is None else str(text).replace("\x00", "\ufffd")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
