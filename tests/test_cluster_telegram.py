"""Telegram in a cluster: one node polls each bot (Telegram allows one poller per
token); when it dies another takes over, and every update is answered once."""

from __future__ import annotations

from typing import Any

from tests.harness import Corral, wait_for
from tests.test_cluster import node_config
from tests.test_telegram_serve import (  # noqa: F401 (fixtures)
    PRIVATE,
    TOKEN,
    bot,
    fake,
    status_json,
    token_env,
)

ECHO = "corral.worker.agents.echo:agent"


def polling(c: Corral) -> bool:
    return any(p["state"] == "polling" for p in status_json(c)["pollers"])


def test_one_node_polls_telegram_and_another_takes_over_when_it_dies(
    corral: Any,
    pg_url: str,
    fake: Any,  # noqa: F811
) -> None:
    a, b = (corral({**node_config(pg_url, n), **bot(fake)}, agent=ECHO) for n in ("a", "b"))
    wait_for(lambda: polling(a) or polling(b), timeout=30)
    leader, other = (a, b) if polling(a) else (b, a)
    assert not polling(other)
    fake.user_message(TOKEN, PRIVATE, "first")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=60)
    assert reply["text"] == "first"
    leader.kill9()
    fake.user_message(TOKEN, PRIVATE, "second")  # fetched by the other node once it leads
    sent = fake.wait_sent(TOKEN, 2, timeout=90)
    assert [m["text"] for m in sent] == ["first", "second"]
    assert polling(other)
