"""Checking a corral webhook delivery: the snippet the README shows, runnable as is.

corral signs "TIMESTAMP.BODY" with the channel's secret (HMAC-SHA256) and sends the
timestamp in X-Corral-Timestamp; a receiver recomputes the signature over the raw
body and refuses requests older than a few minutes, so a captured delivery cannot be
replayed later. A reply id that comes twice (a retry) is the same reply: drop it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

MAX_AGE = 300  # seconds; allow for clock skew and corral's retries


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> bool:
    """True if the request is corral's, signed with `secret`, and recent."""
    timestamp = headers.get("X-Corral-Timestamp", "")
    signature = headers.get("X-Corral-Signature", "")
    if not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > MAX_AGE:
        return False
    signed = timestamp.encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)
