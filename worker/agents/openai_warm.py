"""The openai agent's warm-up: what the zygote builds once, so that every worker shares it.

A worker that builds its HTTP client and sends its first request itself pays for
it in memory of its own: the SDK's and the transport's objects it touches the first
time, code the interpreter specialises on first runs, the CA certificates parsed
for its TLS context. Done once in the zygote before it forks, all of that is shared
copy-on-write by every worker (measured by `python -m bench --only memory`).

`warm_up(options)`:
1. builds the TLS context every client of the process tree uses (openai.tls_context);
2. rehearses turns, streamed and whole, through the SDK and its real HTTP transport
   against a rehearsal endpoint: a loopback server on 127.0.0.1 with canned answers,
   on a thread of its own that ends with the rehearsal. Nothing is sent anywhere
   else; the rehearsal's client and its connection are closed;
3. builds the client a turn will use, for the configured endpoint (openai.client_for),
   the request the SDK builds on it, which every turn copies (openai.chat_request), and
   the options and key every turn uses (openai.configured).

Nothing that must not cross a fork is left: the configured client has no connection
yet (its pool opens them in the worker, on the first turn) and its pool's lock is not
held (the zygote has no other thread, and nothing runs while it forks); the
rehearsal's thread has ended (the zygote refuses to fork while one runs); no event
loop is left.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from typing import Any

from corral.worker.agents import openai as agent
from corral.worker.runtime import TurnError

REHEARSALS = 10  # turns of each kind: the interpreter specialises code after a few runs
IO_TIMEOUT = 5.0  # the rehearsal endpoint's wait for a request; the warm-up's bound

_CHUNKS = (
    b'data: {"id":"w","object":"chat.completion.chunk","created":0,"model":"w",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"ok"},"finish_reason":null}]}'
    b"\n\n"
    b'data: {"id":"w","object":"chat.completion.chunk","created":0,"model":"w",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
_WHOLE = (
    b'{"id":"w","object":"chat.completion","created":0,"model":"w","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
_LENGTH_RE = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')


class _Quiet:
    """A Context for the rehearsal's turns: nothing is reported anywhere."""

    log = logging.getLogger("corral.agent.warm_up")

    def progress(self, note: str = "") -> None:
        pass


class RehearsalEndpoint:
    """A loopback HTTP/1.1 server with canned chat answers, on a thread of its own."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, name="corral-openai-warm-up")

    def __enter__(self) -> RehearsalEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # on Linux, shutdown wakes the thread's accept() (close alone would not)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(IO_TIMEOUT * 2)

    def _serve(self) -> None:
        while True:  # ends when the listener is shut down (or at a timeout)
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                try:
                    self._answer(conn)
                except OSError:
                    continue

    def _answer(self, conn: socket.socket) -> None:
        buf = b""
        while True:  # ends when the client closes the connection (or a timeout)
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            match = _LENGTH_RE.search(head)
            length = int(match[1]) if match else 0
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            streamed = _STREAM_RE.search(body) is not None
            payload = _CHUNKS if streamed else _WHOLE
            kind = b"text/event-stream" if streamed else b"application/json"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ncontent-length: "
                + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )  # fmt: skip


def rehearse() -> None:
    """Turns, streamed and whole, through the SDK and its transport, on loopback."""
    options = agent.Options(model="warm-up")
    quiet: Any = _Quiet()
    messages = [{"role": "user", "content": "warm-up"}]
    with RehearsalEndpoint() as endpoint:
        client = agent.openai.OpenAI(
            base_url=endpoint.url,
            api_key=agent.PLACEHOLDER_KEY,
            max_retries=0,
            timeout=IO_TIMEOUT,
            http_client=agent.openai.DefaultHttpxClient(
                verify=agent.tls_context(), timeout=IO_TIMEOUT
            ),
        )
        try:
            for _ in range(REHEARSALS):
                args = agent.request_args(options, messages, {})
                agent.streamed_answer(client, args, quiet)
                agent.whole_answer(client, args, quiet)
        finally:
            agent._chat_requests.pop(id(client), None)
            client.close()


def warm_up(options: dict[str, Any]) -> None:
    """See the module's docstring."""
    if agent.openai is None:
        return
    agent.tls_context()
    try:
        rehearse()
    except Exception as e:  # only memory is lost: say so, and build the client anyway
        logging.getLogger("corral.agent").warning("openai warm-up: rehearsal failed: %s", e)
    try:
        configured, key = agent.configured(options)
    except TurnError:
        return  # each turn will say what is wrong with the options
    client = agent.client_for(configured, key)
    client.chat.completions  # noqa: B018 - built on first use
    agent.chat_request(client)  # the request a streamed turn copies
