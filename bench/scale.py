"""Scale: 1,000 live idle workers on one small machine.

Create W sessions (one message each), then, with every worker idle: the
supervisor's loop lag over a window (delta of the corral_loop_lag_seconds
histogram between two scrapes), the supervisor's CPU use and RSS, the median
USS of a sample of idle workers (the zygote's children), and how long a
/metrics scrape of W sessions takes. Then the stop time with W idle workers.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import aiohttp
import psutil

from bench.client import (
    bucket_delta,
    bucket_fraction_le,
    bucket_quantile,
    buckets,
    client,
    ms,
    percentile,
    post,
    scrape,
)
from bench.common import Bench
from bench.servers import CorralServer, CpuMeter, nofile_limit

CONCURRENCY = 32
USS_SAMPLE = 100
SCRAPES = 5
LAG = "corral_loop_lag_seconds"


def _mib(n: float) -> float:
    return round(n / 2**20, 2)


def _worker_memory(workers: list[psutil.Process]) -> dict[str, Any]:
    uss, pss, rss = [], [], []
    for p in random.sample(workers, min(USS_SAMPLE, len(workers))):
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        uss.append(info.uss)
        pss.append(info.pss)
        rss.append(info.rss)
    return {
        "sampled": len(uss),
        "uss_median_mib": _mib(statistics.median(uss)) if uss else None,
        "uss_max_mib": _mib(max(uss)) if uss else None,
        "pss_median_mib": _mib(statistics.median(pss)) if pss else None,
        "rss_median_mib": _mib(statistics.median(rss)) if rss else None,
    }


async def run(bench: Bench) -> dict[str, Any]:
    n = bench.plan.scale_workers
    window = bench.plan.scale_window
    soft, hard = nofile_limit()
    bench.say(f"scale: {n} workers (RLIMIT_NOFILE of the bench: {soft}/{hard}; servers get {hard})")
    server = CorralServer(
        bench.tmp,
        "scale",
        config={
            "supervisor": {
                "max_workers": n + 100,
                "idle_timeout": "1h",
                "drain_timeout": "5s",
                "kill_grace": "2s",
            }
        },
    )
    result: dict[str, Any] = {
        "workers_requested": n,
        "nofile_limit": hard,
        # the supervisor holds a socket and a pidfd per worker, plus its own files
        "nofile_limited": hard < 2 * n + 256,
    }
    try:
        await server.start()
        async with client(CONCURRENCY) as http:
            sessions = [f"scale-{i}" for i in range(n)]
            queue = list(reversed(sessions))
            failed: list[str] = []
            started = time.perf_counter()

            async def creator() -> None:
                while queue:  # ends when every session has had its message
                    s = queue.pop()
                    r = await post(http, server.base, s, "hi", wait=120)
                    if not r.done:
                        failed.append(f"{r.status} {r.body}")

            await asyncio.gather(*(creator() for _ in range(CONCURRENCY)))
            created = time.perf_counter() - started
            bench.say(f"  created {n} sessions in {created:.1f}s ({len(failed)} failed)")
            status = await server.status()
            zygote = status["zygote_pid"]
            workers = server.workers(zygote)
            result.update(
                {
                    "create_seconds": round(created, 1),
                    "create_per_s": round(n / created, 1),
                    "create_failures": len(failed),
                    "create_failure_examples": failed[:3],
                    "live_workers": len(workers),
                    "workers_by_state": status["workers"],
                }
            )
            await asyncio.sleep(bench.plan.settle)  # let the last turns' bookkeeping settle
            sup = psutil.Process(server.pid)
            async with server.control() as control:
                _, before, _ = await scrape(http, server.metrics_url)
                await asyncio.sleep(bench.plan.settle)  # the scrape's own lag: outside the window
                meter = CpuMeter(server.pid)
                meter.start()
                lags = await server.loop_lags(control, window)
                cpu = meter.stop()
                _, after, _ = await scrape(http, server.metrics_url)
                scrapes = asyncio.create_task(_scrape_times(http, server.metrics_url))
                lags_scraping = await server.loop_lags(control, None, until=scrapes)
                times, size, series = await scrapes
            hist = bucket_delta(buckets(after, LAG), buckets(before, LAG))
            p99 = bucket_quantile(hist, 0.99)
            result["idle_window"] = {
                "seconds": window,
                "ticks_seen": len(lags),
                "lag_p50_ms": ms(percentile(lags, 50)),
                "lag_p99_ms": ms(percentile(lags, 99)),
                "lag_max_ms": ms(max(lags, default=None)),
                "ticks_over_10ms": sum(1 for x in lags if x > 0.010),
                "cpu_pct": cpu,
                # the corral_loop_lag_seconds histogram between two scrapes: its window also
                # holds the lag the first scrape itself caused
                "histogram_p99_bucket_ms": [ms(x) for x in p99] if p99 else None,
                "histogram_share_le_10ms": round(bucket_fraction_le(hist, 0.01) or 0.0, 4),
            }
            result["while_scraping"] = {
                "scrapes": SCRAPES,
                "scrape_p50_ms": ms(percentile(times, 50)),
                "scrape_max_ms": ms(max(times)),
                "bytes": size,
                "series": series,
                "lag_max_ms": ms(max(lags_scraping, default=None)),
                "ticks_over_10ms": sum(1 for x in lags_scraping if x > 0.010),
            }
            result["supervisor_rss_mib"] = _mib(sup.memory_info().rss)
            result["zygote_rss_mib"] = _mib(psutil.Process(zygote).memory_info().rss)
            result["supervisor_fds"] = sup.num_fds()
            result["idle_worker"] = _worker_memory(workers)
        result["goals"] = {"lag_p99_ms": 10, "idle_worker_uss_mib": 5}
    finally:
        stop_seconds, code = await server.stop(timeout=60)
        left = await server.leftovers(timeout=5)
        result["stop_idle"] = {
            "seconds": round(stop_seconds, 2),
            "exit_code": code,
            "leftover_processes": len(left),
        }
    return result


async def _scrape_times(http: aiohttp.ClientSession, url: str) -> tuple[list[float], int, int]:
    times, size, series = [], 0, 0
    for _ in range(SCRAPES):
        seconds, samples, size = await scrape(http, url)
        times.append(seconds)
        series = len(samples)
        await asyncio.sleep(0.2)
    return times, size, series
