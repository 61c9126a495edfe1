"""Webhook deliveries are signed with a timestamp; Retry-After is read as RFC 9110 says."""

from __future__ import annotations

import email.utils
import importlib.util
import time

import pytest

from corral.supervisor.delivery import parse_retry_after
from tests.harness import REPO
from tests.receiver import Receiver


def documented_receiver():  # type: ignore[no-untyped-def]
    """docs/webhook_receiver.py, the snippet the README shows, loaded as it is."""
    spec = importlib.util.spec_from_file_location(
        "webhook_receiver", REPO / "docs" / "webhook_receiver.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_delivery_is_signed_with_its_timestamp_and_the_documented_check_accepts_it(corral):
    receiver = documented_receiver()
    with Receiver([200]) as rx:
        c = corral({"channels.webhook.hooks": {"url": rx.url, "secret": "s3cret"}})
        c.request("POST", "/v1/channels/hooks/messages", {"session": "a", "text": "hi"})
        (req,) = rx.wait_requests(1)
    headers, body = req["headers"], req["raw"]
    assert abs(int(headers["X-Corral-Timestamp"]) - time.time()) < 60
    assert receiver.verify("s3cret", headers, body)
    assert not receiver.verify("other", headers, body)
    assert not receiver.verify("s3cret", headers, body + b" ")
    # the same request replayed ten minutes later is refused
    assert not receiver.verify("s3cret", headers, body, now=time.time() + 600)
    # and a timestamp cannot be swapped for a fresh one: it is signed
    fresh = {**headers, "X-Corral-Timestamp": str(int(headers["X-Corral-Timestamp"]) + 1)}
    assert not receiver.verify("s3cret", fresh, body)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),  # in the past: now
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
        ("1e9", None),
        ("nan", None),
        ("inf", None),
        ("Mon, 99 Foo 2024 99:99:99 GMT", None),
        ("9" * 400, None),
        ("Wed, 21 Oct 99999 07:28:00 GMT", None),
    ],
)
def test_retry_after_is_a_date_or_decimal_seconds_and_anything_else_is_ignored(value, seconds):
    got = parse_retry_after(value, NOW)
    assert got == (None if seconds is None else pytest.approx(seconds, abs=1))


def test_a_receivers_retry_after_date_is_honoured(corral):
    class Dated(Receiver):
        async def _handle(self, request):  # type: ignore[no-untyped-def]
            response = await super()._handle(request)
            if response.status == 503:
                # whole seconds: 2 to 3 s from now
                response.headers["Retry-After"] = email.utils.formatdate(
                    time.time() + 3, usegmt=True
                )
            return response

    with Dated([503, 200]) as rx:
        c = corral(
            {"channels.webhook.hooks": {"url": rx.url}, "delivery": {"retry_initial": "100ms"}}
        )
        c.request("POST", "/v1/channels/hooks/messages", {"session": "a", "text": "hi"})
        first, second = rx.wait_requests(2)
    assert second["at"] - first["at"] >= 1.0, c.log()  # the date, not the 100 ms backoff
    assert "Traceback" not in c.log()
