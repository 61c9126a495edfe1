"""A worker's frames, parsed from one buffer the socket fills.

asyncio's StreamReader costs two awaits per frame and never yields while its buffer holds
data, so a worker that writes 60,000 small frames at once had them all handled in one go
while every other session waited. Here the transport appends to a buffer, `next_frame`
parses without awaiting while whole frames are buffered, and `serve` yields the loop after
a budget of frames or time (see worker.py). The length is checked against the cap before
the body is waited for, as in protocol/frames.py; reading pauses while the buffer holds
more than it needs, so a flood costs the flooder's own latency, not our memory.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Any, cast

import msgspec

from corral.protocol import frames

HIGH_WATER = 256 * 1024  # bytes buffered beyond the frame at the head before reading pauses


class FrameStream(asyncio.Protocol):
    """The supervisor's end of one worker's frame socket: frames in, bytes out."""

    def __init__(self, decoder: msgspec.msgpack.Decoder[Any], max_frame: int) -> None:
        self.decoder = decoder
        self.max_frame = max_frame
        self.buf = bytearray()
        self.pos = 0  # start of the first unparsed frame in buf
        self.need = frames.HEADER.size  # bytes the frame at the head needs, once its header is in
        self.eof = False
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    async def connect(
        cls, sock: socket.socket, decoder: msgspec.msgpack.Decoder[Any], max_frame: int
    ) -> FrameStream:
        stream = cls(decoder, max_frame)
        stream.sock = sock
        await asyncio.get_running_loop().create_unix_connection(lambda: stream, sock=sock)
        return stream

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's Unix transport has every method of
        # asyncio.Transport without being registered as one (with uvloop installed the
        # check failed every worker's first frame)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.unparsed() > max(HIGH_WATER, self.need) and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # half-closed, as StreamReader leaves it: Worker.close closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    # ---- reading

    def unparsed(self) -> int:
        return len(self.buf) - self.pos

    def pending(self) -> bool:
        """Whether the worker wrote something not handled yet: buffered here, or still in
        the kernel's socket buffer (a loop that was stalled has not read it yet)."""
        if self.unparsed() > 0:
            return True
        if self.sock is None or self.eof:
            return False
        try:
            n = bytearray(4)
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, n)
        except OSError:
            return False
        return struct.unpack("i", n)[0] > 0

    async def next_frame(self) -> frames.WorkerFrame | None:
        """The next frame; None at a clean end of stream. Awaits only when no whole frame
        is buffered. Raises FrameError for an oversized, truncated or invalid frame."""
        while True:  # ends with a frame, at EOF, or with a FrameError
            frame = self._parse()
            if frame is not None:
                return frame
            if self.eof:
                if self.unparsed():
                    raise frames.FrameError("stream ended inside a frame")
                return None
            self._compact()
            if self.paused and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _parse(self) -> Any:
        head = self.pos + frames.HEADER.size
        if len(self.buf) < head:
            self.need = frames.HEADER.size
            return None
        (length,) = frames.HEADER.unpack_from(self.buf, self.pos)
        if length > self.max_frame:
            raise frames.FrameError(
                f"frame of {length} bytes exceeds the cap of {self.max_frame} bytes"
            )
        end = head + length
        if len(self.buf) < end:
            self.need = frames.HEADER.size + length
            return None
        body = bytes(self.buf[head:end])
        self.pos = end
        if self.pos > HIGH_WATER:
            self._compact()
        try:
            return self.decoder.decode(body)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            raise frames.FrameError(f"invalid frame: {e}") from None

    def _compact(self) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
