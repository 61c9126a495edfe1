"""The baseline: a single-process agent gateway, the design corral replaces.

One aiohttp server with corral's `POST /v1/messages?wait=SECONDS` API that runs
the SAME agent code (corral's chaos agent, imported) in its own process, one
asyncio loop for every session. Modes:

- `threads` (the default, and the one the benchmarks use): every turn runs the
  sync agent with `loop.run_in_executor(None, ...)` (asyncio's default thread
  pool, as `asyncio.to_thread` does) under a per-turn `asyncio.wait_for`
  deadline, and turns of one session run one at a time. This is the careful
  version of a naive gateway: a turn past its deadline is answered with an
  error, but Python cannot stop a thread, so the agent code keeps running: a
  hung turn keeps its pool thread, a spinning or flooding one keeps competing
  for the GIL, memory a turn allocated stays allocated.
- `loop`: the agent is called directly on the event loop, as the naivest
  gateway does; the first blocking turn stops every session.
- `echo`: no agent: answers every message with its own text at once. The
  "bare aiohttp" ceiling for the throughput benchmark.

Nothing is stored: the baseline does less work per message than corral
(no SQLite, no worker process), which favours it in absolute figures.

Run as: python -m bench.baseline --mode threads --port PORT [--turn-timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from corral.protocol.types import Origin, Turn
from corral.worker.agents.chaos import agent as chaos_agent

MAX_REPLIES_SHOWN = 100  # a ?wait answer pages the replies; a flooding turn keeps making more


class TurnContext:
    """What the gateway hands the agent: the same surface as corral's worker Context."""

    def __init__(self, turn: Turn, state_dir: Path) -> None:
        self.session = turn.session
        self.options: dict[str, Any] = {}
        self.state_dir = state_dir
        self.log = logging.getLogger("gateway.agent")
        self.replies: list[str] = []

    def reply(self, text: str) -> None:
        self.replies.append(text)  # no output bound: the naive gateway has none

    def progress(self, note: str = "") -> None:
        pass

    def history(self) -> list[Any]:
        return []


class Gateway:
    def __init__(self, mode: str, turn_timeout: float, state_dir: Path) -> None:
        self.mode = mode
        self.turn_timeout = turn_timeout
        self.state_dir = state_dir
        self.locks: dict[str, asyncio.Lock] = {}

    async def post_message(self, request: web.Request) -> web.Response:
        body = await request.json()
        session, text = body["session"], body["text"]
        message_id = body.get("id") or uuid.uuid4().hex
        if self.mode == "echo":
            return _result(message_id, session, "done", [(text, "reply")])
        turn = Turn(id=message_id, session=session, text=text, origin=Origin(channel="http"))
        ctx = TurnContext(turn, self.state_dir)
        lock = self.locks.setdefault(session, asyncio.Lock())
        async with lock:
            error = await self.run_turn(turn, ctx)
        replies = [(t, "reply") for t in ctx.replies[:MAX_REPLIES_SHOWN]]
        if error is not None:
            replies.append((error, "error"))
        return _result(message_id, session, "error" if error else "done", replies)

    async def run_turn(self, turn: Turn, ctx: TurnContext) -> str | None:
        try:
            if self.mode == "loop":
                chaos_agent(turn, ctx)  # type: ignore[arg-type]
                return None
            job = asyncio.get_running_loop().run_in_executor(None, chaos_agent, turn, ctx)
            # the thread cannot be stopped: at the deadline the user is answered, the code runs on
            await asyncio.wait_for(asyncio.shield(job), self.turn_timeout)
            return None
        except TimeoutError:
            return f"turn took longer than {self.turn_timeout:g}s"
        except Exception as e:
            return f"the agent raised {type(e).__name__}: {e}"


def _result(
    message_id: str, session: str, status: str, replies: list[tuple[str, str]]
) -> web.Response:
    return web.json_response(
        {
            "id": message_id,
            "session": session,
            "status": status,
            "replies": [{"text": t, "kind": k} for t, k in replies],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("threads", "loop", "echo"), default="threads")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--turn-timeout", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-gateway-") as tmp:
        gateway = Gateway(args.mode, args.turn_timeout, Path(tmp))
        app = web.Application()
        app.router.add_post("/v1/messages", gateway.post_message)
        web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
