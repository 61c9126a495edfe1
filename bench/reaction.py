"""Reaction: from a bound being crossed to the user's error reply, per bound.

One supervisor per bound (the limits differ), all running bench/agents.py:timed,
which writes down on the wall clock when it crossed its bound (or when its turn
started, for the deadlines). Reaction = the wall time the client got the error
reply - the crossing. For the deadlines the crossing is the agent's turn start +
the timeout; the supervisor starts its timer a frame's transit earlier, so this
under-states by well under a millisecond; the brief's "reply - send - timeout"
figure, which over-states by the accept and dispatch time, is reported too.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from bench.client import client, ms, percentile, post
from bench.common import Bench
from bench.servers import CorralServer, tail

LONG = "120s"
_REASON = re.compile(r"\[(\w+)\]\s*$")


@dataclass(frozen=True)
class Bound:
    reason: str  # the exit reason the error reply must name
    command: str
    limits: dict[str, Any]
    deadline: float | None  # seconds after turn start, for the timer bounds
    goal_ms: float


BOUNDS = (
    Bound("turn_timeout", "deadline", {"turn_timeout": "1s", "no_progress_timeout": LONG}, 1.0, 50),
    Bound("no_progress", "hang", {"turn_timeout": LONG, "no_progress_timeout": "1s"}, 1.0, 50),
    Bound("rss_limit", "balloon 200", {"rss_max": "200MiB"}, None, 250),
    Bound("cpu_limit", "spin 1", {"cpu_time_per_turn": "1s"}, None, 250),
)


def _config(bound: Bound) -> dict[str, dict[str, Any]]:
    limits: dict[str, Any] = {
        "turn_timeout": LONG,
        "no_progress_timeout": LONG,
        "restart_intensity": 100000,
    }
    limits.update(bound.limits)
    return {"limits": limits, "supervisor": {"kill_grace": "1s"}}


async def measure(bench: Bench, server: CorralServer, bound: Bound) -> dict[str, Any]:
    reactions: list[float] = []
    from_send: list[float] = []
    wrong: list[str] = []
    lost = 0
    crossings: dict[str, tuple[float, float]] = {}  # session -> (crossed, reply received)
    async with client() as http:
        for i in range(bench.plan.reaction_reps):
            session = f"{bound.reason}-{i}"
            warm = await post(http, server.base, session, "warm up")  # spawn outside the timing
            if not warm.done:
                raise RuntimeError(f"warm-up failed: {warm.status} {warm.body}")
            # The warm-up's end is tied to a watchdog tick (its Done frame waits for a
            # sample); without a random pause every crossing would fall at the same
            # point of the 100 ms sampling cycle, and rss/cpu would show one phase only.
            await asyncio.sleep(random.uniform(0.0, 0.25))
            r = await post(http, server.base, session, bound.command, wait=60)
            m = _REASON.search(r.error_text)
            if m is None or m[1] != bound.reason:
                wrong.append(r.error_text or str(r.body))
                continue
            raw = (server.state / "agents" / session / f"{r.body['id']}.json").read_text()
            if not raw:  # killed between crossing and recording it: see bench/agents.py
                lost += 1
                continue
            record = json.loads(raw)
            if bound.deadline is not None:
                crossed = record["start"] + bound.deadline
                from_send.append(r.seconds - bound.deadline)
            else:
                crossed = record["crossed"]
            reactions.append(r.received_wall - crossed)
            crossings[session] = (crossed, r.received_wall)
    out: dict[str, Any] = {
        "reps": len(reactions),
        "p50_ms": ms(percentile(reactions, 50)),
        "max_ms": ms(max(reactions, default=None)),
        "min_ms": ms(min(reactions, default=None)),
        "goal_ms": bound.goal_ms,
        "limits": bound.limits,
    }
    # split at the moment the supervisor decided to stop the worker (its log line)
    stops = _stop_times(server, list(crossings))
    detect = [stops[k] - c for k, (c, _) in crossings.items() if k in stops]
    reply = [r - stops[k] for k, (_, r) in crossings.items() if k in stops]
    if detect:
        out["detect_p50_ms"] = ms(percentile(detect, 50))
        out["detect_max_ms"] = ms(max(detect))
        out["stop_to_reply_p50_ms"] = ms(percentile(reply, 50))
        out["stop_to_reply_max_ms"] = ms(max(reply))
    if from_send:
        out["from_send_p50_ms"] = ms(percentile(from_send, 50))
        out["from_send_max_ms"] = ms(max(from_send))
    if wrong:
        out["unexpected_replies"] = wrong[:3]
    if lost:
        out["lost_reps"] = lost
    return out


def _stop_times(server: CorralServer, sessions: list[str]) -> dict[str, float]:
    """When the supervisor logged "session S: stopping worker ...", by session (wall clock).

    Log lines start with logging's asctime ("2025-01-31 12:00:00,123", local time);
    if the format is not that, the split is left out.
    """
    found: dict[str, float] = {}
    wanted = {f"session {s}: stopping worker": s for s in sessions}
    for line in tail(server.log_path, 100_000).splitlines():
        for marker, session in wanted.items():
            if marker in line and session not in found:
                try:
                    when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                except ValueError:
                    continue
                found[session] = when.timestamp()
    return found


async def run(bench: Bench) -> dict[str, Any]:
    servers = {
        b.reason: CorralServer(
            bench.tmp, f"reaction-{b.reason}", agent="bench.agents:timed", config=_config(b)
        )
        for b in BOUNDS
    }
    try:
        for s in servers.values():
            s.launch()  # start them all at once; each warms up while the others load
        await asyncio.gather(*(s.start() for s in servers.values()))
        result = {}
        for b in BOUNDS:
            bench.say(f"reaction: {b.reason} ({bench.plan.reaction_reps} reps)")
            result[b.reason] = await measure(bench, servers[b.reason], b)
            # the others wait idle: a stopped server cannot disturb the next bound
            await servers[b.reason].stop()
        return result
    finally:
        for s in servers.values():
            if s.proc is not None and s.proc.poll() is None:
                await s.stop()
