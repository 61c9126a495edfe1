"""The session transcript: sessions/<key>.jsonl, appended by the worker under flock.

The lock is a kernel lock on the open file, so it dies with the worker; nothing is
left to clean up after a SIGKILL. A killed writer may leave a torn last line; readers
skip lines that do not decode.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import msgspec

from corral.protocol.types import HistoryEntry

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(HistoryEntry).decode


class TranscriptLocked(Exception):
    pass


class Transcript:
    def __init__(self, path: Path, lock_timeout: float = 10.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        # The previous worker of this session may still be dying (or a stray of it may
        # hold the file): wait for the lock, but not forever.
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TranscriptLocked(
                        f"transcript {path} is locked by another process"
                    ) from None
                time.sleep(0.05)
        self._fd = fd
        self._mend_torn_tail()

    def _mend_torn_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.write(self._fd, b"\n")  # the torn line stays, undecodable and skipped

    def append(self, role: str, text: str, turn_id: str) -> None:
        entry = HistoryEntry(role=role, text=text, turn_id=turn_id, ts=time.time())
        os.write(self._fd, _encode(entry) + b"\n")

    def read(self) -> list[HistoryEntry]:
        # through the descriptor, not the path: a sandboxed worker cannot open the path
        size = os.fstat(self._fd).st_size
        chunks, offset = [], 0
        while offset < size:  # ends at the size read first; later appends wait a turn
            chunk = os.pread(self._fd, min(size - offset, 1 << 20), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
        entries = []
        for line in data.splitlines():
            try:
                entries.append(_decode(line))
            except msgspec.DecodeError:
                continue
        return entries

    def close(self) -> None:
        os.close(self._fd)
