"""systemd's notify protocol: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Written by hand: it is one datagram to $NOTIFY_SOCKET, documented by systemd as a
stable interface for reimplementation; the PyPI clients are unmaintained or need
libsystemd. Outside systemd (no $NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("corral.sdnotify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # abstract namespace
        elif address.startswith("/"):
            self._address = address
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        # systemd sets WATCHDOG_PID when the watchdog is meant for one process only
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        """Send `fields` ("READY=1", "STATUS=...") as one datagram; never blocks or raises."""
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as e:
            if not self._failed:  # say it once, not every watchdog tick
                log.warning("cannot notify systemd at %s: %s", self._address, e)
                self._failed = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
