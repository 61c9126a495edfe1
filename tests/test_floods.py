"""Frame floods and a stalled loop: a worker's flood costs that worker only, and a turn
that ended while the supervisor could not run is answered with its reply."""

from __future__ import annotations

import json
import signal
import threading
import time

from tests.harness import wait_for

FLOOD = "bench.agents:frame_flood"
CHAOS = "corral.worker.agents.chaos:agent"


def bystander(c, stop: threading.Event, latencies: list[float], wrong: list[str]) -> None:  # type: ignore[no-untyped-def]
    n = 0
    while not stop.is_set():  # ends when the flooders are done
        n += 1
        t0 = time.monotonic()
        got = c.texts("bystander", f"hello {n}", wait=60)
        if got != [f"hello {n}"]:
            wrong.append(f"hello {n} -> {got}")  # seen by the test, not lost in the thread
        latencies.append(time.monotonic() - t0)


def flood_beside_a_bystander(c, text: str, n: int = 10) -> tuple[list[float], list[dict]]:  # type: ignore[no-untyped-def,type-arg]
    """n sessions run `text` at once while a bystander echoes; its latencies, their bodies."""
    for i in range(n):
        c.texts(f"flood-{i}", "warm up")
    c.texts("bystander", "warm up")
    stop, latencies, wrong = threading.Event(), [], []
    results: list[dict] = []  # type: ignore[type-arg]
    echo = threading.Thread(target=bystander, args=(c, stop, latencies, wrong))
    flooders = [
        threading.Thread(target=lambda i=i: results.append(c.send(f"flood-{i}", text, wait=120)))
        for i in range(n)
    ]
    echo.start()
    time.sleep(0.5)
    for t in flooders:
        t.start()
    for t in flooders:
        t.join(180)
    stop.set()
    echo.join(60)
    assert not wrong, wrong[:3]  # every echo of the bystander was its own text
    return latencies, results


def test_log_flood_of_ten_sessions_does_not_stall_a_bystander(corral):  # type: ignore[no-untyped-def]
    # the red team's case: 60,000 empty log frames per turn, well under output_per_turn
    c = corral({"limits": {"output_per_turn": "4MiB"}}, agent=FLOOD)
    latencies, results = flood_beside_a_bystander(c, "logs 60000")
    # each flooder is answered: its reply, or, if its flood lasted FLOOD_SECONDS on these
    # busy cores, output_limit
    assert len(results) == 10
    for r in results:
        text = r["replies"][-1]["text"]
        assert text == "logs 60000" or text.endswith("[output_limit]"), r
    # before: up to 1.8 s per echo here (4-5 s on the red team's machine); after, about
    # 0.2 s. A generous bound for two busy cores: the figure is in bench/ (floods)
    assert latencies and max(latencies) < 1.0, sorted(latencies)[-5:]
    dropped = c.metrics()['corral_frames_dropped_total{kind="log"}']
    assert dropped > 0  # 600,000 frames sent, at most frame_rate x burst per worker passed
    assert "dropping the excess" in c.log()
    status = c.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["loop_lag_max"] < 0.5


def test_progress_flood_does_not_stall_a_bystander(corral):  # type: ignore[no-untyped-def]
    c = corral({"limits": {"output_per_turn": "4MiB"}}, agent=FLOOD)
    latencies, results = flood_beside_a_bystander(c, "progress 40000", n=4)
    assert len(results) == 4
    for r in results:
        text = r["replies"][-1]["text"]
        assert text == "progress 40000" or text.endswith("[output_limit]"), r
    assert latencies and max(latencies) < 1.0, sorted(latencies)[-5:]
    assert c.metrics()['corral_frames_dropped_total{kind="progress"}'] > 0


def test_sustained_log_flood_ends_the_worker_with_output_limit(corral):  # type: ignore[no-untyped-def]
    # output_per_turn out of reach: the frame rate is what ends it
    c = corral({"limits": {"output_per_turn": "1GiB", "frame_rate": 100}}, agent=FLOOD)
    t0 = time.monotonic()
    body = c.send("noisy", "logs-forever", wait=60)
    assert body["status"] == "error", body
    text = body["replies"][-1]["text"]
    assert text.endswith("[output_limit]"), text
    assert "frames a second" in text
    assert time.monotonic() - t0 < 30
    assert c.texts("noisy", "after") == ["after"]  # a fresh worker
    assert c.texts("other", "fine") == ["fine"]


def test_reply_finished_during_a_supervisor_stall_is_delivered(corral):  # type: ignore[no-untyped-def]
    c = corral({"limits": {"turn_timeout": "3s", "no_progress_timeout": "3s"}}, agent=CHAOS)
    assert c.texts("s", "warm up") == ["warm up"]
    result: list[dict] = []  # type: ignore[type-arg]
    t = threading.Thread(target=lambda: result.append(c.send("s", "sleep 1; echo finished", 60)))
    t.start()
    wait_for(lambda: any(row["state"] == "busy" for row in c.ls()), timeout=20, interval=0.02)
    assert c.proc is not None
    c.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(8)  # the turn ends after 1 s; both deadlines pass while we are stopped
    finally:
        c.proc.send_signal(signal.SIGCONT)
    t.join(60)
    assert result, "no answer"
    body = result[0]
    assert body["status"] == "done", body
    assert [r["text"] for r in body["replies"]] == ["finished"]
    assert c.metrics()['corral_worker_exits_total{reason="turn_timeout"}'] == 0
    # the zygote's health ping, unanswered at its deadline only because we were stopped,
    # did not get the zygote replaced
    status = json.loads(c.cli("status", "--json").stdout)
    assert status["zygotes_replaced"] == 0


def test_hung_turn_after_a_supervisor_stall_is_still_stopped(corral):  # type: ignore[no-untyped-def]
    c = corral({"limits": {"turn_timeout": "3s", "no_progress_timeout": "3s"}}, agent=CHAOS)
    result: list[dict] = []  # type: ignore[type-arg]
    t = threading.Thread(target=lambda: result.append(c.send("s", "hang", 60)))
    t.start()
    wait_for(lambda: any(row["state"] == "busy" for row in c.ls()), timeout=20, interval=0.02)
    assert c.proc is not None
    c.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(5)
    finally:
        c.proc.send_signal(signal.SIGCONT)
    t.join(60)
    assert result and result[0]["status"] == "error", result
    assert result[0]["replies"][-1]["text"].endswith(("[no_progress]", "[turn_timeout]"))
