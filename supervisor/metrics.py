"""Prometheus metrics: process-wide counters and histograms, plus per-session series
read from the live session table at scrape time (they vanish with the worker)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.protocol.types import EXIT_REASONS, SessionState

# `_created` series double the output for no use to an operator
disable_created_metrics()


class SessionRow(NamedTuple):
    session: str
    state: str
    rss: int
    cpu: float
    queue: int
    has_worker: bool
    tasks: int = 0


class SessionCollector(Collector):
    """Per-session series from a snapshot the loop takes just before the scrape."""

    def __init__(self) -> None:
        self.rows: list[SessionRow] = []

    def collect(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily(
            "corral_session_rss_bytes",
            "Memory of the session worker's process tree (RSS alone, PSS summed for a tree)",
            labels=["session"],
        )
        cpu = CounterMetricFamily(
            "corral_session_cpu_seconds",
            "CPU time of the session worker's process tree",
            labels=["session"],
        )
        queue = GaugeMetricFamily(
            "corral_session_queue_depth", "Messages waiting for the session", labels=["session"]
        )
        state = GaugeMetricFamily(
            "corral_session_state", "1 for the session's current state", labels=["session", "state"]
        )
        tasks = GaugeMetricFamily(
            "corral_session_tasks",
            "Processes and threads in the session worker's tree (bounded by max_tasks)",
            labels=["session"],
        )
        workers = GaugeMetricFamily("corral_workers", "Sessions by state", labels=["state"])
        counts: dict[str, int] = {str(state): 0 for state in SessionState}
        for row in self.rows:
            if row.has_worker:
                rss.add_metric([row.session], row.rss)
                cpu.add_metric([row.session], row.cpu)
                tasks.add_metric([row.session], row.tasks)
            queue.add_metric([row.session], row.queue)
            # the current state only: the other four would be 0, and at 1,000 sessions
            # they are 4,000 series that make every scrape slower for nothing
            state.add_metric([row.session, row.state], 1.0)
            counts[row.state] = counts.get(row.state, 0) + 1
        for s, n in counts.items():
            workers.add_metric([s], n)
        yield from (rss, cpu, tasks, queue, state, workers)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = SessionCollector()
        r.register(self.sessions)
        self.worker_exits = Counter(
            "corral_worker_exits", "Worker exits by reason", ["reason"], registry=r
        )
        for reason in EXIT_REASONS:
            self.worker_exits.labels(reason)
        self.spawn_seconds = Histogram(
            "corral_worker_spawn_seconds",
            "Time from spawn request to worker hello",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.turn_seconds = Histogram(
            "corral_turn_duration_seconds",
            "Turn duration",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600),
            registry=r,
        )
        self.loop_lag = Histogram(
            "corral_loop_lag_seconds",
            "How late the supervisor's event loop ran a 100 ms timer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=r,
        )
        self.accepted = Counter(
            "corral_messages_accepted",
            "Messages accepted (durably stored)",
            ["channel"],
            registry=r,
        )
        self.delivered = Counter(
            "corral_replies_delivered",
            "Replies delivered to their channel",
            ["channel"],
            registry=r,
        )
        self.delivery_failures = Counter(
            "corral_delivery_failures", "Failed delivery attempts", ["channel"], registry=r
        )
        self.dead_letters = Counter(
            "corral_dead_letters", "Replies given up on", ["channel"], registry=r
        )
        self.frames_dropped = Counter(
            "corral_frames_dropped",
            "Log and progress frames dropped past [limits] frame_rate",
            ["kind"],
            registry=r,
        )
        for kind in ("log", "progress"):
            self.frames_dropped.labels(kind)
        self.spawn_failures = Counter(
            "corral_spawn_failures",
            "Worker spawns that failed for the supervisor's own reasons (not charged to sessions)",
            registry=r,
        )
        self.inbox_depth = Gauge(
            "corral_inbox_depth", "Accepted messages whose turn has not ended", registry=r
        )

    def declare_channels(self, channels: Iterable[str]) -> None:
        """Start every channel's counters at 0, so the first event is an increase."""
        for channel in channels:
            for counter in (
                self.accepted,
                self.delivered,
                self.delivery_failures,
                self.dead_letters,
            ):
                counter.labels(channel)

    def snapshot(self, rows: Iterable[SessionRow]) -> None:
        self.sessions.rows = list(rows)


log = logging.getLogger("corral.metrics")


class MetricsServer:
    """GET /metrics on [metrics] listen. The loop takes a snapshot of the session table
    (cheap); the text is rendered on a thread, so a scrape of 1,000 sessions never
    holds the loop. With `draining` (whether the supervisor is draining), also
    GET /healthz: 200 {"status": "ok"}, or 503 {"status": "draining"}."""

    def __init__(
        self,
        metrics: Metrics,
        rows: Callable[[], Iterable[SessionRow]],
        host: str,
        port: int,
        draining: Callable[[], bool] | None = None,
    ):
        self.metrics = metrics
        self.rows = rows
        self.draining = draining
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.scrape)
        if self.draining is not None:
            app.router.add_get("/healthz", self.healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=0.5).start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        assert self.draining is not None
        if self.draining():
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def scrape(self, request: web.Request) -> web.Response:
        self.metrics.snapshot(self.rows())
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
