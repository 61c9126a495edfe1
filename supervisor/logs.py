"""What `corral serve` writes to stderr: log records, from a thread of their own, and
the stacks of every thread if it is killed by the watchdog.

A record is one line. Its message often quotes what others chose (a client's id, a
session key, an agent's log record), so newlines and other control characters in it are
escaped: no one can forge a line such as "ERROR corral.control: operator root ran corral
drain". A traceback keeps its lines, each marked with "| " so none can pass for a record.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Iterator

# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: each could
# end a line on some terminal or log viewer
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    0x85: "\\x85",
}


def clean(text: str) -> str:
    """`text` with control characters escaped (a newline becomes backslash-n)."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """The message escaped to one line; a traceback after it, each line marked."""

    def format(self, record: logging.LogRecord) -> str:
        text = clean(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        extra = [
            record.exc_text or "",
            self.formatStack(record.stack_info) if record.stack_info else "",
        ]
        for block in extra:
            if block:
                text += "".join(f"\n  | {clean(line)}" for line in block.splitlines())
        return text


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
    handler.setFormatter(OneLineFormatter())  # the listener's adds the rest
    logging.basicConfig(level=level, handlers=[handler])
    listener.start()
    try:
        yield
    finally:
        listener.stop()


BURST_QUIET = 60.0  # seconds without a repeat that end a burst of the same complaint


class Burst:
    """Log a recurring complaint once per burst: the first time, then a count when it
    comes back after BURST_QUIET seconds, so a flood of failures is a few lines."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self.last = -BURST_QUIET
        self.hidden = 0

    def report(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < BURST_QUIET:
            self.hidden += 1
            self.last = now
            return
        more = f" (and {self.hidden} more like it before)" if self.hidden else ""
        self.logger.log(self.level, message + more, *args)
        self.hidden = 0
        self.last = now
