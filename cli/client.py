"""How the `corral` commands reach a running supervisor: its control socket (HTTP+JSON
on a Unix socket) and, for `corral send`, the HTTP channel. One request per command,
under a hard deadline; answers are decoded into the Structs of `protocol.control`.

Every failure is a `click.ClickException` whose message says what to do.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import aiohttp
import click
import msgspec

from corral.protocol.control import (
    DeadLetterList,
    DrainResult,
    ErrorBody,
    History,
    KillResult,
    MessageResult,
    ReloadResult,
    RetryResult,
    SessionInfo,
    SessionList,
    Status,
)
from corral.supervisor.config import Config, split_listen

DEFAULT_TIMEOUT = 5.0
RELOAD_TIME = 60.0  # on top of --timeout: a new agent's zygote may take this long to start
# exit codes of every client command (documented in `corral --help` and the README)
EXIT_OK = 0
EXIT_FAILED = 1  # corral refused, could not be reached, or the turn ended with an error
EXIT_USAGE = 2  # bad options or arguments (click's own code)
EXIT_PENDING = 3  # `send --wait`: no reply within the wait; the message is still queued

T = TypeVar("T")


@dataclass(frozen=True)
class Answer(Generic[T]):
    """A successful answer, decoded; `plain` is the same body as plain JSON values,
    which `--json` prints as corral sent it."""

    body: T
    plain: Any


@dataclass(frozen=True)
class Refused:
    """An answer with an error status (4xx or 5xx)."""

    status: int
    error: str
    plain: Any


def _request(
    method: str,
    url: str,
    deadline: float,
    where: str,
    unix_socket: Path | None = None,
    notice: tuple[float, Callable[[], None]] | None = None,
    late: str = "",
    **kwargs: Any,
) -> tuple[int, bytes]:
    """The status and body of one request; `where` names the server in messages.
    With `notice` (seconds, callback), the callback runs if no answer came by then;
    `late` is added to the message when no answer came within the deadline."""

    async def go() -> tuple[int, bytes]:
        connector = aiohttp.UnixConnector(path=str(unix_socket)) if unix_socket else None
        timeout = aiohttp.ClientTimeout(total=deadline)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with http.request(method, url, **kwargs) as resp:
                return resp.status, await resp.read()

    async def noticed() -> tuple[int, bytes]:
        task = asyncio.ensure_future(go())
        if notice is not None:
            done, _ = await asyncio.wait({task}, timeout=notice[0])
            if not done:
                notice[1]()
        return await task

    try:
        return asyncio.run(noticed())
    except TimeoutError:  # first: a TimeoutError is an OSError, but corral is there
        raise click.ClickException(
            f"corral did not answer within {deadline:g}s {where}{late}"
        ) from None
    except (aiohttp.ClientError, OSError) as e:
        raise click.ClickException(
            f"cannot reach corral {where}: {e}. Is 'corral serve' running?"
        ) from None


def _decode(kind: type[T], status: int, raw: bytes, where: str) -> Answer[T] | Refused:
    try:
        plain = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        if status >= 400:  # an error page not written by corral itself (a proxy, aiohttp)
            text = raw.decode(errors="replace").strip()
            return Refused(status, text, text)
        raise click.ClickException(
            f"corral answered {where} with a body that is not JSON: {raw[:200]!r}"
        ) from None
    if status >= 400:
        try:
            error = msgspec.convert(plain, ErrorBody).error
        except msgspec.ValidationError:
            error = str(plain)
        return Refused(status, error, plain)
    try:
        return Answer(msgspec.convert(plain, kind), plain)
    except msgspec.ValidationError as e:
        # a supervisor of another version than this command
        raise click.ClickException(
            f"corral answered {where} with an unexpected body: {e}"
        ) from None


def _quote(session: str) -> str:
    return quote(session, safe="")


class ControlClient:
    """Talks to `corral serve` over its control socket, with a hard deadline."""

    def __init__(self, config: Config, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.path = config.find_control_socket()
        self.timeout = timeout

    def status(self) -> Answer[Status]:
        return self._call(Status, "GET", "/v1/status")

    def sessions(self) -> Answer[SessionList]:
        return self._call(SessionList, "GET", "/v1/sessions")

    def session(self, session: str) -> Answer[SessionInfo]:
        return self._call(SessionInfo, "GET", f"/v1/sessions/{_quote(session)}")

    def sessions_all(self) -> Answer[SessionList]:
        return self._call(SessionList, "GET", "/v1/sessions", {"all": "1"})

    def history(self, session: str, limit: int | None) -> Answer[History]:
        params = {"limit": str(limit)} if limit is not None else None
        return self._call(History, "GET", f"/v1/sessions/{_quote(session)}/history", params)

    def dead_letters(self, limit: int | None) -> Answer[DeadLetterList]:
        params = {"limit": str(limit)} if limit is not None else None
        return self._call(DeadLetterList, "GET", "/v1/dead-letters", params)

    def retry_dead_letters(self, ids: list[str], every: bool) -> Answer[RetryResult]:
        body = {"all": True} if every else {"ids": ids}
        return self._call(RetryResult, "POST", "/v1/dead-letters/retry", json=body)

    def kill(
        self,
        session: str,
        force: bool,
        kill_grace: float | None = None,
        notice: tuple[float, Callable[[], None]] | None = None,
    ) -> Answer[KillResult]:
        """corral answers once the worker is reaped: up to `kill_grace` (the server's,
        from `status`; else this config's) after SIGTERM."""
        grace = float(self.config.supervisor.kill_grace) if kill_grace is None else kill_grace
        return self._call(
            KillResult,
            "POST",
            f"/v1/sessions/{_quote(session)}/kill",
            {"force": "1"} if force else None,
            extra_time=grace + 3,
            notice=notice,
        )

    def release(self, session: str) -> Answer[SessionInfo]:
        return self._call(SessionInfo, "POST", f"/v1/sessions/{_quote(session)}/release")

    def drain(self, drain_timeout: float | None) -> Answer[DrainResult]:
        params = {"timeout": str(drain_timeout)} if drain_timeout is not None else None
        return self._call(DrainResult, "POST", "/v1/drain", params)

    def reload(self) -> Answer[ReloadResult]:
        """Ask corral to re-read its config; a refusal (409) names the key."""
        # loading a new agent can take as long as a zygote start
        return self._call(ReloadResult, "POST", "/v1/reload", extra_time=RELOAD_TIME, refused=True)

    def wait_stopped(
        self, bound: float, every: tuple[float, Callable[[], None]] | None = None
    ) -> bool:
        """Whether the supervisor exited (its socket is gone) within `bound` seconds;
        with `every` (seconds, callback), the callback runs that often meanwhile."""
        deadline = time.monotonic() + bound
        next_call = time.monotonic()
        while self.path.exists() and time.monotonic() < deadline:  # ends at the deadline
            if every is not None and time.monotonic() >= next_call:
                every[1]()
                next_call = time.monotonic() + every[0]
            time.sleep(0.1)
        return not self.path.exists()

    def _call(
        self,
        kind: type[T],
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        extra_time: float = 0.0,
        notice: tuple[float, Callable[[], None]] | None = None,
        json: Any = None,
        refused: bool = False,
    ) -> Answer[T]:
        if not self.path.exists():
            raise click.ClickException(
                f"control socket {self.path} not found: is 'corral serve' running?"
            )
        where = f"on {self.path}"
        status, raw = _request(
            method,
            f"http://corral{path}",
            self.timeout + extra_time,
            where,
            unix_socket=self.path,
            notice=notice,
            params=params,
            json=json,
        )
        answer = _decode(kind, status, raw, where)
        if isinstance(answer, Refused):
            if refused and status == 409:  # a refusal with a body of `kind` (reload)
                return Answer(msgspec.convert(answer.plain, kind), answer.plain)
            raise click.ClickException(answer.error)
        return answer


def http_base(config: Config) -> str:
    """The URL of the HTTP channel, as seen from this host."""
    host, port = split_listen(config.channels.http.listen, "channels.http.listen")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def post_message(
    config: Config,
    session: str,
    text: str,
    message_id: str | None,
    wait: float | None,
    timeout: float,
) -> Answer[MessageResult] | Refused:
    """POST a message to the HTTP channel; with `wait`, corral holds the answer up to
    `wait` seconds for the replies, so the deadline is `timeout` on top of it."""
    base = http_base(config)
    # always an id: a send that timed out can be retried as the same message
    message_id = message_id or new_message_id()
    body = {"session": session, "text": text, "id": message_id}
    headers = {}
    if token := os.environ.get("CORRAL_TOKEN") or config.channels.http.token:
        headers["Authorization"] = f"Bearer {token}"
    where = f"at {base}"
    status, raw = _request(
        "POST",
        base + "/v1/messages",
        timeout + (wait or 0),
        where,
        json=body,
        params={"wait": str(wait)} if wait is not None else {},
        headers=headers,
        late=(
            f". The message may have been accepted: retry with --id {message_id} "
            "so that the retry is the same message, not a second one"
        ),
    )
    return _decode(MessageResult, status, raw, where)


def new_message_id() -> str:
    return uuid.uuid4().hex


class ProgressNotes:
    """While `send --wait` waits, the agent's progress notes for that message, printed
    as they come: read from the control socket twice a second (when this host has it)."""

    INTERVAL = 0.5

    def __init__(self, config: Config, session: str, message_id: str, show: Callable[[str], None]):
        self.client = ControlClient(config, timeout=1.0)
        self.session = session
        self.message_id = message_id
        self.show = show
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def __enter__(self) -> ProgressNotes:
        if self.client.path.exists():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        last = None
        while not self._done.wait(self.INTERVAL):  # ends when the send returns
            try:
                info = self.client.session(self.session).body
            except click.ClickException:
                continue  # not known yet, or corral is busy: the send itself reports
            if info.turn == self.message_id and info.progress and info.progress != last:
                last = info.progress
                if not self._done.is_set():
                    self.show(info.progress)
