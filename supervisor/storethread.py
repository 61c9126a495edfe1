"""The engine both stores share: one thread owns one database connection and commits
the operations queued while the last commit was in flight as one transaction, each in a
savepoint of its own (a failing operation fails alone). The loop only awaits futures,
and is woken once per group, not once per operation."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

log = logging.getLogger("corral.store")
C = TypeVar("C")  # the connection
T = TypeVar("T")

GROUP_MAX = 512  # operations per transaction
Result = tuple["asyncio.Future[Any]", Any, BaseException | None]


IDLE_CHECK = 1.0  # seconds: how often an idle store thread checks its database is still there


class StoreClosed(Exception):
    pass


class StoreError(Exception):
    """The database cannot be used: the message names it (and `store.url`, without a
    password, for PostgreSQL)."""


class StoreUnavailable(StoreError):
    """The database cannot take writes now (disk full, I/O error, connection lost); it may
    come back by itself: retry later."""


class StoreBroken(StoreError):
    """The database file was deleted, replaced or corrupted while serving: nothing written
    from now on would survive, so the supervisor stops (and systemd restarts it)."""


class RepliesNotStored(StoreError):
    """A finish found replies of its turn, submitted before it, not stored (refused by a
    full disk, or failed): the finish is not stored either, so a turn's end is never
    committed without the replies it followed."""


class LeaseLost(StoreError):
    """A write of a session's turn found that this node no longer holds its lease (a
    cluster on PostgreSQL): another node runs the session now."""


# A reply a finish checks for: (index, kind, text). A reply of kind error may be stored
# at another index (after an earlier run's replies): it is looked for by its text.
ExpectedReply = tuple[int, str, str]


_STOP = object()


class StoreThread(Generic[C]):
    """Subclasses give `_connect` (connect and prepare the schema) and `_commit_group`,
    and may give `_usable` (reconnect) and `_failed` (roll back, name the error)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Future[None] | None = None
        # why writes fail now (None: they do not), and since when (wall clock); set by
        # the store thread, read by the loop (a str swap is atomic under the GIL)
        self.unwritable: str | None = None
        self.unwritable_since: float | None = None
        self.broken: str | None = None  # why the database is lost for good
        self.on_broken: list[Callable[[str], None]] = []  # called on the loop, once
        # operations submitted during one loop iteration, handed over together at its end
        self._pending: list[tuple[Callable[[C], Any], asyncio.Future[Any]]] = []
        self.groups = 0  # transactions committed (or failed); with `ops`, for benchmarks
        self.ops = 0

    def health(self) -> str:
        """One line for `corral status`: "ok", or why the store cannot write."""
        if self.broken is not None:
            return f"broken: {self.broken}"
        if self.unwritable is not None:
            since = time.strftime("%H:%M:%S UTC", time.gmtime(self.unwritable_since or 0))
            return f"cannot write since {since}: {self.unwritable}"
        return "ok"

    def _connect(self) -> C:
        raise NotImplementedError

    def _commit_group(self, conn: C, ops: list[tuple[Callable[[C], Any], Any]]) -> list[Result]:
        raise NotImplementedError

    def _usable(self, conn: C) -> C:
        """The connection to run the next group on (a subclass may reconnect here)."""
        return conn

    def _failed(self, conn: C, error: Exception) -> BaseException:
        """Clean up after a failed group; the error its operations fail with."""
        return error

    def _disconnect(self, conn: C) -> None:
        conn.close()  # type: ignore[attr-defined]

    def _lost(self) -> str | None:
        """Why the database is gone (its file deleted or replaced), checked off the loop
        about once a second; None while it is there."""
        return None

    def _wrote(self, conn: C) -> bool:
        """Whether the group just committed wrote anything (a read-only group commits even
        on a full disk, so only a write says the store can write again)."""
        return True

    def _classify(self, error: BaseException) -> BaseException:
        """The error an operation fails with: StoreUnavailable for a write the disk refused,
        StoreBroken for a corrupted database, else `error` itself."""
        return error

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="corral-store", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None
            raise

    async def close(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._closed is None:
            return
        self._flush()  # what is submitted before close is still run
        self._queue.put(_STOP)
        try:
            async with asyncio.timeout(timeout):
                await self._closed
        except TimeoutError:
            log.error("store thread did not finish within %.0fs", timeout)
        self._thread = None
        log.info("store: %d operations in %d transactions", self.ops, self.groups)

    def _submit(self, fn: Callable[[C], T]) -> asyncio.Future[T]:
        if self._thread is None or self._loop is None or not self._thread.is_alive():
            raise StoreClosed("the store is closed")
        fut: asyncio.Future[T] = self._loop.create_future()
        if self.broken is not None:
            fut.set_exception(StoreBroken(self.broken))
            return fut
        # Handed to the thread at the end of this loop iteration, with whatever else the
        # iteration submits: a turn's reply and its finish (or an accept and the turn's
        # start) then share one commit, instead of the thread waking for the first alone
        # and the rest waiting for the next commit.
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append((fn, fut))
        return fut

    def _flush(self) -> None:
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except Exception as e:
            self._loop.call_soon_threadsafe(_settle, ready, None, e)
            return
        self._loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        checked = time.monotonic()
        while not stopping:  # ends at the _STOP sentinel from close()
            try:
                batch = [self._queue.get(timeout=IDLE_CHECK)]
            except queue.Empty:
                checked = time.monotonic()
                self._check_lost()
                continue
            queued = len(batch[0]) if batch[0] is not _STOP else 0
            while queued < GROUP_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                queued += len(item) if item is not _STOP else 0
            stopping = _STOP in batch
            ops = [op for item in batch if item is not _STOP for op in item]
            if not ops:
                continue
            if time.monotonic() - checked >= IDLE_CHECK:
                checked = time.monotonic()
                self._check_lost()
            if self.broken is not None:
                refused: list[Result] = [(f, None, StoreBroken(self.broken)) for _, f in ops]
                self._loop.call_soon_threadsafe(_settle_all, refused)
                continue
            self.groups += 1
            self.ops += len(ops)
            try:
                conn = self._usable(conn)
                results = self._commit_group(conn, ops)
            except Exception as e:
                # A failed group (disk full, database gone) fails its operations, not
                # the store: the thread goes on, and callers see the error.
                error: BaseException = self._classify(self._failed(conn, e))
                if not isinstance(error, StoreUnavailable | StoreBroken):  # those: logged once
                    log.error("store: a group of %d operations failed: %s", len(ops), e)
                self._note(error)
                results = [(fut, None, error) for _, fut in ops]
            else:
                results = [(f, v, e and self._note(self._classify(e))) for f, v, e in results]
                full = any(isinstance(e, StoreUnavailable) for _, _, e in results)
                if self.unwritable is not None and not full and self._wrote(conn):
                    log.warning("store: writes succeed again (after: %s)", self.unwritable)
                    self.unwritable = self.unwritable_since = None
            self._loop.call_soon_threadsafe(_settle_all, results)
        self._disconnect(conn)
        if self._closed is not None:
            self._loop.call_soon_threadsafe(_settle, self._closed, None, None)

    def _note(self, error: BaseException) -> BaseException:
        """Remember what a failed operation says about the store (on its thread)."""
        if isinstance(error, StoreBroken):
            self._break(str(error))
        elif isinstance(error, StoreUnavailable):
            if self.unwritable is None:
                self.unwritable_since = time.time()
                log.error("store: cannot write: %s", error)
            self.unwritable = str(error)
        return error

    def _check_lost(self) -> None:
        if self.broken is None and (why := self._lost()) is not None:
            self._break(why)

    def _break(self, why: str) -> None:
        if self.broken is not None:
            return
        self.broken = why
        log.critical("store: %s: accepting nothing more; corral exits to be restarted", why)
        assert self._loop is not None
        for callback in self.on_broken:
            self._loop.call_soon_threadsafe(callback, why)


def _settle_all(results: list[Result]) -> None:
    for fut, value, error in results:
        _settle(fut, value, error)


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
