"""Why worker logs do not go through one shared multiprocessing queue.

`python -m bench.mplogging` reproduces the hazard behind README's first design decision,
with nothing but the standard library. The pattern is the one `multiprocessing-logging`
uses: the `fork` start method and one `multiprocessing.Queue` that every child's log
handler puts records on, read by a thread in the parent. A queue's put is written to its
pipe by a feeder thread under the queue's write lock, a semaphore shared by every
process; a child SIGKILLed while its feeder holds that lock leaves it held for good.

1. 30 children spam log records into the shared queue; they are SIGKILLed mid-flood.
2. A healthy child logs 100 lines and exits (it should take well under a second).
3. Reported: whether the healthy child is still alive after 10 s, and how many of its
   100 lines arrived. Then the same with corral's design, a socket per child: a killed
   child breaks only its own socket.

Each run is a race (the lock must be held at the moment of a kill), so it is repeated
up to --rounds times until the shared queue jams; the figures say how many rounds it
took. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from typing import Any

SPAMMERS = 30
LINES = 100
PATIENCE = 10.0  # seconds the healthy child gets


def _spam_queue(queue: Any) -> None:
    log = logging.getLogger("spam")
    log.handlers[:] = [logging.handlers.QueueHandler(queue)]
    log.setLevel(logging.INFO)
    while True:  # ends with SIGKILL
        log.info("spam %s", "x" * 200)


def _healthy_queue(queue: Any) -> None:
    log = logging.getLogger("healthy")
    log.handlers[:] = [logging.handlers.QueueHandler(queue)]
    log.setLevel(logging.INFO)
    for i in range(LINES):
        log.info("healthy %d", i)
    # exiting joins the queue's feeder thread: it waits for the write lock


def shared_queue_round(ctx: Any) -> dict[str, Any]:
    queue = ctx.Queue()
    healthy_lines = 0
    stop = threading.Event()

    def listen() -> None:
        nonlocal healthy_lines
        while not stop.is_set():  # ends when the round is over
            try:
                record = queue.get(timeout=0.1)
            except Exception:
                continue
            if record.getMessage().startswith("healthy"):
                healthy_lines += 1

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    spammers = [ctx.Process(target=_spam_queue, args=(queue,)) for _ in range(SPAMMERS)]
    for p in spammers:
        p.start()
    time.sleep(1.0)
    for p in spammers:
        os.kill(p.pid, signal.SIGKILL)
    for p in spammers:
        p.join()
    healthy = ctx.Process(target=_healthy_queue, args=(queue,))
    started = time.monotonic()
    healthy.start()
    healthy.join(PATIENCE)
    alive = healthy.is_alive()
    took = time.monotonic() - started
    if alive:
        os.kill(healthy.pid, signal.SIGKILL)
        healthy.join()
    time.sleep(0.5)
    stop.set()
    listener.join()
    return {
        "healthy_alive_after_s": PATIENCE if alive else None,
        "healthy_exit_s": None if alive else round(took, 2),
        "healthy_lines": healthy_lines,
        "jammed": alive or healthy_lines < LINES,
    }


def _spam_socket(sock: socket.socket) -> None:
    while True:  # ends with SIGKILL
        sock.sendall(b"spam " + b"x" * 200 + b"\n")


def _healthy_socket(sock: socket.socket) -> None:
    for i in range(LINES):
        sock.sendall(f"healthy {i}\n".encode())
    sock.close()


def socket_round(ctx: Any) -> dict[str, Any]:
    pairs = [socket.socketpair() for _ in range(SPAMMERS + 1)]
    readers: list[threading.Thread] = []
    counts = [0] * len(pairs)

    def drain(i: int, sock: socket.socket) -> None:
        data = b""
        while chunk := sock.recv(65536):  # ends when the child's end closes
            data += chunk
            if i < SPAMMERS:
                data = data[-256:]
        counts[i] = data.count(b"healthy")

    for i, (ours, _) in enumerate(pairs):
        t = threading.Thread(target=drain, args=(i, ours), daemon=True)
        t.start()
        readers.append(t)
    spammers = [ctx.Process(target=_spam_socket, args=(pairs[i][1],)) for i in range(SPAMMERS)]
    for p in spammers:
        p.start()
    time.sleep(1.0)
    for p in spammers:
        os.kill(p.pid, signal.SIGKILL)
    for p in spammers:
        p.join()
    healthy = ctx.Process(target=_healthy_socket, args=(pairs[-1][1],))
    started = time.monotonic()
    healthy.start()
    healthy.join(PATIENCE)
    alive = healthy.is_alive()
    took = time.monotonic() - started
    if alive:
        os.kill(healthy.pid, signal.SIGKILL)
        healthy.join()
    for _, theirs in pairs:
        theirs.close()
    readers[-1].join(5)
    return {
        "healthy_alive_after_s": PATIENCE if alive else None,
        "healthy_exit_s": None if alive else round(took, 2),
        "healthy_lines": counts[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="tries until the queue jams")
    args = parser.parse_args()
    ctx = mp.get_context("fork")
    shared: dict[str, Any] = {}
    for round_ in range(1, args.rounds + 1):
        shared = shared_queue_round(ctx) | {"round": round_}
        if shared["jammed"]:
            break
    print(json.dumps({"shared_queue": shared, "socket_per_child": socket_round(ctx)}, indent=2))


if __name__ == "__main__":
    main()
