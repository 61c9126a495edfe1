"""Memory: what one idle worker costs after one turn, for the echo and the openai agent.

For each agent, one `corral serve`; W sessions (full 16, quick 8) get one message
each, one at a time (the openai agent streams its answer from tests/fake_openai.py,
a local fake endpoint, so no network is used), then, with every worker idle and
after a settle pause, the USS, PSS and RSS of every worker (the zygote's children)
from /proc/PID/smaps_rollup, and the zygote's own. USS is what the worker alone
holds (pages it dirtied since the fork); PSS adds its share of the pages it shares
with the zygote and the other workers, so PSS falls as more workers share them: it
is given with W, the number of workers alive.

Then, beside it (same server), 4 W workers (full 64, quick 32): more sessions get their
one turn, and the same figures are taken again, with the marginal cost of a worker:
(the sum of PSS over the zygote and every worker at 4 W, minus the sum at W) / 3 W,
what each added worker costs the machine, shared pages included.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import psutil

from bench.client import client, post
from bench.common import Bench
from bench.servers import CorralServer

AGENTS = {
    "echo": "corral.worker.agents.echo:agent",
    "openai": "corral.worker.agents.openai:agent",
}
GOAL_OPENAI_PSS_MIB = 8.0


def _mib(n: float) -> float:
    return round(n / 2**20, 2)


def _memory(procs: list[psutil.Process]) -> dict[str, Any]:
    uss, pss, rss = [], [], []
    for p in procs:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        uss.append(info.uss)
        pss.append(info.pss)
        rss.append(info.rss)
    if not uss:
        return {"sampled": 0}
    return {
        "sampled": len(uss),
        "uss_median_mib": _mib(statistics.median(uss)),
        "uss_max_mib": _mib(max(uss)),
        "pss_median_mib": _mib(statistics.median(pss)),
        "pss_max_mib": _mib(max(pss)),
        "rss_median_mib": _mib(statistics.median(rss)),
    }


def _pss_total(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


async def _turns(base: str, start: int, stop: int) -> list[str]:
    """One message to each of the sessions mem-START .. mem-(STOP-1), one at a time."""
    failed = []
    async with client() as http:
        for i in range(start, stop):
            r = await post(http, base, f"mem-{i}", f"hello {i}", wait=60)
            if not r.done:
                failed.append(f"{r.status} {r.body}")
    return failed


async def measure(
    bench: Bench, name: str, endpoint: str, env: dict[str, str] | None = None, tag: str = ""
) -> dict[str, Any]:
    workers = bench.plan.memory_workers
    more = 4 * workers
    config: dict[str, dict[str, Any]] = {"supervisor": {"idle_timeout": "1h"}}
    if name == "openai":
        config["agent.options"] = {"model": "fake", "base_url": endpoint}
    server = CorralServer(
        bench.tmp, f"memory-{name}{tag}", agent=AGENTS[name], config=config, env=env
    )
    try:
        await server.start()
        failed = await _turns(server.base, 0, workers)
        await asyncio.sleep(bench.plan.settle * 2)  # idle: the turns' last frames handled
        status = await server.status()
        zygote = psutil.Process(status["zygote_pid"])
        result = _memory(server.workers(zygote.pid))
        result["workers"] = workers
        result["failures"] = len(failed)
        result["failure_examples"] = failed[:2]
        procs = server.workers(zygote.pid)
        zmem = zygote.memory_full_info()
        result["zygote_uss_mib"] = _mib(zmem.uss)
        result["zygote_rss_mib"] = _mib(zmem.rss)
        total = _pss_total([zygote, *procs])
        # beside it: 4 W workers, and what each one added costs
        failed_more = await _turns(server.base, workers, more)
        await asyncio.sleep(bench.plan.settle * 2)
        procs_more = server.workers(zygote.pid)
        at_more = _memory(procs_more)
        at_more["workers"] = len(procs_more)
        at_more["failures"] = len(failed_more)
        if len(procs_more) > len(procs):
            added = _pss_total([zygote, *procs_more]) - total
            at_more["marginal_pss_mib"] = _mib(added / (len(procs_more) - len(procs)))
        result["more"] = at_more
        return result
    finally:
        await server.stop()


async def run(bench: Bench) -> dict[str, Any]:
    from tests.fake_openai import FakeOpenAI  # the repository's own fake endpoint

    result: dict[str, Any] = {"goal_openai_pss_mib": GOAL_OPENAI_PSS_MIB}
    fake = FakeOpenAI().start()
    try:
        for name in AGENTS:
            bench.say(f"memory: {name} agent, {bench.plan.memory_workers} workers, one turn each")
            try:
                result[name] = await measure(bench, name, fake.base_url)
            except ImportError as e:  # the openai agent without its SDK installed
                result[name] = {"error": str(e)}
    finally:
        fake.stop()
    return result
