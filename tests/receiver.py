"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 in its own thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

from tests.harness import free_port


class Receiver:
    """Answers each POST with the next scripted status (the last one repeats)."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.statuses = list(statuses or [200])
        self.delay = delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.requests: list[dict[str, Any]] = []  # {"body", "headers", "status", "at"}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        with self._lock:
            status = self.statuses[min(len(self.requests), len(self.statuses) - 1)]
            self.requests.append(
                {
                    "body": json.loads(raw),
                    "raw": raw,
                    "headers": dict(request.headers),
                    "status": status,
                    "at": time.monotonic(),
                }
            )
        return web.Response(status=status, text="ok" if status < 400 else "no")

    def delivered(self) -> list[dict[str, Any]]:
        """Bodies of the requests answered with a 2xx."""
        with self._lock:
            return [r["body"] for r in self.requests if 200 <= r["status"] < 300]

    def wait_requests(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.05)
        raise AssertionError(f"expected {n} requests, got {len(self.requests)}")
