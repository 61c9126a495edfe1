"""The OpenAI-compatible agent against a fake endpoint on 127.0.0.1, under a real supervisor."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from corral.protocol.types import Origin, Turn
from corral.worker.agents import openai as openai_agent
from corral.worker.runtime import TurnError
from tests import tools_for_tests
from tests.fake_openai import FakeOpenAI
from tests.harness import Corral, free_port

AGENT = "corral.worker.agents.openai:agent"
KEY_ENV = "CORRAL_TEST_FAKE_KEY"
TOOLS = "tests.tools_for_tests:"
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh API key in the environment the supervisor and its workers inherit."""
    value = "sk-fake-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, value)
    return value


@pytest.fixture
def fake(key: str) -> Iterator[FakeOpenAI]:
    """The fake endpoint; it wants `key`. Requested before `corral`, so it stops after it."""
    server = FakeOpenAI(api_key=key).start()
    yield server
    server.stop()
    assert not server.running, "the fake endpoint's thread is still running"


def start(
    corral: Callable[..., Corral],
    fake: FakeOpenAI,
    limits: dict[str, Any] | None = None,
    **options: Any,
) -> Corral:
    """A supervisor running the openai agent against `fake`."""
    return corral(
        {
            "agent.options": {
                "base_url": fake.base_url,
                "model": "m",
                "api_key_env": KEY_ENV,
                **options,
            },
            "limits": {"no_progress_timeout": "3s", **(limits or {})},
        },
        agent=AGENT,
    )


def the_error(body: dict[str, Any]) -> str:
    """The text of the one error reply a failed turn must have."""
    assert body["status"] == "error", body
    assert [r["kind"] for r in body["replies"]] == ["error"], body
    text: str = body["replies"][0]["text"]
    return text


def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# ---- end to end


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_each_turn_is_sent_with_the_sessions_earlier_exchanges(corral, fake, stream):
    c = start(corral, fake, stream=stream, system="Be brief.", max_history=2)
    assert c.texts("alice", "hello") == ["echo: hello"]
    assert "(400)" in the_error(c.send("alice", "status 400"))
    assert c.texts("alice", "again") == ["echo: again"]
    assert c.texts("alice", "third") == ["echo: third"]
    assert c.texts("bob", "hi") == ["echo: hi"]

    (again,) = fake.chat_requests("again")
    assert bool(again.get("stream")) is stream
    # the failed turn is left out whole: neither its question nor its error reaches the model
    assert again["messages"] == [SYSTEM, user("hello"), assistant("echo: hello"), user("again")]
    (third,) = fake.chat_requests("third")
    assert third["messages"] == [SYSTEM, user("again"), assistant("echo: again"), user("third")]
    (hi,) = fake.chat_requests("hi")
    assert hi["messages"] == [SYSTEM, user("hi")]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_the_model_calls_a_tool_in_the_worker_and_answers_with_its_result(corral, fake, stream):
    tools = [TOOLS + "add", TOOLS + "fail", TOOLS + "worker_pid"]
    c = start(corral, fake, stream=stream, tools=tools, max_tool_rounds=2)
    assert c.texts("tess", 'tool add {"a": 2, "b": 3}') == ["tool said: 5"]

    first, second = fake.chat_requests("tool add")
    described = {t["function"]["name"]: t for t in first["tools"]}
    assert set(described) == {"add", "fail", "worker_pid"}
    assert described["add"] == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two whole numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "the first number"},
                    "b": {"type": "integer", "description": "the second number"},
                },
                "required": ["a", "b"],
            },
        },
    }
    call, result = second["messages"][-2:]
    assert call["role"] == "assistant"
    assert call["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "5"}

    # a tool that raises: the model gets the error text, the turn goes on
    assert c.texts("tess", "tool fail {}") == [
        "tool said: error: ValueError: tool failed on purpose: no reason"
    ]
    # tools run in the session's worker (forked by the zygote), not in the supervisor
    pid = int(c.texts("tess", "tool worker_pid {}")[0].removeprefix("tool said: "))
    assert psutil.Process(pid).environ()["CORRAL_TEST_MARK"] == c.mark
    assert pid != c.proc.pid and psutil.Process(pid).ppid() != c.proc.pid

    # a model that never stops asking for tools is stopped after max_tool_rounds
    assert "max_tool_rounds" in the_error(c.send("tess", "tool-loop add {}"))
    assert len(fake.chat_requests("tool-loop")) == 3
    assert c.texts("tess", "still there?") == ["echo: still there?"]


def test_a_stalled_stream_ends_in_no_progress_while_another_session_answers(corral, fake):
    # room for the other session to be spawned and answered while this one stalls
    c = start(corral, fake, limits={"no_progress_timeout": "5s"})
    finished: dict[str, float] = {}

    def send(session: str, text: str) -> dict[str, Any]:
        body = c.send(session, text, wait=60)
        finished[session] = time.monotonic()
        return body

    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(send, "slow", "stall")
        wait_for(lambda: fake.chat_requests("stall"))
        assert send("quick", "are you there?")["replies"][0]["text"] == "echo: are you there?"
        body = stalled.result(90)
    assert the_error(body).endswith("[no_progress]")
    assert finished["quick"] < finished["slow"]
    # the stalled session goes on in a new worker
    assert c.texts("slow", "better now?") == ["echo: better now?"]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_an_endpoint_that_never_answers_ends_in_no_progress(corral, fake, stream):
    c = start(corral, fake, stream=stream)
    assert the_error(c.send("hal", "hang", wait=60)).endswith("[no_progress]")
    assert c.texts("hal", "hello?") == ["echo: hello?"]


def test_a_stream_that_never_ends_is_stopped_at_turn_timeout(corral, fake):
    c = start(corral, fake, limits={"turn_timeout": "6s", "no_progress_timeout": "3s"})
    # chunks every 0.3 s keep the no-progress deadline away: only the turn deadline ends it
    assert the_error(c.send("drew", "drip", wait=60)).endswith("[turn_timeout]")
    assert c.texts("drew", "done?") == ["echo: done?"]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_endpoint_errors_give_one_clear_error_reply_each(corral, fake, stream):
    c = start(corral, fake, stream=stream, max_retries=1)
    expected = {
        "status 401": ("refused the API key (401)", KEY_ENV),
        "status 404": ("does not know model 'm'", "base_url"),
        "status 429": ("rate-limiting requests (429) after 1 retry", "fake failure 429"),
        "status 500": ("server error (500) after 1 retry", "fake failure 500"),
    }
    if stream:
        expected["sse-error"] = ("error while answering", "fake failure mid-stream")
    for text, phrases in expected.items():
        error = the_error(c.send("erin", text))
        assert error.startswith("turn failed: the model endpoint ")
        for phrase in phrases:
            assert phrase in error, error
    # retries are bounded: once for 429 and 5xx, never for 401 and 404
    tries = {text: len(fake.chat_requests(text)) for text in expected}
    assert tries == {
        "status 401": 1,
        "status 404": 1,
        "status 429": 2,
        "status 500": 2,
        **({"sse-error": 1} if stream else {}),
    }
    assert c.texts("erin", "all good?") == ["echo: all good?"]


def test_an_endpoint_that_refuses_connections_gives_one_clear_error_reply(corral, key):
    c = corral(
        {
            "agent.options": {
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "model": "m",
                "api_key_env": KEY_ENV,
                "max_retries": 1,
            }
        },
        agent=AGENT,
    )
    for _ in range(2):  # the session keeps working: each message gets its own clear error
        error = the_error(c.send("rita", "anyone?"))
        assert "cannot reach the model endpoint at http://127.0.0.1:" in error
        assert "is the server running?" in error


def test_a_bad_option_stops_serve_at_start_and_a_missing_key_is_a_clear_error_reply(corral, fake):
    # the options are checked when the zygote loads the agent: serve exits 2 naming the key
    with pytest.raises(RuntimeError, match=r"exited with 2:(.|\n)*agent\.options\.max_history"):
        start(corral, fake, api_key_env="CORRAL_TEST_UNSET_KEY", max_history=-1)
    # the API key is read per turn (the service's environment): an error reply that says so
    c = start(corral, fake, api_key_env="CORRAL_TEST_UNSET_KEY")
    error = the_error(c.send("cfg", "hello"))
    assert "CORRAL_TEST_UNSET_KEY, which is not set" in error
    assert not fake.requests


def test_the_api_key_never_reaches_logs_replies_or_state_files(corral, fake, key):
    c = start(corral, fake, tools=[TOOLS + "fail"], max_retries=1)
    replies = []
    for text in ["hello", "status 401", "status 500", "tool fail {}", "sse-error"]:
        replies += c.send("kim", text)["replies"]
    _, polled = c.request("GET", "/v1/sessions/kim/replies")
    replies += polled["replies"]
    assert c.stop() == 0

    # the key was really sent, and the endpoint really quoted it back in its 401
    assert {r["authorization"] for r in fake.requests} == {f"Bearer {key}"}
    assert any("Incorrect API key provided: [redacted]" in r["text"] for r in replies)
    for reply in replies:
        assert key not in reply["text"]
    assert key not in c.log()
    files = [p for p in c.tmp.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in files), "expected a transcript"
    for path in files:
        assert key.encode() not in path.read_bytes(), path


# ---- the parts, without a supervisor


def test_tool_schema_comes_from_type_hints_and_docstring():
    tool = openai_agent.describe_tool(tools_for_tests.describe)
    assert tool.schema == {
        "type": "function",
        "function": {
            "name": "describe",
            "description": "Describe a thing in words.",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "what the thing is called"},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "labels for it, spread over two lines",
                    },
                    "weight": {"type": "number", "description": "in kilograms"},
                    "loud": {"type": "boolean", "description": "shout the description"},
                    "note": {"type": "string"},
                    "mode": {"type": "string", "enum": ["short", "long"]},
                },
                "required": ["name", "tags"],
            },
        },
    }
    # Optional without a default: not required, and None when the model leaves it out
    assert tool.nullable == {"note"}


def test_server_sent_events_are_read_whatever_the_chunks_and_line_endings():
    stream = (
        b': a comment\r\n\r\ndata: {"a":1}\r\n\r\n'  # CRLF; a comment alone is no event
        b'data: {"b":\n'  # an event's data lines are joined with LF
        b"data: 2}\n\nretry: 5\n\n"  # a retry field alone is no event
        b"data:[DONE]\r\r"  # CR alone; no space after the colon
    )
    whole = list(openai_agent.sse_data([stream]))
    assert whole == [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]
    # the same bytes cut anywhere, a CRLF split between two chunks included
    for cut in range(1, len(stream)):
        assert list(openai_agent.sse_data([stream[:cut], stream[cut:]])) == whole, cut
    assert list(openai_agent.sse_data(bytes([c]) for c in stream)) == whole


def test_a_tool_with_an_unsupported_parameter_type_is_a_clear_error():
    def bad(when: complex) -> str:
        """Nope."""
        return ""

    with pytest.raises(openai_agent.UnsupportedType, match="'when' has unsupported type complex"):
        openai_agent.describe_tool(bad)
    with pytest.raises(TurnError, match=r"cannot load 'tests\.tools_for_tests:nothing'"):
        openai_agent.load_tools((TOOLS + "nothing",))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "agent.options.model is not set"),
        ({"model": "m", "colour": "blue"}, "agent.options.colour: unknown option"),
        ({"model": "m", "stream": "yes"}, "agent.options.stream"),
        ({"model": "m", "timeout": "soon"}, "invalid duration"),
        ({"model": "m", "base_url": "127.0.0.1:8080"}, "http:// or https://"),
        ({"model": "m"}, 'api_key_env = "OPENAI_API_KEY"'),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(TurnError, match=None) as raised:
        openai_agent.api_key(openai_agent.load_options(options))
    assert message in str(raised.value)


def test_a_local_server_needs_no_key_and_options_have_defaults():
    options = openai_agent.load_options(
        {"model": "m", "base_url": "http://127.0.0.1:11434/v1", "timeout": "90s"}
    )
    assert openai_agent.api_key(options) == "unused"
    assert (options.stream, options.max_history, options.max_tool_rounds) == (True, 20, 8)
    assert float(options.timeout) == 90.0


def test_a_missing_sdk_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(openai_agent, "openai", None)
    turn = Turn(id="t", session="s", text="hi", origin=Origin(channel="http"))
    # from a checkout (as here) the editable install of the extra, else the published one
    with pytest.raises(TurnError, match=r"pip install (-e '\.|'corral)\[openai\]'"):
        openai_agent.agent(turn, None)  # type: ignore[arg-type]


def test_the_installed_sdk_takes_the_lean_request_path(monkeypatch: pytest.MonkeyPatch):
    """The worker's turn goes through the SDK's own client with the request the SDK builds
    (chat_request); an SDK that builds requests some other way makes the agent fall back to
    `chat.completions.create`, which works but costs each worker about 2 MiB more: an SDK
    upgrade that does so should fail here, not pass unnoticed."""
    # the module's caches of clients and requests as they were, after this test
    monkeypatch.setattr(openai_agent, "_clients", {})
    monkeypatch.setattr(openai_agent, "_chat_requests", {})
    options = openai_agent.Options(model="m", base_url="http://127.0.0.1:9/v1")
    client = openai_agent.client_for(options, "sk-test")
    request = openai_agent.chat_request(client)
    assert request is not None
    assert str(request.url) == "http://127.0.0.1:9/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
