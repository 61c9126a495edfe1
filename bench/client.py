"""The load side: one aiohttp client, POST /v1/messages?wait, percentiles, /metrics parsing."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

INF = math.inf


@dataclass
class Sent:
    """One POST /v1/messages?wait: what came back and when (perf_counter and wall clock)."""

    status: int  # HTTP status; 0 when no answer came (timeout, connection error)
    body: dict[str, Any]
    sent: float
    received: float
    sent_wall: float
    received_wall: float

    @property
    def seconds(self) -> float:
        return self.received - self.sent

    @property
    def done(self) -> bool:
        return self.status == 200 and self.body.get("status") == "done"

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.body.get("replies", [])]

    @property
    def error_text(self) -> str:
        errors = [r["text"] for r in self.body.get("replies", []) if r.get("kind") == "error"]
        return errors[-1] if errors else ""


def client(connections: int = 0) -> aiohttp.ClientSession:
    """One pooled client for a whole benchmark (0: no limit on connections)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),
    )


async def post(
    http: aiohttp.ClientSession,
    base: str,
    session: str,
    text: str,
    wait: float = 30.0,
    timeout: float | None = None,
) -> Sent:
    """POST a message and wait for its turn to end; never raises for a slow or dead server."""
    timeout = wait + 10.0 if timeout is None else timeout
    sent_wall = time.time()
    sent = time.perf_counter()
    status, body = 0, {}
    try:
        async with asyncio.timeout(timeout):
            async with http.post(
                f"{base}/v1/messages?wait={wait:g}", json={"session": session, "text": text}
            ) as resp:
                status = resp.status
                body = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        body = {"status": "no answer", "exception": type(e).__name__, "detail": str(e)[:200]}
    return Sent(status, body, sent, time.perf_counter(), sent_wall, time.time())


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values. INF values sort last."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, rounded for the report; None and INF pass through as None."""
    if seconds is None or math.isinf(seconds):
        return None
    return round(seconds * 1000, 2)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value}, read with prometheus-client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[float, dict[str, float], int]:
    """(seconds, samples, bytes) of one GET /metrics."""
    started = time.perf_counter()
    async with http.get(url) as resp:
        text = await resp.text()
    return time.perf_counter() - started, parse_metrics(text), len(text)


def buckets(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets as [(le, count)], ascending."""
    prefix = f'{name}_bucket{{le="'
    out = []
    for key, value in samples.items():
        if key.startswith(prefix):
            le = key[len(prefix) :].split('"', 1)[0]
            out.append((INF if le == "+Inf" else float(le), value))
    return sorted(out)


def bucket_delta(
    after: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in after]


def bucket_quantile(cumulative: list[tuple[float, float]], q: float) -> tuple[float, float] | None:
    """The (lower, upper) bounds of the bucket holding quantile q (0..1), or None if empty."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    target = q * cumulative[-1][1]
    lower = 0.0
    for le, count in cumulative:
        if count >= target:
            return lower, le
        lower = le
    return lower, INF


def bucket_fraction_le(cumulative: list[tuple[float, float]], bound: float) -> float | None:
    """Share of observations in buckets with le <= bound."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    below = max((count for le, count in cumulative if le <= bound), default=0.0)
    return below / cumulative[-1][1]
