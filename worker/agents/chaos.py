"""The chaos agent: runs the message as `;`-separated commands to inject faults.

    echo TEXT · sleep SECONDS · hang · spin [SECONDS] · balloon MIB · crash · segv ·
    exit · flood · progress-forever · orphan · ignore-term · garbage · stop-self

Anything else is echoed. A turn whose commands sent no reply ends with a short
"ok: ..." reply, so a fault that did not fire is visible to the user.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from corral.protocol import frames
from corral.protocol.types import Turn
from corral.worker.runtime import Context

# memory that `balloon` holds for the life of the worker
_held: list[bytearray] = []

PAGE = 4096


def _sleep_forever() -> None:
    while True:  # ends only when the process is killed
        time.sleep(3600)


def _balloon(mib: float) -> None:
    block = bytearray(int(mib * 1024 * 1024))
    block[::PAGE] = b"\x01" * len(range(0, len(block), PAGE))  # touch every page
    _held.append(block)


def _spin(seconds: float | None) -> None:
    end = None if seconds is None else time.process_time() + seconds
    x = 0
    while end is None or time.process_time() < end:  # ends after SECONDS of CPU, or never
        for _ in range(10_000):
            x += 1


def _orphan() -> None:
    child = os.fork()
    if child == 0:
        if os.fork() == 0:
            os.setsid()
            _sleep_forever()
        os._exit(0)
    os.waitpid(child, 0)


def _garbage(ctx: Context) -> None:
    # A length header, then bytes that cannot start any msgpack value (0xc1 is never used).
    body = b"\xc1" + os.urandom(255)
    ctx._conn.sock.sendall(frames.HEADER.pack(len(body)) + body)


def _flood(ctx: Context) -> None:
    n = 0
    while True:  # ends when the supervisor stops the worker (output_limit)
        n += 1
        ctx.reply(f"flood {n} " + "x" * 1000)


def _progress_forever(ctx: Context) -> None:
    while True:  # ends at turn_timeout
        ctx.progress("still working")
        time.sleep(0.5)


def agent(turn: Turn, ctx: Context) -> None:
    done: list[str] = []
    replied = False
    for command in filter(None, (c.strip() for c in turn.text.split(";"))):
        word, _, arg = command.partition(" ")
        arg = arg.strip()
        match word:
            case "echo":
                ctx.reply(arg)
                replied = True
            case "sleep":
                time.sleep(float(arg))
            case "hang":
                _sleep_forever()
            case "spin":
                _spin(float(arg) if arg else None)
            case "balloon":
                _balloon(float(arg))
            case "crash":
                os._exit(3)
            case "segv":
                ctypes.string_at(0)
            case "exit":
                os._exit(0)
            case "flood":
                _flood(ctx)
            case "progress-forever":
                _progress_forever(ctx)
            case "orphan":
                _orphan()
            case "ignore-term":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            case "garbage":
                _garbage(ctx)
            case "stop-self":
                os.kill(os.getpid(), signal.SIGSTOP)
            case _:
                ctx.reply(command)
                replied = True
                continue
        done.append(command)
    if not replied:
        ctx.reply("ok: " + "; ".join(done))
