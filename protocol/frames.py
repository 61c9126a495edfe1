"""Frames between supervisor and worker.

A frame is a 4-byte big-endian length followed by a msgpack body. The length is
checked against a cap before a single byte of the body is read or allocated, so a
worker cannot make the supervisor allocate what it claims.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Final

import msgspec

from corral.protocol.types import Turn

PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct(">I")
# Frames that carry no user text are small; this is the cap for the supervisor->worker
# direction beyond the turn text itself.
FRAME_OVERHEAD: Final = 64 * 1024


class FrameError(Exception):
    """A frame that is oversized, truncated or not valid: the peer is broken."""


# worker -> supervisor
class Hello(msgspec.Struct, tag="hello", frozen=True):
    version: int
    pid: int
    session: str


class ReplyFrame(msgspec.Struct, tag="reply", frozen=True):
    # replies are numbered by the supervisor in arrival order, so a turn run again
    # produces the same (message id, index) keys whatever the worker claims
    turn_id: str
    text: str
    markup: str = ""  # "", "html" or "markdown" (types.MARKUPS)


class Progress(msgspec.Struct, tag="progress", frozen=True):
    turn_id: str
    note: str = ""


class Log(msgspec.Struct, tag="log", frozen=True):
    level: int
    logger: str
    message: str


class Done(msgspec.Struct, tag="done", frozen=True):
    turn_id: str
    # set when the agent failed: what the user's error reply says after "turn failed: "
    error: str | None = None
    # The worker's own view, as a hint: its peak RSS (bytes; itself and its reaped
    # children) and the CPU seconds the turn took. Near a bound, the supervisor
    # measures the tree itself before it ends the turn; the watchdog's sampling
    # stays the authority, so a worker gains nothing by understating these.
    peak_rss: int = 0
    turn_cpu: float = 0.0


# supervisor -> worker
class TurnFrame(msgspec.Struct, tag="turn", frozen=True):
    turn: Turn


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    reason: str


class Fence(msgspec.Struct, tag="fence", frozen=True):
    """In a cluster: the worker may run until `until` (CLOCK_MONOTONIC seconds, which is
    one clock for every process on the machine), a point before the node's lease of the
    session can expire for other nodes. Each renewal sends a later one; a worker not told
    again in time kills everything below it and exits with FENCE_EXIT, so a node whose
    supervisor is stopped (SIGSTOP, a stalled loop) leaves no worker running a session
    another node has taken over. A worker never sent one has no such deadline."""

    until: float


# the exit code of a worker that ended itself at its fence: its node's lease had lapsed
FENCE_EXIT: Final = 86

WorkerFrame = Hello | ReplyFrame | Progress | Log | Done
SupervisorFrame = TurnFrame | Shutdown | Fence

_encoder = msgspec.msgpack.Encoder()


def encode(frame: msgspec.Struct) -> bytes:
    """Encode a frame with its length prefix."""
    body = _encoder.encode(frame)
    return HEADER.pack(len(body)) + body


def decoder_for_worker_frames() -> msgspec.msgpack.Decoder[WorkerFrame]:
    return msgspec.msgpack.Decoder(WorkerFrame)


def decoder_for_supervisor_frames() -> msgspec.msgpack.Decoder[SupervisorFrame]:
    return msgspec.msgpack.Decoder(SupervisorFrame)


def _check_length(length: int, max_size: int) -> None:
    if length > max_size:
        raise FrameError(f"frame of {length} bytes exceeds the cap of {max_size} bytes")


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise FrameError(f"invalid frame: {e}") from None


async def read_frame_async(
    reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder, max_size: int
):  # type: ignore[no-untyped-def]
    """Read one frame; None at a clean end of stream (EOF between frames)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise FrameError("stream ended inside a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    _check_length(length, max_size)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError(f"stream ended inside a frame of {length} bytes") from None
    return _decode(decoder, body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None if got == 0 else bytes(buf[:got])
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket, decoder: msgspec.msgpack.Decoder, max_size: int):  # type: ignore[no-untyped-def]
    """Blocking read of one frame from a socket; None at a clean end of stream."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    if len(header) < HEADER.size:
        raise FrameError("stream ended inside a frame header")
    (length,) = HEADER.unpack(header)
    _check_length(length, max_size)
    body = _recv_exactly(sock, length) if length else b""
    if body is None or len(body) < length:
        raise FrameError(f"stream ended inside a frame of {length} bytes")
    return _decode(decoder, body)
