"""What `corral serve` writes to stderr: log records, from a thread of their own, and
the stacks of every thread if it is killed by the watchdog."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterator

# records waiting for the writer thread; past this many, new ones are dropped
LOG_QUEUE = 10_000
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops a record when the queue is full instead of blocking."""

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


@contextlib.contextmanager
def logging_to_stderr(level: str) -> Iterator[None]:
    """Send every log record at `level` and above to stderr until the block ends.

    Records are written by a thread of their own: a slow terminal or journald must not
    hold the event loop. When the block ends, the records still queued are written.
    """
    # a watchdog kill (SIGABRT) then leaves every thread's stack in the journal
    faulthandler.enable()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(FORMAT))
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE)
    listener = logging.handlers.QueueListener(records, stderr)
    handler = DroppingQueueHandler(records)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the listener's adds the rest
    logging.basicConfig(level=level, handlers=[handler])
    listener.start()
    try:
        yield
    finally:
        listener.stop()
