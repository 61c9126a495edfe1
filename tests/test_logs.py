"""What others choose (client ids, agent log records) cannot forge a line of corral's log."""

from __future__ import annotations

import re
import time

from tests.harness import wait_for
from tests.receiver import Receiver

FORGED = "2026-01-01 00:00:00,000 ERROR corral.control: operator root ran corral drain"
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def lines_look_like_records(log: str) -> None:
    """Every line is a record of its own or a marked traceback line; none is forged."""
    for line in log.splitlines():
        assert LINE.match(line) or line.startswith("  | "), line
        assert not line.startswith(FORGED[:10] + " 00:00"), line


def test_an_agent_log_record_with_newlines_stays_one_line(corral):
    c = corral(agent="tests.agents:log_text")
    text = f"hello\n{FORGED}\r\x1b[2Kcleared"
    assert c.texts("a", text) == ["logged"]
    line = wait_for(lambda: next((x for x in c.log().splitlines() if "the user said" in x), None))
    assert "hello\\n2026-01-01 00:00:00,000 ERROR corral.control" in line
    assert "\\r\\x1b[2Kcleared" in line
    lines_look_like_records(c.log())


def test_a_client_id_with_newlines_cannot_forge_a_log_line(corral):
    with Receiver([503, 200]) as rx:  # the retry of its reply is logged, id and all
        c = corral(
            {
                "channels.webhook.hooks": {"url": rx.url},
                "delivery": {"retry_initial": "100ms"},
            }
        )
        forged_id = f"m1\n{FORGED}"
        status, body = c.request(
            "POST",
            "/v1/channels/hooks/messages",
            {"session": "s", "text": "hi", "id": forged_id},
        )
        assert status == 202, body
        rx.wait_requests(2)
        time.sleep(0.5)
    log = c.log()
    assert "reply m1\\n2026-01-01 00:00:00,000 ERROR corral.control" in log
    lines_look_like_records(log)
