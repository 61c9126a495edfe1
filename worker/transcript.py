"""The session transcript: sessions/<key>.jsonl, appended by the worker under flock.

The lock is a kernel lock on the open file, so it dies with the worker; nothing is
left to clean up after a SIGKILL. A killed writer may leave a torn last line; readers
skip lines that do not decode.

The transcript is bounded: past twice MAX_ENTRIES lines (or twice MAX_BYTES) it is
rewritten with its newest MAX_ENTRIES lines (at most MAX_BYTES), into a new file that is
locked before it is renamed over the old one, so a later opener never writes to the
file being replaced; a sandboxed worker, which holds only the descriptor, rewrites it in
place. A full disk loses transcript lines, never the turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

import msgspec

from corral.protocol.types import HistoryEntry

MAX_ENTRIES = 1000  # lines a compacted transcript keeps (the newest)
MAX_BYTES = 4 * 1024 * 1024  # and at most this many bytes of them
PRIVATE = 0o600  # every message of the session is in it

log = logging.getLogger("corral.transcript")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(HistoryEntry).decode


class TranscriptLocked(Exception):
    pass


class Transcript:
    def __init__(
        self,
        path: Path,
        lock_timeout: float = 10.0,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # The previous worker of this session may still be dying (or a stray of it may
        # hold the file): wait for the lock, but not forever.
        deadline = time.monotonic() + lock_timeout
        while True:  # ends with the lock on the file at `path`, or TranscriptLocked
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, PRIVATE)
            try:
                while True:  # ends when the lock is taken or the deadline passes
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TranscriptLocked(
                                f"transcript {path} is locked by another process"
                            ) from None
                        time.sleep(0.05)
                if _same_file(fd, path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # compacted (renamed over) while we waited: lock the new file
        os.fchmod(fd, PRIVATE)  # an older corral created it wider
        self._fd = fd
        self._torn = False  # the last append was cut short (disk full)
        self._lines = self._bytes = 0
        data = self._mend_torn_tail()
        self._lines = data.count(b"\n")
        self._bytes = len(data)
        self._compact_if_due()

    def _mend_torn_tail(self) -> bytes:
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        if data and not data.endswith(b"\n"):
            self._torn = True  # the torn line stays, undecodable and skipped
        return data

    def append(self, role: str, text: str, turn_id: str) -> None:
        entry = HistoryEntry(role=role, text=text, turn_id=turn_id, ts=time.time())
        self._write(_encode(entry) + b"\n")
        self._compact_if_due()

    def _write(self, data: bytes) -> None:
        if self._torn:
            data = b"\n" + data  # end the torn line, so this one decodes
        try:
            n = os.write(self._fd, data)
        except OSError as e:
            log.warning("transcript %s: a line was not written: %s", self.path, e)
            return
        self._torn = n < len(data)
        self._lines += data.count(b"\n", 0, n)
        self._bytes += n

    def _compact_if_due(self) -> None:
        if self._lines > 2 * self.max_entries or self._bytes > 2 * self.max_bytes:
            self._compact()

    def _compact(self) -> None:
        """Keep the newest lines: write them to a new file, lock it, rename it over. A
        sandboxed worker cannot reach the path (only its open descriptor): it rewrites the
        file in place instead. A compaction that fails leaves the file as it was (or, in
        place, cut short); it never fails the turn."""
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        keep: list[bytes] = []
        size = 0
        for line in reversed(data.splitlines(keepends=True)):
            if len(keep) >= self.max_entries or size + len(line) > self.max_bytes:
                break
            keep.append(line)
            size += len(line)
        keep.reverse()
        body = b"".join(keep)
        try:
            try:
                self._replace(body)
            except PermissionError:  # sandboxed: the descriptor is all it has
                self._rewrite_in_place(body)
        except OSError as e:
            log.warning("transcript %s: not compacted: %s", self.path, e)
            self._lines = min(self._lines, self.max_entries)  # try again later, not per line
            self._bytes = min(self._bytes, self.max_bytes)
            return
        self._lines, self._bytes, self._torn = len(keep), size, False

    def _replace(self, body: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".compacting")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no one else knows this file yet
            if os.write(fd, body) != len(body):
                raise OSError("short write")
            os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(self._fd)
        self._fd = fd

    def _rewrite_in_place(self, body: bytes) -> None:
        """Truncate the locked file and write `body` (its newest lines) back: not atomic
        (a crash in between loses the older history, never a message: the store has
        those), so it runs only where the rename cannot."""
        os.ftruncate(self._fd, 0)
        if os.write(self._fd, body) != len(body):  # O_APPEND: at the new end, offset 0
            raise OSError("short write")
        os.fsync(self._fd)

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


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
