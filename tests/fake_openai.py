"""A fake OpenAI-compatible chat endpoint for tests, scripted by the last user message.

It listens on 127.0.0.1 only, on a port the kernel picks, in an event loop on a thread
of its own; `stop()` releases every held request and joins that thread. Every request
to /v1/chat/completions is recorded (path, Authorization header, JSON body).

What it answers depends on the text of the last user message, streamed or not as the
request asks:

    status NNN           HTTP NNN with an OpenAI-style error body (a 401 quotes the key
                         it was given, as real endpoints do in part; a 429 says
                         Retry-After: 1)
    stall                three chunks of a streamed answer, then nothing
    hang                 reads the request and never answers
    drip                 a chunk every 0.3 s, forever
    sse-error            one chunk, then an error event inside the stream
    tool NAME JSON       a call of tool NAME with arguments JSON; once the tool's result
                         has come back: "tool said: <result>"
    tool-loop NAME JSON  a call of tool NAME, whatever came back
    anything else        "echo: <text>"

With `api_key` set, a request without "Authorization: Bearer <api_key>" gets a 401.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

from aiohttp import web

HELD_FOREVER = 3600.0  # "forever" for a held request: stop() releases it long before


class FakeOpenAI:
    """The fake endpoint; `base_url` is what an agent's options should point at."""

    def __init__(self, api_key: str = "") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-openai")
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Release held requests, close the server, and join its thread."""
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def chat_requests(self, starting: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the chat requests so far; with `starting`, those whose user text starts so."""
        with self._lock:
            bodies = [r["body"] for r in self.requests]
        if starting is None:
            return bodies
        return [b for b in bodies if _last_user_text(b).startswith(starting)]

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _stop(self) -> None:
        assert self._stopping is not None and self._runner is not None
        self._stopping.set()
        await self._runner.cleanup()

    async def _hold(self, seconds: float = HELD_FOREVER) -> bool:
        """Wait `seconds` or until stop; True if stopping."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        authorization = request.headers.get("Authorization", "")
        with self._lock:
            self.requests.append(
                {"path": request.path, "authorization": authorization, "body": body}
            )
        if self.api_key and authorization != f"Bearer {self.api_key}":
            return _error(
                401, f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}"
            )
        text = _last_user_text(body)
        word, _, rest = text.partition(" ")
        stream = bool(body.get("stream"))
        match word:
            case "status":
                status = int(rest)
                if status == 401:
                    return _error(
                        401, f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}"
                    )
                return _error(status, f"fake failure {status}")
            case "hang":
                await self._hold()
                return web.Response(status=503)
            case "stall" | "drip" | "sse-error" if stream:
                return await self._stream_forever(request, word)
            case "tool" | "tool-loop":
                name, _, arguments = rest.partition(" ")
                last = body["messages"][-1]
                if word == "tool" and last["role"] == "tool":
                    return await self._answer(request, f"tool said: {last['content']}", stream)
                return await self._tool_call(request, name, arguments or "{}", stream)
        return await self._answer(request, f"echo: {text}", stream)

    async def _answer(self, request: web.Request, text: str, stream: bool) -> web.StreamResponse:
        if not stream:
            return web.json_response(_completion({"role": "assistant", "content": text}, "stop"))
        response = await _start_stream(request)
        await _send(response, _chunk({"role": "assistant", "content": ""}))
        for piece in _pieces(text):
            await _send(response, _chunk({"content": piece}))
        await _send(response, _chunk({}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _tool_call(
        self, request: web.Request, name: str, arguments: str, stream: bool
    ) -> web.StreamResponse:
        call_id = f"call_{len(self.requests)}"
        if not stream:
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return web.json_response(_completion(message, "tool_calls"))
        response = await _start_stream(request)
        first = {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        await _send(response, _chunk({"role": "assistant", "tool_calls": [first]}))
        for piece in _pieces(arguments, size=4):
            await _send(
                response, _chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            )
        await _send(response, _chunk({}, "tool_calls"))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _stream_forever(self, request: web.Request, word: str) -> web.StreamResponse:
        response = await _start_stream(request)
        if word == "sse-error":
            await _send(response, _chunk({"role": "assistant", "content": "par"}))
            await _send(
                response, {"error": {"message": "fake failure mid-stream", "type": "server_error"}}
            )
            return response
        if word == "stall":
            for piece in ("this ", "will ", "stall"):
                await _send(response, _chunk({"content": piece}))
            await self._hold()
            return response
        n = 0
        while not await self._hold(0.3):  # drip: ends at stop, or when the client is gone
            n += 1
            try:
                await _send(response, _chunk({"content": f"{n} "}))
            except (ConnectionError, RuntimeError):
                break
        return response


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else {}
    body = {"error": {"message": message, "type": "fake_error", "param": None, "code": str(status)}}
    return web.json_response(body, status=status, headers=headers)


def _completion(message: dict[str, Any], finish_reason: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


async def _start_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())
