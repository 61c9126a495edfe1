"""Framing: length-prefixed msgpack with a cap checked before the body is read."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from corral.protocol import frames
from corral.protocol.types import InvalidSessionKey, Origin, Turn, check_session_key

CAP = 1024


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_frames_round_trip_over_a_socket():
    a, b = pair()
    turn = Turn(id="m1", session="s", text="hi", origin=Origin(channel="http", chat="c"), attempt=2)
    a.sendall(frames.encode(frames.TurnFrame(turn)) + frames.encode(frames.Shutdown("idle")))
    dec = frames.decoder_for_supervisor_frames()
    assert frames.read_frame(b, dec, CAP) == frames.TurnFrame(turn)
    assert frames.read_frame(b, dec, CAP) == frames.Shutdown("idle")
    a.close()
    assert frames.read_frame(b, dec, CAP) is None  # clean end between frames


def test_oversized_frame_is_refused_before_its_body_is_read():
    a, b = pair()
    # only the header is ever sent: a reader that tried to read the body would block
    a.sendall(frames.HEADER.pack(CAP + 1))
    with pytest.raises(frames.FrameError, match="exceeds the cap"):
        frames.read_frame(b, frames.decoder_for_worker_frames(), CAP)


@pytest.mark.parametrize("data", [b"\x00\x00", frames.HEADER.pack(10) + b"abc"])
def test_truncated_frame_is_an_error(data):
    a, b = pair()
    a.sendall(data)
    a.close()
    with pytest.raises(frames.FrameError, match="ended inside"):
        frames.read_frame(b, frames.decoder_for_worker_frames(), CAP)


@pytest.mark.parametrize(
    "body",
    [b"\xc1garbage", frames.encode(frames.Shutdown("x"))[4:], b"\x93\x01\x02\x03"],
    ids=["not-msgpack", "wrong-direction", "not-a-frame"],
)
def test_invalid_frame_bodies_are_errors(body):
    a, b = pair()
    a.sendall(frames.HEADER.pack(len(body)) + body)
    with pytest.raises(frames.FrameError, match="invalid frame"):
        frames.read_frame(b, frames.decoder_for_worker_frames(), CAP)


def test_async_reader_applies_the_same_rules():
    async def main() -> None:
        a, b = socket.socketpair()
        reader, _ = await asyncio.open_unix_connection(sock=b)
        dec = frames.decoder_for_worker_frames()
        a.sendall(frames.encode(frames.Progress("t", "n")))
        assert await frames.read_frame_async(reader, dec, CAP) == frames.Progress("t", "n")
        a.sendall(frames.HEADER.pack(CAP * 10))
        with pytest.raises(frames.FrameError, match="exceeds the cap"):
            await frames.read_frame_async(reader, dec, CAP)
        a.close()

    asyncio.run(main())


def test_async_reader_reports_truncation_and_clean_eof():
    async def main() -> None:
        a, b = socket.socketpair()
        reader, _ = await asyncio.open_unix_connection(sock=b)
        dec = frames.decoder_for_worker_frames()
        threading.Thread(
            target=lambda: (a.sendall(frames.HEADER.pack(50) + b"x"), a.close())
        ).start()
        with pytest.raises(frames.FrameError, match="ended inside"):
            await frames.read_frame_async(reader, dec, CAP)

        c, d = socket.socketpair()
        reader2, _ = await asyncio.open_unix_connection(sock=d)
        c.close()
        assert await frames.read_frame_async(reader2, dec, CAP) is None

    asyncio.run(main())


@pytest.mark.parametrize("key", ["alice", "a.b:c@d-e_f", "x" * 200, "tg:12345", ".hidden"])
def test_valid_session_keys(key):
    assert check_session_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 201, "a b", "a/b", "..", ".", "ä", "a\n", 5, None])
def test_invalid_session_keys(key):
    with pytest.raises(InvalidSessionKey):
        check_session_key(key)
