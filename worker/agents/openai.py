"""An agent for any OpenAI-compatible chat endpoint: OpenAI, vLLM, Ollama, llama.cpp, LiteLLM.

It needs the official SDK: `pip install 'corral[openai]'`. Each turn is sent with the
session's earlier exchanges; the answer is one reply. Options (`[agent.options]`):

    model            required: the model name the endpoint knows, e.g. "llama3.1"
    base_url         "https://api.openai.com/v1"; Ollama: "http://127.0.0.1:11434/v1"
    api_key_env      "": the NAME of the environment variable that holds the key, never
                     the key itself. Unset, a local server gets the placeholder key
                     "unused"; api.openai.com is refused without a key.
    system           "": a system prompt, sent first in every request
    max_history      20: earlier messages of the session sent with the turn (0: none).
                     Turns that ended in an error are left out whole, so user and
                     assistant messages alternate (strict chat templates require it).
    temperature      unset: the endpoint's default
    tools            []: functions the model may call, "package.module:function"
    max_tool_rounds  8: rounds of tool calls in one turn; asking for one more ends the
                     turn with an error
    stream           true: stream the answer, so progress is reported as chunks arrive
    max_retries      2: retries after a 429, a 5xx or a failed connection, each reported
                     as progress and waiting at most 8 s (the endpoint's Retry-After, or
                     backoff); a longer Retry-After is an error at once. The SDK's own
                     retries are off, so none of them is silent.
    timeout          "10m": the HTTP client's own read timeout (connect: 10 s at most).
                     Keep it above `no_progress_timeout`: corral's deadlines, not the
                     client, should end a stalled stream.

Progress: every streamed chunk is progress (reported at most every 0.25 s, because each
report is a frame the supervisor handles). A stream that stalls trips
`no_progress_timeout`, one that never ends trips `turn_timeout`. With `stream = false`
nothing is reported while the endpoint composes its answer, so `no_progress_timeout`
must exceed the longest answer.

Tools: the JSON schema comes from the function's type hints (str, int, float, bool,
list[...], dict, Literal[...], Optional[...]; a parameter with a default or Optional is
not required) and docstring (first paragraph; parameter descriptions from a Google-style
"Args:" section). Tools run in the worker, one at a time; a tool that raises sends its
error text to the model instead of ending the turn.

Errors from the endpoint end the turn with one plain error reply (401, 404, 429, 5xx,
connection refused, ...). The API key is redacted from everything this agent reports.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import os
import random
import re
import ssl
import sys
import time
import traceback
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from corral.protocol.types import HistoryEntry, Turn
from corral.protocol.units import Duration, parse_duration
from corral.worker.runtime import Context, TurnError

try:
    # Imported with the module, so the zygote preloads the SDK (~1 s) once and every
    # forked worker shares it; a missing SDK surfaces as a TurnError on the first turn.
    import openai
    from openai import _base_client

    # the SDK's own HTTP client library (httpx, or its successor httpx2)
    httpx: Any = getattr(_base_client, "httpx2", None) or getattr(_base_client, "httpx")  # noqa: B009
except ImportError:  # pragma: no cover - exercised only without the extra installed
    openai = None  # type: ignore[assignment]
    httpx = None

# The transport logs every request's full URL at INFO; ours is the line that matters.
logging.getLogger("httpx2").setLevel(logging.WARNING)
logging.getLogger("httpx").setLevel(logging.WARNING)


def install_hint() -> str:
    """How to install the SDK into the Python that runs corral: in a checkout (this file
    is worker/agents/openai.py under a pyproject.toml) `pip install -e '.[openai]'`
    there, else the published extra."""
    pip = f"{sys.executable} -m pip install"
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "worker" / "agents").is_dir():
        return (
            "the openai agent needs the OpenAI SDK, which is not installed: "
            f"run `{pip} -e '.[openai]'` in {checkout}"
        )
    return f"the openai agent needs the OpenAI SDK, which is not installed: {pip} 'corral[openai]'"


OPENAI_URL = "https://api.openai.com/v1"
PLACEHOLDER_KEY = "unused"
PROGRESS_EVERY = 0.25  # seconds between progress reports while a stream flows
MAX_RETRY_DELAY = 8.0  # a retry that would wait longer is an error instead
CONNECT_TIMEOUT = 10.0
DETAIL_CHARS = 300  # of the endpoint's own error message, quoted in the error reply
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The `[agent.options]` table, validated."""

    model: str
    base_url: str = OPENAI_URL
    api_key_env: str = ""
    system: str = ""
    max_history: Annotated[int, msgspec.Meta(ge=0)] = 20
    temperature: float | None = None
    tools: tuple[str, ...] = ()
    max_tool_rounds: Annotated[int, msgspec.Meta(ge=1)] = 8
    stream: bool = True
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    timeout: Duration = Duration(600)


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Duration:
        return parse_duration(obj)
    raise NotImplementedError(f"no decoder for {tp}")


def load_options(raw: dict[str, Any]) -> Options:
    """Validate `ctx.options`; a TurnError naming the key if something is wrong."""
    if not raw.get("model"):
        raise TurnError(
            'agent.options.model is not set: name the model to call, e.g. model = "llama3.1"'
        )
    try:
        options = msgspec.convert(raw, Options, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        if m := re.fullmatch(r"Object contains unknown field `(.+)`", str(e)):
            raise TurnError(
                f"agent.options.{m[1]}: unknown option (the openai agent knows "
                f"{', '.join(Options.__struct_fields__)})"
            ) from None
        where = re.sub(r"`\$\.([^`]*)`", r"agent.options.\1", str(e))
        raise TurnError(f"agent.options: {where}") from None
    if urlsplit(options.base_url).scheme not in ("http", "https"):
        raise TurnError(
            f"agent.options.base_url must be an http:// or https:// URL, got {options.base_url!r}"
        )
    return options


def shown_url(url: str) -> str:
    """The URL without any user:password part, fit for error replies and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def api_key(options: Options) -> str:
    """The key from the variable named by api_key_env, or a placeholder for local servers."""
    if options.api_key_env:
        key = os.environ.get(options.api_key_env, "").strip()
        if not key:
            raise TurnError(
                f"agent.options.api_key_env names {options.api_key_env}, which is not set in "
                "corral's environment: set it and restart corral, or remove api_key_env "
                "for a local server that needs no key"
            )
        return key
    host = urlsplit(options.base_url).hostname or ""
    if host == "openai.com" or host.endswith(".openai.com"):
        raise TurnError(
            f"{host} needs an API key: set agent.options.api_key_env to the name of the "
            'variable that holds it, e.g. api_key_env = "OPENAI_API_KEY"'
        )
    return PLACEHOLDER_KEY


class Redactor:
    """Removes the API key from any text this agent reports."""

    def __init__(self, key: str) -> None:
        # Too short to be a secret, and replacing it would mangle every message.
        self.key = key if len(key) >= 4 and key != PLACEHOLDER_KEY else ""

    def __call__(self, text: str) -> str:
        return text.replace(self.key, "[redacted]") if self.key else text


# ---- tools


@dataclass(frozen=True)
class Tool:
    """A Python function the model may call, with the JSON schema that describes it."""

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]
    nullable: frozenset[str] = field(default_factory=frozenset)  # Optional, no default


class UnsupportedType(TypeError):
    pass


_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def json_schema(hint: Any) -> tuple[dict[str, Any], bool]:
    """The JSON schema of a type hint, and whether None is allowed (Optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return json_schema(rest[0])[0], True
        raise UnsupportedType(f"{hint} (only Optional[X] unions are supported)")
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}, False
    if hint is list or origin is list:
        if not args:
            return {"type": "array"}, False
        return {"type": "array", "items": json_schema(args[0])[0]}, False
    if hint is dict or origin is dict:
        return {"type": "object"}, False
    if origin is typing.Literal:
        kinds = {_JSON_TYPES.get(type(a)) for a in args}
        if None in kinds or len(kinds) != 1:
            raise UnsupportedType(f"{hint} (Literal values must all be str, int, float or bool)")
        return {"type": kinds.pop(), "enum": list(args)}, False
    raise UnsupportedType(str(getattr(hint, "__name__", hint)))


_SECTION_RE = re.compile(r"^(\w[\w ]*):\s*$")
_ARGS_HEADERS = {"Args", "Arguments", "Parameters"}
_ARG_RE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph, and parameter descriptions from a Google-style "Args:" section."""
    lines = inspect.cleandoc(doc).splitlines()
    first: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION_RE.match(line):
            break
        first.append(line.strip())
    params: dict[str, str] = {}
    in_args = False
    entry_indent = None
    current = None
    for line in lines:
        header = _SECTION_RE.match(line)
        if header:
            in_args = header[1] in _ARGS_HEADERS
            entry_indent = current = None
            continue
        if not in_args or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent and (m := _ARG_RE.match(line.strip())):
            current = m[1]
            params[current] = m[2].strip()
        elif indent > entry_indent and current is not None:
            params[current] = f"{params[current]} {line.strip()}".strip()
        else:
            in_args = False
    return " ".join(first), params


def describe_tool(function: Callable[..., Any]) -> Tool:
    """A Tool for `function`: its schema from type hints and docstring."""
    name = getattr(function, "__name__", "")
    if not TOOL_NAME_RE.fullmatch(name):
        raise UnsupportedType(f"the name {name!r} is not a valid tool name (A-Z a-z 0-9 _ -)")
    hints = typing.get_type_hints(function)
    description, param_docs = parse_docstring(inspect.getdoc(function) or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    nullable: set[str] = set()
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise UnsupportedType(f"parameter {param.name!r} is positional-only")
        if param.name not in hints:
            raise UnsupportedType(f"parameter {param.name!r} has no type hint")
        try:
            schema, optional = json_schema(hints[param.name])
        except UnsupportedType as e:
            raise UnsupportedType(f"parameter {param.name!r} has unsupported type {e}") from None
        if param.name in param_docs:
            schema["description"] = param_docs[param.name]
        properties[param.name] = schema
        if optional and param.default is param.empty:
            nullable.add(param.name)  # the model may leave it out: we pass None
        elif not optional and param.default is param.empty:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    spec: dict[str, Any] = {"name": name, "parameters": parameters}
    if description:
        spec["description"] = description
    return Tool(name, function, {"type": "function", "function": spec}, frozenset(nullable))


_tools_cache: dict[tuple[str, ...], dict[str, Tool]] = {}


def load_tools(paths: tuple[str, ...]) -> dict[str, Tool]:
    """Import and describe the configured tools (once per worker), by name."""
    if paths in _tools_cache:
        return _tools_cache[paths]
    tools: dict[str, Tool] = {}
    for path in paths:
        module_name, _, attr = path.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except Exception as e:
            raise TurnError(
                f"agent.options.tools: cannot load {path!r}: {type(e).__name__}: {e}"
            ) from None
        if not callable(function):
            raise TurnError(f"agent.options.tools: {path!r} is not a function")
        try:
            tool = describe_tool(function)
        except (TypeError, NameError) as e:  # UnsupportedType, or hints that do not resolve
            raise TurnError(f"agent.options.tools: {path!r}: {e}") from None
        if tool.name in tools:
            raise TurnError(f"agent.options.tools: two tools are named {tool.name!r}")
        tools[tool.name] = tool
    _tools_cache[paths] = tools
    return tools


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


def run_tool(tools: dict[str, Tool], call: ToolCall, ctx: Context) -> str:
    """Run one tool call; the text sent back to the model, an error text if it failed."""
    tool = tools.get(call.name)
    if tool is None:
        return f"error: there is no tool named {call.name!r}; tools: {', '.join(tools) or 'none'}"
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError as e:
        return f"error: the arguments are not valid JSON: {e}"
    if not isinstance(arguments, dict):
        return "error: the arguments must be a JSON object"
    for name in tool.nullable:
        arguments.setdefault(name, None)
    ctx.progress(f"tool {call.name} started")
    try:
        result = tool.function(**arguments)
        if inspect.iscoroutine(result):  # an async tool: this agent is sync, no loop runs
            result = asyncio.run(result)
    except Exception as e:
        ctx.progress(f"tool {call.name} failed")
        ctx.log.warning("tool %s raised %s: %s", call.name, type(e).__name__, e)
        return f"error: {type(e).__name__}: {e}"
    ctx.progress(f"tool {call.name} finished")
    if isinstance(result, str):
        return result
    return json.dumps(result, default=str, ensure_ascii=False)


# ---- the conversation


def history_messages(entries: Iterable[HistoryEntry], limit: int) -> list[dict[str, Any]]:
    """The session's earlier exchanges as chat messages: at most `limit`, newest kept."""
    if limit == 0:
        return []
    turns: dict[str, tuple[list[str], list[str]]] = {}
    for entry in entries:
        if entry.role in ("user", "assistant"):
            asked, answered = turns.setdefault(entry.turn_id, ([], []))
            (asked if entry.role == "user" else answered).append(entry.text)
    messages: list[dict[str, Any]] = []
    for asked, answered in turns.values():
        # A turn without an answer ended in an error: leaving its question out keeps the
        # roles alternating, which strict chat templates (vLLM, llama.cpp) insist on.
        if asked and answered:
            messages.append({"role": "user", "content": asked[0]})
            # a turn run again after a crash may have answered twice with the same text
            messages.append({"role": "assistant", "content": "\n\n".join(dict.fromkeys(answered))})
    messages = messages[-limit:]
    if messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    return messages


@dataclass
class Answer:
    text: str
    tool_calls: list[ToolCall]
    finish_reason: str | None


_clients: dict[tuple[str, str, float], Any] = {}


def client_for(options: Options, key: str) -> Any:
    """The worker's client for this endpoint (kept, so connections are reused)."""
    ident = (options.base_url, key, float(options.timeout))
    if ident not in _clients:
        timeout = openai.Timeout(
            float(options.timeout), connect=min(CONNECT_TIMEOUT, float(options.timeout))
        )
        _clients[ident] = openai.OpenAI(
            base_url=options.base_url,
            api_key=key,
            # ours, below: each retry is reported and bounded, none hides an error
            max_retries=0,
            timeout=timeout,
            # the SDK's default client, but with the TLS context the zygote built
            http_client=openai.DefaultHttpxClient(verify=tls_context(), timeout=timeout),
        )
    return _clients[ident]


def request_args(
    options: Options, messages: list[dict[str, Any]], tools: dict[str, Tool]
) -> dict[str, Any]:
    args: dict[str, Any] = {"model": options.model, "messages": messages}
    if options.temperature is not None:
        args["temperature"] = options.temperature
    if tools:
        args["tools"] = [t.schema for t in tools.values()]
    return args


# id(client) -> (client, the SDK's request), built once; the client is kept with it so
# that its id is not reused by another client
_chat_requests: dict[int, tuple[Any, Any]] = {}


def chat_request(client: Any) -> Any:
    """The request the SDK itself builds for POST /chat/completions on `client` (URL, the
    API key's and the SDK's headers, timeouts), made once per client; a turn sends a
    copy with its own body. None if this SDK builds requests some other way: the turn
    then goes through `chat.completions.create`."""
    cached = _chat_requests.get(id(client))
    if cached is None or cached[0] is not client:
        try:
            from openai._models import FinalRequestOptions

            options = FinalRequestOptions.construct(
                method="post", url="/chat/completions", json_data={}
            )
            template = client._build_request(client._prepare_options(options))
        except (ImportError, AttributeError, TypeError):
            template = None
        cached = _chat_requests[id(client)] = (client, template)
    return cached[1]


def send_chat(client: Any, template: Any, body: dict[str, Any]) -> tuple[Any, Any]:
    """POST `body` as the SDK's `template` request (chat_request) through the SDK's own
    HTTP client; the request and its response, open, to be read and closed. Failures
    raise what `chat.completions.create` raises: APITimeoutError, APIConnectionError,
    and for an error status the SDK's own APIStatusError subclass, made from the
    response by the SDK itself (the endpoint's message in its body)."""
    headers = [(k, v) for k, v in template.headers.multi_items() if k.lower() != "content-length"]
    request = httpx.Request(
        "POST",
        template.url,
        headers=headers,
        content=msgspec.json.encode(body),
        extensions=template.extensions,
    )
    with sdk_errors(request):
        response = client._client.send(request, stream=True)
        if response.status_code >= 400:
            try:
                response.read()
            finally:
                response.close()
            raise client._make_status_error_from_response(response) from None
    return request, response


@contextmanager
def sdk_errors(request: Any) -> Iterator[None]:
    """The HTTP client's failures as the SDK's own: APITimeoutError, APIConnectionError."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise openai.APITimeoutError(request=request) from e
    except (httpx.RequestError, ssl.SSLError) as e:
        raise openai.APIConnectionError(request=request) from e


def streamed_answer(client: Any, args: dict[str, Any], ctx: Context) -> Answer:
    """Read a streamed answer; every chunk is progress.

    Sent by send_chat, as `chat.completions.create(stream=True)` would send it, with its
    errors (and APIError for an error event in the stream, as the SDK reads it) and no
    retries of its own; but the events are parsed here, with msgspec. The SDK's request
    machinery and its pydantic models run hundreds of Python functions a request, and
    in a forked worker each of them copies the pages it touches (reference counts):
    this path costs each worker about 2 MiB less (bench/memory.py)."""
    template = chat_request(client)
    if template is None:
        return sdk_streamed_answer(client, args, ctx)
    acc = _Accumulator(ctx)
    request, response = send_chat(client, template, {**args, "stream": True})
    try:
        with sdk_errors(request):
            for event in sse_data(response.iter_bytes()):
                if event.startswith(b"[DONE]"):
                    break
                acc.add(msgspec.json.decode(event), request)
    finally:
        response.close()
    return acc.answer()


def sse_data(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """The data of each server-sent event in a byte stream (lines end in LF, CRLF or CR;
    an event's data lines are joined with LF; events without data are skipped)."""
    buf = b""
    data: list[bytes] = []
    after_cr = False  # the last line ended in CR: an LF starting the next chunk is its end
    for chunk in chunks:
        if after_cr and chunk:
            after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf += chunk
        lines = buf.splitlines(keepends=True)
        buf = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        if lines and lines[-1].endswith(b"\r"):
            after_cr = True
        for line in lines:
            line = line.rstrip(b"\r\n")
            if line:
                field, _, value = line.partition(b":")
                if field == b"data":
                    data.append(value[1:] if value.startswith(b" ") else value)
            elif data:
                yield b"\n".join(data)
                data = []


class _Accumulator:
    """The answer of a stream, chunk by chunk (chunks as decoded JSON objects)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.parts: list[str] = []
        self.calls: dict[int, ToolCall] = {}
        self.finish_reason: str | None = None
        self.last_progress = 0.0
        self.chunks = 0

    def add(self, chunk: Any, request: Any) -> None:
        self.chunks += 1
        now = time.monotonic()
        if now - self.last_progress >= PROGRESS_EVERY:
            self.ctx.progress(f"model streaming ({self.chunks} chunks)")
            self.last_progress = now
        if not isinstance(chunk, dict):
            return
        if error := chunk.get("error"):  # an error event inside the stream, as the SDK reads it
            message = error.get("message") if isinstance(error, dict) else None
            if not message or not isinstance(message, str):
                message = "An error occurred during streaming"
            raise openai.APIError(message=message, request=request, body=error)
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if content := delta.get("content"):
            self.parts.append(str(content))
        for piece in delta.get("tool_calls") or ():
            if not isinstance(piece, dict):
                continue
            # some servers leave out the index and send each call whole, in one piece
            index = piece.get("index")
            if not isinstance(index, int):
                index = len(self.calls)
            call = self.calls.setdefault(index, ToolCall(f"call_{index}", "", ""))
            if piece.get("id"):
                call.id = str(piece["id"])
            function = piece.get("function")
            if isinstance(function, dict):
                call.name += str(function.get("name") or "")
                call.arguments += str(function.get("arguments") or "")

    def answer(self) -> Answer:
        calls = [self.calls[i] for i in sorted(self.calls)]
        return Answer("".join(self.parts), calls, self.finish_reason)


def sdk_streamed_answer(client: Any, args: dict[str, Any], ctx: Context) -> Answer:
    """A streamed answer read through `chat.completions.create(stream=True)`."""
    acc = _Accumulator(ctx)
    with client.chat.completions.create(**args, stream=True) as stream:
        for chunk in stream:
            acc.add(chunk.model_dump(exclude_unset=True), None)
    return acc.answer()


def whole_answer(client: Any, args: dict[str, Any], ctx: Context) -> Answer:
    """Read a whole answer, sent by send_chat as `chat.completions.create()` would."""
    template = chat_request(client)
    if template is None:
        return sdk_whole_answer(client, args, ctx)
    request, response = send_chat(client, template, args)
    try:
        with sdk_errors(request):
            body = response.read()
    finally:
        response.close()
    ctx.progress("model answered")
    data = msgspec.json.decode(body)
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise TurnError("the model endpoint answered without any choices")
    choice = choices[0]
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    calls = []
    for n, tc in enumerate(message.get("tool_calls") or ()):
        if not isinstance(tc, dict):
            continue
        call_id = str(tc.get("id") or f"call_{n}")
        function = tc.get("function")
        if not isinstance(function, dict):  # a non-function ("custom") tool call: we offer none
            calls.append(ToolCall(call_id, str(tc.get("type") or "?"), ""))
        else:
            name, arguments = function.get("name"), function.get("arguments")
            calls.append(ToolCall(call_id, str(name or ""), str(arguments or "")))
    return Answer(str(message.get("content") or ""), calls, choice.get("finish_reason"))


def sdk_whole_answer(client: Any, args: dict[str, Any], ctx: Context) -> Answer:
    """A whole answer read through `chat.completions.create()`."""
    response = client.chat.completions.create(**args)
    ctx.progress("model answered")
    if not response.choices:
        raise TurnError("the model endpoint answered without any choices")
    choice = response.choices[0]
    calls = []
    for n, tc in enumerate(choice.message.tool_calls or ()):
        function = getattr(tc, "function", None)
        if function is None:  # a non-function ("custom") tool call: we offer none
            calls.append(ToolCall(tc.id or f"call_{n}", getattr(tc, "type", "?"), ""))
        else:
            calls.append(
                ToolCall(tc.id or f"call_{n}", function.name or "", function.arguments or "")
            )
    return Answer(choice.message.content or "", calls, choice.finish_reason)


def retry_delay(error: Exception, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (from 1): the endpoint's word, or backoff."""
    response = getattr(error, "response", None)
    if response is not None:
        headers = response.headers
        try:
            if "retry-after-ms" in headers:
                return max(0.0, float(headers["retry-after-ms"]) / 1000)
            if "retry-after" in headers:
                return max(0.0, float(headers["retry-after"]))
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return min(MAX_RETRY_DELAY, 0.5 * 2 ** (attempt - 1) * random.uniform(0.8, 1.2))


def endpoint_detail(error: Exception) -> str:
    """The endpoint's own error message, shortened."""
    body = getattr(error, "body", None)
    message = body.get("message") if isinstance(body, dict) else body
    if not isinstance(message, str) or not message.strip():
        return ""
    message = " ".join(message.split())
    if len(message) > DETAIL_CHARS:
        message = message[:DETAIL_CHARS] + "..."
    return f" The endpoint said: {message}"


def _retries(n: int) -> str:
    return "1 retry" if n == 1 else f"{n} retries"


def status_error(error: Any, options: Options, retries: int) -> str:
    """Plain words for an HTTP error from the endpoint."""
    status = error.status_code
    url = shown_url(options.base_url)
    detail = endpoint_detail(error)
    after = f" after {_retries(retries)}" if retries else ""
    if status == 401:
        if options.api_key_env:
            return (
                "the model endpoint refused the API key (401): check the variable named by "
                f"agent.options.api_key_env ({options.api_key_env}).{detail}"
            )
        return (
            "the model endpoint wants an API key (401): set agent.options.api_key_env to the "
            f"name of the environment variable that holds it.{detail}"
        )
    if status == 403:
        return f"the model endpoint denied access (403): the key may lack permission.{detail}"
    if status == 404:
        return (
            f"the model endpoint does not know model {options.model!r} or the path (404): "
            f"check agent.options.model and base_url ({url}).{detail}"
        )
    if status == 429:
        return f"the model endpoint is rate-limiting requests (429){after}; try later.{detail}"
    if status >= 500:
        return f"the model endpoint failed with a server error ({status}){after}.{detail}"
    if status == 400:
        return f"the model endpoint rejected the request (400).{detail}"
    return f"the model endpoint answered {status}{after}.{detail}"


def connection_error(error: Exception, options: Options, retries: int) -> str:
    url = shown_url(options.base_url)
    after = f" (after {_retries(retries)})" if retries else ""
    cause = error.__cause__
    if isinstance(error, openai.APITimeoutError):
        if type(cause).__name__ == "ConnectTimeout":
            return f"cannot connect to the model endpoint at {url} within {CONNECT_TIMEOUT:g}s"
        return f"the model endpoint at {url} sent nothing for {float(options.timeout):g}s"
    why = f" ({cause})" if cause is not None and str(cause) else ""
    return f"cannot reach the model endpoint at {url}{after}: is the server running?{why}"


def call_model(client: Any, options: Options, args: dict[str, Any], ctx: Context) -> Answer:
    """One model call, retried on 429, 5xx and failed connections at most max_retries times."""
    attempt = 0
    while True:  # ends with an answer, or a TurnError once the retries are spent
        try:
            if options.stream:
                return streamed_answer(client, args, ctx)
            return whole_answer(client, args, ctx)
        except openai.APIStatusError as e:
            retryable = e.status_code in (408, 409, 429) or e.status_code >= 500
            if not retryable or attempt == options.max_retries:
                raise TurnError(status_error(e, options, attempt)) from None
            what = f"answered {e.status_code}"
            error: Exception = e
        except openai.APITimeoutError as e:
            # we already waited `timeout`: waiting that long again would hide the problem
            raise TurnError(connection_error(e, options, attempt)) from None
        except openai.APIConnectionError as e:
            if attempt == options.max_retries:
                raise TurnError(connection_error(e, options, attempt)) from None
            what = "could not be reached"
            error = e
        except openai.APIError as e:  # an error event inside the stream
            detail = endpoint_detail(e) or f" The endpoint said: {e}"
            raise TurnError(
                f"the model endpoint reported an error while answering.{detail}"
            ) from None
        attempt += 1
        delay = retry_delay(error, attempt)
        if delay > MAX_RETRY_DELAY and isinstance(error, openai.APIStatusError):
            raise TurnError(
                f"{status_error(error, options, attempt - 1)} It asks to wait {delay:g}s before "
                "trying again, longer than corral waits within a turn."
            ) from None
        # a real event, not a heartbeat: the endpoint answered (or refused) just now
        ctx.progress(f"model endpoint {what}; retry {attempt} of {options.max_retries}")
        time.sleep(delay)


def converse(
    client: Any,
    options: Options,
    tools: dict[str, Tool],
    messages: list[dict[str, Any]],
    ctx: Context,
) -> str:
    """Model call -> tool calls -> model call ..., until the model answers in words."""
    for round_ in range(options.max_tool_rounds + 1):
        ctx.progress(f"calling model {options.model}")
        answer = call_model(client, options, request_args(options, messages, tools), ctx)
        if not answer.tool_calls:
            if not answer.text:
                raise TurnError(
                    f"the model returned an empty answer (finish_reason={answer.finish_reason})"
                )
            return answer.text
        if round_ == options.max_tool_rounds:
            break
        messages.append(
            {
                "role": "assistant",
                "content": answer.text or None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in answer.tool_calls
                ],
            }
        )
        for call in answer.tool_calls:
            result = run_tool(tools, call, ctx)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    raise TurnError(
        f"the model still asked for tools after {options.max_tool_rounds} rounds "
        "(agent.options.max_tool_rounds): the turn was stopped"
    )


def check_options(raw: dict[str, Any]) -> None:
    """The options schema, checked by `corral config check` and at the zygote's start
    (so `serve` fails at start): the SDK is there, every option known and valid, and
    every tool importable. The API key is not checked: the service's environment may
    not be the one `config check` runs in."""
    if openai is None:
        raise TurnError(f"agent.entrypoint: {install_hint()}")
    load_tools(load_options(raw).tools)


# ---- warm-up: what the zygote builds once, so that every worker shares it


_tls_context: ssl.SSLContext | None = None  # built in the zygote, shared copy-on-write


def tls_context() -> ssl.SSLContext:
    """The TLS settings and CA certificates of every client in this process tree.

    Loading the CA bundle costs MiBs of memory: done once in the zygote (warm_up), every
    worker shares it; an SSLContext holds settings and certificates, no connection.
    """
    global _tls_context
    if _tls_context is None:
        _tls_context = httpx.create_ssl_context()
    return _tls_context


def warm_up(options: dict[str, Any]) -> None:
    """Run by the zygote once, before it forks any worker (the agent interface's hook):
    see openai_warm.py."""
    from corral.worker.agents import openai_warm

    openai_warm.warm_up(options)


_configured: tuple[dict[str, Any], Options, str] | None = None


def configured(raw: dict[str, Any]) -> tuple[Options, str]:
    """The options and the API key (load_options, api_key), kept with a copy of the
    options table they came from: a worker's turns all get the table the zygote's
    warm-up got, so they are made once, there. A TurnError (bad options, a key not set)
    is not kept."""
    global _configured
    if _configured is not None and _configured[0] == raw:
        return _configured[1], _configured[2]
    options = load_options(raw)
    key = api_key(options)
    _configured = (dict(raw), options, key)
    return options, key


def agent(turn: Turn, ctx: Context) -> None:
    """Answer one turn with the configured OpenAI-compatible endpoint."""
    if openai is None:
        raise TurnError(install_hint())
    options, key = configured(ctx.options)
    redact = Redactor(key)
    started = time.monotonic()
    try:
        tools = load_tools(options.tools)
        messages: list[dict[str, Any]] = []
        if options.system:
            messages.append({"role": "system", "content": options.system})
        messages += history_messages(ctx.history(), options.max_history)
        messages.append({"role": "user", "content": turn.text})
        text = converse(client_for(options, key), options, tools, messages, ctx)
    except TurnError as e:
        raise TurnError(redact(str(e))) from None
    except Exception as e:
        # Not the endpoint's fault as far as we know: keep the traceback for the operator,
        # but an SDK or transport message can quote the request (headers included).
        ctx.log.warning("openai agent failed:\n%s", redact(traceback.format_exc()))
        raise TurnError(redact(f"the openai agent failed: {type(e).__name__}: {e}")) from None
    ctx.log.info("model %s answered in %.1fs", options.model, time.monotonic() - started)
    ctx.reply(text)


agent.check_options = check_options  # type: ignore[attr-defined]
