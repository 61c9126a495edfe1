"""Isolation: healthy sessions' reply latency with and without faulty sessions running.

N healthy sessions send echo messages in a closed loop (send, wait for the reply,
repeat) for T seconds; then the same with faulty sessions added that re-send
their fault (`hang`, `spin`, `balloon 300`, `flood`) as soon as they get their
error reply. The same load runs against corral and against the single-process
gateway of bench/baseline.py. A healthy request that does not come back with its
echo counts as infinitely slow, so a stuck server shows up as "no reply", not as
a flattering percentile of the few replies that made it.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.client import INF, Sent, client, ms, percentile, post
from bench.common import Bench
from bench.servers import BaselineServer, CorralServer, CpuMeter

FAULTS = ("hang", "spin", "balloon 300", "flood")
TURN_TIMEOUT = 5.0
LIMITS = {
    "turn_timeout": f"{TURN_TIMEOUT:g}s",
    "no_progress_timeout": "2s",
    "rss_max": "200MiB",
    # 1 s, not 2 s: a spinning worker at nice 10 on two busy cores needs more than 2 s of wall
    # time for 2 s of CPU, so no_progress (2 s) would always end it before the CPU bound could
    "cpu_time_per_turn": "1s",
    "output_per_turn": "64KiB",
    # faulty sessions fail every few hundred ms for the whole run: keep them out of quarantine
    "restart_intensity": 100000,
    "restart_period": "60s",
}
WAIT = 30.0
_REASON = re.compile(r"\[(\w+)\]\s*$")


@dataclass
class Phase:
    seconds: float
    healthy: list[Sent] = field(default_factory=list)
    unanswered: list[float] = field(default_factory=list)  # ages at the cut-off
    faults: dict[str, list[Sent]] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, by part
    lags: list[float] = field(default_factory=list)  # the supervisor's loop lag, per tick

    def latencies(self) -> list[float]:
        done = [r.seconds if r.done else INF for r in self.healthy]
        return done + [INF] * len(self.unanswered)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies()
        done = sum(1 for r in self.healthy if r.done)
        out: dict[str, Any] = {
            "requests": len(lat),
            "replies": done,
            "replies_per_s": round(done / self.seconds, 1),
            "errors": sum(1 for r in self.healthy if not r.done),
            "unanswered": len(self.unanswered),
            "unanswered_oldest_s": round(max(self.unanswered), 1) if self.unanswered else None,
            "p50_ms": ms(percentile(lat, 50)),
            "p99_ms": ms(percentile(lat, 99)),
            "max_ms": ms(max(lat, default=None)),
        }
        errors = Counter(_short(r) for r in self.healthy if not r.done)
        if errors:
            out["error_kinds"] = dict(errors.most_common(5))
        if self.faults:
            out["faults"] = {
                text: dict(Counter(_short(r) for r in sent).most_common(4))
                for text, sent in self.faults.items()
            }
        if self.server:
            out["server"] = self.server
        out["cpu_pct"] = self.cpu
        if self.lags:
            out["loop_lag_p99_ms"] = ms(percentile(self.lags, 99))
            out["loop_lag_max_ms"] = ms(max(self.lags))
        return out


def _short(r: Sent) -> str:
    """What a reply amounted to: "done", a bound's reason, or the first words of an error."""
    if r.status == 0:
        return f"no answer ({r.body.get('exception', '')}: {r.body.get('detail', '')[:60]})"
    if r.status != 200:
        return f"http {r.status}"
    if r.done:
        return "done"
    text = r.error_text
    m = _REASON.search(text)
    if m:
        return m[1]
    return " ".join(text.split()[:5]) or str(r.body.get("status"))


async def run_phase(
    http: aiohttp.ClientSession,
    base: str,
    healthy: list[str],
    faulty: dict[str, str],
    seconds: float,
    grace: float,
    meter: CpuMeter,
    server: CorralServer | None = None,
) -> Phase:
    """Run the load for `seconds`; with a corral `server`, also record its loop lag."""
    phase = Phase(seconds)
    inflight: dict[str, float] = {}
    end = time.perf_counter() + seconds

    async def healthy_loop(session: str) -> None:
        n = 0
        while time.perf_counter() < end:  # ends at the end of the phase
            n += 1
            inflight[session] = time.perf_counter()
            r = await post(http, base, session, f"hello {n}", WAIT, timeout=seconds + grace + WAIT)
            del inflight[session]
            phase.healthy.append(r)
            if r.status == 0:
                await asyncio.sleep(0.1)  # the server is gone or refusing: do not spin

    async def fault_loop(session: str, text: str) -> None:
        sent = phase.faults.setdefault(text, [])
        while time.perf_counter() < end:  # ends at the end of the phase
            r = await post(http, base, session, text, WAIT)
            sent.append(r)
            if r.status != 200:
                await asyncio.sleep(0.1)  # 429, or the server is gone: do not spin

    meter.start()
    healthy_tasks = [asyncio.create_task(healthy_loop(s)) for s in healthy]
    fault_tasks = [asyncio.create_task(fault_loop(s, t)) for s, t in faulty.items()]
    try:
        if server is not None:
            async with server.control() as control:
                phase.lags = await server.loop_lags(control, seconds)
        else:
            await asyncio.sleep(seconds)
        phase.cpu = meter.stop()
        await asyncio.wait(healthy_tasks, timeout=grace)
    finally:
        cutoff = time.perf_counter()
        phase.unanswered = [cutoff - t for t in inflight.values()]
        for task in healthy_tasks + fault_tasks:
            task.cancel()
        await asyncio.gather(*healthy_tasks, *fault_tasks, return_exceptions=True)
    return phase


async def warm_up(http: aiohttp.ClientSession, base: str, sessions: list[str]) -> None:
    """One message per session, so the phases measure turns, not spawns."""
    results = await asyncio.gather(*(post(http, base, s, "warm up", WAIT) for s in sessions))
    bad = [r for r in results if not r.done]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0].status} {bad[0].body}")


def fault_sessions(n_healthy: int) -> dict[str, str]:
    """A tenth of the sessions faulty, at least one of each fault."""
    n = max(len(FAULTS), math.ceil(n_healthy / 9))  # n / (n_healthy + n) >= 1/10
    return {f"faulty-{i}": FAULTS[i % len(FAULTS)] for i in range(n)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


def ratios(clean: dict[str, Any], faulty: dict[str, Any]) -> dict[str, float | None]:
    """faulty / fault-free for p50 and p99; none when healthy requests failed or hung:
    then the outcome says what happened, and a ratio would only flatter."""
    if faulty["errors"] or faulty["unanswered"]:
        return {"ratio_p50": None, "ratio_p99": None}
    return {
        "ratio_p50": ratio(faulty["p50_ms"], clean["p50_ms"]),
        "ratio_p99": ratio(faulty["p99_ms"], clean["p99_ms"]),
    }


async def against(
    bench: Bench, server: CorralServer, healthy: list[str], faulty: dict[str, str]
) -> tuple[Phase, Phase, dict[str, Phase]]:
    seconds, grace = bench.plan.isolation_seconds, bench.plan.isolation_grace
    by_fault: dict[str, Phase] = {}
    async with client() as http:
        await warm_up(http, server.base, healthy)
        pids = {s["pid"] for s in await server.sessions() if s["session"] in healthy}
        meter = CpuMeter(server.pid, pids)
        clean = await run_phase(http, server.base, healthy, {}, seconds, grace, meter, server)
        bench.say(f"  fault-free: {clean.summary()['p50_ms']} ms p50, cpu {clean.cpu}")
        faulted = await run_phase(http, server.base, healthy, faulty, seconds, grace, meter, server)
        bench.say(f"  faulty: {faulted.summary()['p50_ms']} ms p50, cpu {faulted.cpu}")
        if not bench.plan.quick:
            # which fault costs the healthy sessions what: one faulty session at a time
            for i, fault in enumerate(FAULTS):
                alone = {f"only-{i}": fault}
                phase = await run_phase(
                    http, server.base, healthy, alone, seconds / 2, grace, meter, server
                )
                by_fault[fault] = phase
                bench.say(f"  only {fault}: {phase.summary()['p50_ms']} ms p50, cpu {phase.cpu}")
    return clean, faulted, by_fault


async def run(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    healthy = [f"healthy-{i}" for i in range(plan.isolation_healthy)]
    faulty = fault_sessions(len(healthy))
    result: dict[str, Any] = {
        "healthy_sessions": len(healthy),
        "faulty_sessions": dict(Counter(faulty.values())),
        "seconds_per_phase": plan.isolation_seconds,
        "limits": LIMITS,
    }

    bench.say(f"isolation: corral, {len(healthy)} healthy + {len(faulty)} faulty sessions")
    server = CorralServer(
        bench.tmp,
        "isolation",
        agent="corral.worker.agents.chaos:agent",
        config={"limits": LIMITS, "supervisor": {"kill_grace": "1s", "idle_timeout": "1h"}},
    )
    try:
        await server.start()
        clean, faulted, by_fault = await against(bench, server, healthy, faulty)
    finally:
        if server.proc is not None:
            await server.stop()
    c, f = clean.summary(), faulted.summary()
    result["corral"] = {
        "fault_free": c,
        "faulty": f,
        **ratios(c, f),
        "cgroups": server.log_line("per-worker cgroups"),
    }
    if by_fault:
        result["corral"]["by_fault"] = {}
        for fault, phase in by_fault.items():
            x = phase.summary()
            result["corral"]["by_fault"][fault] = {
                "seconds": phase.seconds,
                "p50_ms": x["p50_ms"],
                "p99_ms": x["p99_ms"],
                **ratios(c, x),
                "replies_per_s": x["replies_per_s"],
                "fault_replies": x.get("faults", {}).get(fault, {}),
                "cpu_pct": x["cpu_pct"],
                "loop_lag_p99_ms": x.get("loop_lag_p99_ms"),
                "loop_lag_max_ms": x.get("loop_lag_max_ms"),
            }

    mode = plan.baseline_mode
    bench.say(f"isolation: single-process gateway ({mode} mode)")
    phases = []
    for i, with_faults in enumerate((False, True)):
        gateway = BaselineServer(bench.tmp, f"gateway-{i}", mode, TURN_TIMEOUT)
        try:
            await gateway.start()
            async with client() as http:
                await warm_up(http, gateway.base, healthy)
                assert gateway.proc is not None
                sampler = asyncio.create_task(_sample_until_cancelled(gateway))
                try:
                    phase = await run_phase(
                        http,
                        gateway.base,
                        healthy,
                        faulty if with_faults else {},
                        plan.isolation_seconds,
                        plan.isolation_grace,
                        CpuMeter(gateway.proc.pid),
                    )
                finally:
                    sampler.cancel()
                    await asyncio.gather(sampler, return_exceptions=True)
                now = gateway.sample()
                phase.server = {
                    "rss_mib_end": round(now["rss"] / 2**20),
                    "rss_mib_peak": round(gateway.peak_rss / 2**20),
                    "threads_end": now["threads"],
                    "alive": not now.get("dead", False),
                    "log_errors": gateway.log_errors(),
                    "log_error": gateway.last_log_error(),
                }
                phases.append(phase)
                bench.say(f"  {'faulty' if with_faults else 'fault-free'}: {phase.summary()}")
        finally:
            gateway.kill()  # it may be stuck for good: SIGKILL by PID
    bc, bf = phases[0].summary(), phases[1].summary()
    result["baseline"] = {
        "design": _DESIGN[mode],
        "fault_free": bc,
        "faulty": bf,
        **ratios(bc, bf),
        "outcome": _outcome(bc, bf, plan.isolation_seconds),
    }
    return result


async def _sample_until_cancelled(gateway: BaselineServer) -> None:
    while True:  # ends when cancelled at the end of the phase
        gateway.sample()
        await asyncio.sleep(0.2)


def _outcome(clean: dict[str, Any], faulty: dict[str, Any], seconds: float) -> str:
    """What happened to the healthy sessions once faults ran, in words."""
    parts = [
        f"{faulty['replies']} healthy replies in {seconds:g} s "
        f"({faulty['replies_per_s']}/s; fault-free: {clean['replies_per_s']}/s)"
    ]
    if faulty["errors"]:
        kinds = ", ".join(f"{k} x{v}" for k, v in faulty.get("error_kinds", {}).items())
        parts.append(f"{faulty['errors']} healthy requests failed ({kinds})")
    if faulty["unanswered"]:
        parts.append(
            f"{faulty['unanswered']} still unanswered at the cut-off "
            f"(oldest {faulty['unanswered_oldest_s']} s)"
        )
    server = faulty.get("server", {})
    if server.get("log_error"):
        parts.append(f"its log: {server['log_error']!r}")
    return "; ".join(parts)


_DESIGN = {
    "threads": "one asyncio process; each turn runs the sync agent in asyncio's default thread "
    f"pool (min(32, CPUs + 4) = {min(32, (os.cpu_count() or 1) + 4)} threads here) under "
    "asyncio.wait_for(turn_timeout); a timed-out turn is answered but its thread runs on",
    "loop": "one asyncio process; the sync agent runs directly on the event loop",
    "echo": "no agent",
}
