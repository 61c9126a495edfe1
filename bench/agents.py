"""A bench agent that crosses one bound and writes down when it did.

The zygote imports it (the bench puts the repository on PYTHONPATH), so the
reaction benchmark can time "bound crossed -> user's error reply" against the
wall clock the crossing happened on. Commands (one per message):

    deadline     progress every 0.1 s forever: crosses turn_timeout at start + turn_timeout
    hang         sleep forever, no progress: crosses no_progress_timeout at start + timeout
    balloon MIB  touch memory until this process's RSS is over MIB: crossed at that moment
    spin S       busy-loop until this turn used S seconds of CPU: crossed at that moment
    anything else is echoed

Each fault writes {"start": t, "crossed": t or null} (time.time()) to
<ctx.state_dir>/<turn id>.json; the bench reads it after the error reply. A
worker killed between crossing and writing (a window of microseconds) leaves
the file empty: the bench counts that repetition as lost.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from typing import Any

PAGE = mmap.PAGESIZE
CHUNK = 1024 * 1024
_held: list[mmap.mmap] = []


def _recorder(ctx: Any, turn: Any) -> int:
    """A file opened up front: recording is then one write(2), so a kill that follows the
    crossing by microseconds still finds the record written."""
    return os.open(ctx.state_dir / f"{turn.id}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def _record(fd: int, start: float, crossed: float | None) -> None:
    os.write(fd, json.dumps({"start": start, "crossed": crossed}).encode())


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def _sleep_forever() -> None:
    while True:  # ends when the supervisor kills the worker
        time.sleep(3600)


def _balloon(limit: int) -> float:
    """Touch memory 1 MiB at a time until RSS > limit; the wall time it went over."""
    # anonymous mmap is backed lazily (bytearray(n) would zero, and so touch, all of it at once)
    block = mmap.mmap(-1, limit + 64 * CHUNK)
    ones = b"\x01" * (CHUNK // PAGE)
    for offset in range(0, len(block), CHUNK):  # ends at most at the end of the block
        block[offset : offset + CHUNK : PAGE] = ones
        if _rss() > limit:
            crossed = time.time()
            _held.append(block)
            return crossed
    _held.append(block)
    return time.time()


def _spin_until(cpu_seconds: float) -> float:
    """Spin until this turn used `cpu_seconds` of CPU; the wall time it did."""
    end = time.process_time() + cpu_seconds
    x = 0
    while time.process_time() < end:  # ends after cpu_seconds of CPU
        for _ in range(1000):
            x += 1
    return time.time()


def timed(turn: Any, ctx: Any) -> None:
    start = time.time()
    word, _, arg = turn.text.strip().partition(" ")
    if word not in ("deadline", "hang", "balloon", "spin"):
        ctx.reply(turn.text)
        return
    fd = _recorder(ctx, turn)
    match word:
        case "deadline":
            _record(fd, start, None)
            while True:  # ends at turn_timeout
                ctx.progress("busy")
                time.sleep(0.1)
        case "hang":
            _record(fd, start, None)
            _sleep_forever()
        case "balloon":
            _record(fd, start, _balloon(int(float(arg) * 1024 * 1024)))
            _sleep_forever()
        case "spin":
            _record(fd, start, _spin_until(float(arg)))
            while True:  # ends when the supervisor stops the worker (cpu_limit)
                _spin_until(1.0)


def pid_of(turn: Any, ctx: Any) -> None:
    """Replies with the worker's PID (handy when poking at a bench server by hand)."""
    ctx.reply(str(os.getpid()))


def frame_flood(turn: Any, ctx: Any) -> None:
    """Floods the supervisor with small frames, then replies:

    logs N        N empty log frames as fast as the socket takes them
    progress N    N progress frames
    logs-forever  log frames until the supervisor stops the worker
    anything else is echoed
    """
    from corral.protocol import frames

    word, _, arg = turn.text.strip().partition(" ")
    empty = frames.Log(level=20, logger="", message="")
    match word:
        case "logs":
            for _ in range(int(arg)):
                ctx._conn.send(empty)
        case "progress":
            for _ in range(int(arg)):
                ctx.progress()
        case "logs-forever":
            while True:  # ends when the supervisor stops the worker (output_limit)
                ctx._conn.send(empty)
    ctx.reply(turn.text)
