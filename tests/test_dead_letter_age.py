"""A retried dead letter gets a fresh max_age: counted from the retry, not from the reply's
creation (else a reply older than max_age would be given up on after one attempt)."""

from __future__ import annotations

import json

from tests.harness import wait_for
from tests.receiver import Receiver


def dead_letters(c):  # type: ignore[no-untyped-def]
    result = c.cli("dead-letters", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["dead_letters"]


def test_a_retried_dead_letter_counts_max_age_from_the_retry(corral):
    with Receiver([503]) as rx:  # down the whole time
        c = corral(
            {
                "channels.webhook.hooks": {"url": rx.url},
                "delivery": {
                    "max_age": "2s",
                    "retry_initial": "200ms",
                    "retry_max": "200ms",
                    "max_attempts": 1000,
                },
            }
        )
        status, _ = c.request(
            "POST", "/v1/channels/hooks/messages", {"session": "old", "text": "hi", "id": "o1"}
        )
        assert status == 202
        first = wait_for(lambda: dead_letters(c), timeout=30)[0]
        assert "gave up after" in first["last_error"] and first["attempts"] >= 3
        # the reply is older than max_age now; a retry still gets max_age of attempts
        wait_for(lambda: rx.requests and len(rx.requests) == first["attempts"], timeout=10)
        before = len(rx.requests)
        result = c.cli("dead-letters", "retry", "--all")
        assert result.returncode == 0, result.stderr
        again = wait_for(lambda: dead_letters(c), timeout=30)[0]
        assert again["attempts"] >= 3, again  # not given up on after its first new attempt
        assert len(rx.requests) - before == again["attempts"]
