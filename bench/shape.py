"""python -m bench.shape [--rounds N] [--seconds S]: how fast corral's shape can be.

Issue 18 asks for 0.5 of a bare aiohttp echo server's throughput. This measures what
the shape allows before any of corral's own work: a minimal server that does only
what the shape forces on a message (an HTTP request in, a durable SQLite insert
committed in a group on a store thread, a frame to the session's own worker process
and its reply frame back, the reply and the finish committed in a second group, the
response) under the throughput benchmark's load (16 sessions, closed loop, one pooled
client), beside the bare aiohttp echo server and corral itself, in turns:

- `minimal`: that server with a table of two indexed keys per kind, aiohttp's
  low-level server in front (no application, router or middleware);
- `minimal, corral's schema`: the same with corral's tables and indexes and its three
  statements (accept, reply, finish with its replies' check);
- `minimal, corral's schema, uuid4 ids`: message ids as corral made them before
  UUIDv7 (a random page of each id index a message);
- `corral`: `corral serve` with the echo agent, as in `--only throughput`.

Figures: messages/s, the ratio to bare, the server's CPU per message (workers apart).
The minimal server is not corral: it has no bounds, no retries, no errors, no
metrics; it shows where the time of the shape is, not what corral should be.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import socket
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from bench.servers import (
    BaselineServer,
    CorralServer,
    free_port,
    kill_by_pid,
    launch,
    stop_all,
    wait_listening,
)
from bench.throughput import closed_loop
from corral.supervisor.store import _SCHEMA as CORRAL_SCHEMA
from corral.supervisor.store_rows import new_message_id

HEAD = struct.Struct(">I")
MINIMAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, session TEXT, text TEXT, state TEXT);
CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, message_id TEXT, text TEXT);
"""
ORIGIN = b'{"channel":"http"}'


class Post(msgspec.Struct):
    session: str
    text: str


_encode = msgspec.json.Encoder().encode


def worker(sock: socket.socket) -> None:
    """A session's worker: each frame's text back as one reply frame, then a done frame."""
    stream = sock.makefile("rb", buffering=0)
    while head := stream.read(HEAD.size):  # ends when the server closes its end
        (n,) = HEAD.unpack(head)
        out = b"R" + stream.read(n)
        sock.sendall(HEAD.pack(len(out)) + out + HEAD.pack(1) + b"D")
    os._exit(0)


class Worker(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.replies: list[bytes] = []
        self.waiter: asyncio.Future[list[bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= HEAD.size:  # ends when no whole frame is left
            (n,) = HEAD.unpack_from(self.buf)
            if len(self.buf) < HEAD.size + n:
                break
            frame, self.buf = self.buf[HEAD.size : HEAD.size + n], self.buf[HEAD.size + n :]
            if frame[:1] == b"R":
                self.replies.append(frame[1:])
            elif self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.replies)
                self.replies = []


class Store(threading.Thread):
    """Statements queued by the loop, run in groups: one transaction, one commit each."""

    def __init__(self, path: Path, schema: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(daemon=True)
        self.path, self.schema, self.loop = path, schema, loop
        self.queue: queue.SimpleQueue[tuple[str, tuple[Any, ...], asyncio.Future[None]]]
        self.queue = queue.SimpleQueue()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        if self.schema == "minimal":
            conn.executescript(MINIMAL_SCHEMA)
        else:
            conn.executescript(CORRAL_SCHEMA)
        while True:  # a daemon thread: ends with the process
            ops = [self.queue.get()]
            while not self.queue.empty():  # ends when the queue is drained
                ops.append(self.queue.get_nowait())
            conn.execute("BEGIN IMMEDIATE")
            for sql, args, _ in ops:
                conn.execute(sql, args).fetchall()
            conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(self.settle, [fut for _, _, fut in ops])

    @staticmethod
    def settle(futures: list[asyncio.Future[None]]) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    def submit(self, sql: str, args: tuple[Any, ...]) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        self.queue.put((sql, args, fut))
        return fut


class Minimal:
    def __init__(self, store: Store, schema: str, ids: str) -> None:
        self.store, self.schema, self.ids = store, schema, ids
        self.workers: dict[str, Worker] = {}

    def new_id(self) -> str:
        return uuid.uuid4().hex if self.ids == "uuid4" else new_message_id()

    async def worker(self, session: str) -> Worker:
        if (w := self.workers.get(session)) is None:
            ours, theirs = socket.socketpair()
            if os.fork() == 0:
                ours.close()
                worker(theirs)
            theirs.close()
            _, w = await asyncio.get_running_loop().create_connection(Worker, sock=ours)
            self.workers[session] = w
        return w

    async def handle(self, request: web.BaseRequest) -> web.Response:
        m = msgspec.json.decode(await request.read(), type=Post)
        mid, now = self.new_id(), time.time()
        corral = self.schema == "corral"
        if corral:
            accept = (
                "INSERT INTO messages (id, session, text, origin, accepted_at, attempts) "
                "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (id) DO NOTHING RETURNING seq",
                (mid, m.session, m.text, ORIGIN, now),
            )
        else:
            accept = ("INSERT INTO messages VALUES (?, ?, ?, 'pending')", (mid, m.session, m.text))
        await self.store.submit(*accept)
        w = await self.worker(m.session)
        assert w.transport is not None
        w.waiter = asyncio.get_running_loop().create_future()
        data = m.text.encode()
        w.transport.write(HEAD.pack(len(data)) + data)
        replies = await w.waiter
        for i, r in enumerate(replies):
            if corral:
                self.store.submit(
                    "INSERT OR IGNORE INTO replies (id, message_id, session, idx, text, kind, "
                    "channel, origin, created_at, delivery, markup) "
                    "VALUES (?, ?, ?, ?, ?, 'reply', 'http', ?, ?, 'fetched', '')",
                    (f"{mid}:{i}", mid, m.session, i, r.decode(), ORIGIN, time.time()),
                )
            else:
                self.store.submit("INSERT INTO replies VALUES (?, ?, ?)", (f"{mid}:{i}", mid, r))
        if corral:
            finish = (
                "UPDATE messages SET state = 'done', finished_at = ? WHERE id = ? "
                "RETURNING (SELECT count(*) FROM replies WHERE id = ?)",
                (time.time(), mid, f"{mid}:0"),
            )
        else:
            finish = ("UPDATE messages SET state = 'done' WHERE id = ?", (mid,))
        await self.store.submit(*finish)
        body = {
            "id": mid,
            "session": m.session,
            "status": "done",
            "replies": [{"text": r.decode(), "kind": "reply"} for r in replies],
        }
        return web.Response(body=_encode(body), content_type="application/json")


async def serve(port: int, db: Path, schema: str, ids: str) -> None:
    store = Store(db, schema, asyncio.get_running_loop())
    store.start()
    runner = web.ServerRunner(web.Server(Minimal(store, schema, ids).handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until killed


class MinimalServer:
    def __init__(self, tmp: Path, name: str, schema: str, ids: str) -> None:
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{name}.log"
        self.argv = [
            sys.executable, "-m", "bench.shape", "serve", "--port", str(self.port),
            "--db", str(tmp / f"{name}.db"), "--schema", schema, "--ids", ids,
        ]  # fmt: skip
        self.proc: Any = None

    async def start(self) -> MinimalServer:
        self.proc = launch(self.argv, self.name, self.log_path)
        await wait_listening(self.proc, [self.port], 30, self.log_path)
        return self


async def measure(rounds: int, seconds: float, tmp: Path) -> None:
    kinds = {
        "minimal": ("minimal", "uuid7"),
        "minimal, corral's schema": ("corral", "uuid7"),
        "minimal, corral's schema, uuid4 ids": ("corral", "uuid4"),
    }
    names = ["bare aiohttp", *kinds, "corral"]
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            server: Any
            if name == "bare aiohttp":
                server = BaselineServer(tmp, f"bare-{r}", "echo", 5.0)
            elif name == "corral":
                config = {"supervisor": {"idle_timeout": "1h"}}
                server = CorralServer(tmp, f"corral-{r}", config=config)
            else:
                server = MinimalServer(tmp, f"minimal-{names.index(name)}-{r}", *kinds[name])
            try:
                await server.start()
                got = await closed_loop(server.base, server.proc.pid, seconds, 1.0)
            finally:
                if isinstance(server, CorralServer):
                    await server.stop()
                else:
                    kill_by_pid(server.proc)
            rates[name].append(got["messages_per_s"])
            cpu[name].append(got["server_cpu_us_per_message"] or 0)
            print(f"round {r + 1}: {name}: {got['messages_per_s']:.0f}/s", file=sys.stderr)
    bare = statistics.median(rates["bare aiohttp"])
    print(f"{'server':<38}{'messages/s':>11}{'ratio':>7}{'server CPU/msg':>16}")
    for name in names:
        rate = statistics.median(rates[name])
        used = statistics.median(cpu[name])
        print(f"{name:<38}{rate:>11.0f}{rate / bare:>7.2f}{used:>13.0f} us")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shape")
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("serve", help="run the minimal server (what the benchmark starts)")
    one.add_argument("--port", type=int, required=True)
    one.add_argument("--db", type=Path, required=True)
    one.add_argument("--schema", choices=("minimal", "corral"), default="minimal")
    one.add_argument("--ids", choices=("uuid7", "uuid4"), default="uuid7")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port, args.db, args.schema, args.ids))
        return 0
    with tempfile.TemporaryDirectory(prefix="corral-shape-") as tmp:
        try:
            asyncio.run(measure(args.rounds, args.seconds, Path(tmp)))
        finally:
            stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
