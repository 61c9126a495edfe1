"""Prometheus: per-session series live and die with their worker."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

CHAOS = "corral.worker.agents.chaos:agent"


def wait_for(predicate, timeout=20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_a_ballooned_session_shows_its_rss_and_state_then_vanishes_when_killed(corral):
    c = corral({"limits": {"no_progress_timeout": "60s"}}, agent=CHAOS)
    c.request("POST", "/v1/messages", {"session": "fat", "text": "balloon 120; sleep 60"})
    c.texts("thin", "hi")
    m = wait_for(
        lambda: (
            (m := c.metrics()).get('corral_session_rss_bytes{session="fat"}', 0) > 100 * 2**20 and m
        )
    )
    assert m['corral_session_state{session="fat",state="busy"}'] == 1
    assert 'corral_session_state{session="fat",state="idle"}' not in m
    assert m['corral_session_state{session="thin",state="idle"}'] == 1
    assert m['corral_session_rss_bytes{session="thin"}'] < 100 * 2**20
    assert m['corral_workers{state="busy"}'] == 1
    assert m['corral_session_cpu_seconds_total{session="fat"}'] > 0
    assert m['corral_session_queue_depth{session="fat"}'] == 0
    assert m['corral_messages_accepted_total{channel="http"}'] == 2
    assert m["corral_worker_spawn_seconds_count"] == 2
    assert m["corral_loop_lag_seconds_count"] > 0
    assert m["corral_inbox_depth"] == 1

    assert c.cli("kill", "fat").returncode == 0
    m = c.metrics()
    assert not [k for k in m if 'session="fat"' in k]
    assert m['corral_worker_exits_total{reason="killed"}'] == 1
    assert m["corral_inbox_depth"] == 0
    assert m["corral_turn_duration_seconds_count"] == 2


def test_rss_limit_exits_are_counted_by_reason(corral):
    c = corral({"limits": {"rss_max": "100MiB"}}, agent=CHAOS)
    assert c.send("big", "balloon 150")["status"] == "error"
    m = c.metrics()
    assert m['corral_worker_exits_total{reason="rss_limit"}'] == 1
    assert not [k for k in m if 'session="big"' in k]


def test_a_scrape_lists_every_one_of_150_live_sessions(corral):
    c = corral()
    sessions = [f"s{i:03d}" for i in range(160)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: c.texts(s, "hi"), sessions))
    t0 = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    took = time.monotonic() - t0
    print(f"scrape of {len(sessions)} sessions: {took * 1000:.0f} ms, {len(text)} bytes")
    for s in sessions:
        assert f'corral_session_rss_bytes{{session="{s}"}}' in text
    assert 'corral_workers{state="idle"} 160.0' in text
