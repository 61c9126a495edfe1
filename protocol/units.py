"""Durations and sizes as the config writes them: shared by the supervisor and agents.

Durations are seconds or strings like "250ms", "30s", "5m", "1h"; sizes are bytes or
strings like "512MiB", "2GiB".
"""

from __future__ import annotations

import math
import re

DURATION_MAX = 1e9


class Duration(float):
    """Seconds."""


class Size(int):
    """Bytes."""


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|TiB|k|K|M|G)?\s*")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "k": 1024,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise TypeError('expected a duration such as 30 or "30s", got a boolean')
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2]]
    else:
        raise ValueError(f'invalid duration {value!r}: use seconds or "250ms", "30s", "5m", "1h"')
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be a finite number of seconds, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    if seconds > DURATION_MAX:  # past this, timers and thread waits overflow
        raise ValueError(f"duration must be at most {DURATION_MAX:g}s (about 31 years)")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    if isinstance(value, bool):
        raise TypeError('expected a size such as 1048576 or "1MiB", got a boolean')
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
        scaled = float(m[1]) * _SIZE_UNITS[m[2]]
        if not math.isfinite(scaled):
            raise ValueError(f"size {value!r} is too large")
        n = int(scaled)
    else:
        raise ValueError(f'invalid size {value!r}: use bytes or "512KiB", "200MiB", "2GiB"')
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return Size(n)
