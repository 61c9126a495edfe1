"""Spawn: what a new session's first message costs over a warm session's.

For each of S sessions: the first message (spawns a worker) and then a second
one (the worker is warm), both POST ?wait, one at a time. The figure is
p50(new) - p50(warm) (and p99), against a bare fork()+_exit()+waitpid() of a
small Python process measured in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench.client import bucket_quantile, buckets, client, ms, percentile, post, scrape
from bench.common import Bench
from bench.servers import CorralServer

FORK_SCRIPT = """
import json, os, sys, time
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def bare_fork(n: int) -> list[float]:
    """fork+_exit+waitpid timings of a fresh interpreter that imported corral's worker."""
    out = subprocess.run(
        [sys.executable, "-c", "import corral.worker.runtime\n" + FORK_SCRIPT, str(n)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


async def run(bench: Bench) -> dict[str, Any]:
    n = bench.plan.spawn_sessions
    bench.say(f"spawn: {n} new sessions vs warm, and bare fork")
    fork = bare_fork(max(n, 100))
    server = CorralServer(
        bench.tmp,
        "spawn",
        config={"supervisor": {"idle_timeout": "1h", "max_workers": n + 100}},
    )
    new: list[float] = []
    warm: list[float] = []
    paired: list[float] = []
    try:
        await server.start()
        async with client() as http:
            for i in range(5):  # first requests pay for connections and code paths: not counted
                await post(http, server.base, f"spawn-warmup-{i}", "hi")
                await post(http, server.base, f"spawn-warmup-{i}", "hi")
            for i in range(n):
                a = await post(http, server.base, f"spawn-{i}", "first")
                b = await post(http, server.base, f"spawn-{i}", "second")
                if not (a.done and b.done):
                    raise RuntimeError(f"spawn: bad reply {a.body} / {b.body}")
                new.append(a.seconds)
                warm.append(b.seconds)
                paired.append(a.seconds - b.seconds)
            _, samples, _ = await scrape(http, server.metrics_url)
    finally:
        await server.stop()
    hist = buckets(samples, "corral_worker_spawn_seconds")
    count = samples.get("corral_worker_spawn_seconds_count", 0.0)
    total = samples.get("corral_worker_spawn_seconds_sum", 0.0)
    p50_bucket = bucket_quantile(hist, 0.5)
    new50, warm50 = percentile(new, 50), percentile(warm, 50)
    new99, warm99 = percentile(new, 99), percentile(warm, 99)
    assert new50 is not None and warm50 is not None and new99 is not None and warm99 is not None
    return {
        "sessions": n,
        "new_p50_ms": ms(new50),
        "new_p99_ms": ms(new99),
        "warm_p50_ms": ms(warm50),
        "warm_p99_ms": ms(warm99),
        "extra_p50_ms": ms(new50 - warm50),
        "extra_p99_ms": ms(new99 - warm99),
        "extra_paired_p50_ms": ms(percentile(paired, 50)),
        "bare_fork_p50_ms": ms(percentile(fork, 50)),
        "bare_fork_p99_ms": ms(percentile(fork, 99)),
        "goal_extra_p50_ms": 10,
        "spawn_histogram": {
            "count": int(count),
            "mean_ms": ms(total / count) if count else None,
            "p50_bucket_ms": [ms(x) for x in p50_bucket] if p50_bucket else None,
        },
    }
