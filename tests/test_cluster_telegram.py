"""Telegram in a cluster: one node polls each bot (Telegram allows one poller per
token); when it dies another takes over, and every update is answered once."""

from __future__ import annotations

import os
import signal
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


def two_nodes_and_their_leader(corral: Any, pg_url: str, api: Any) -> tuple[Corral, Corral]:
    """Two nodes with one bot of the fake Bot API `api`: (the one that polls it, the
    other), once one does."""
    a, b = (corral({**node_config(pg_url, n), **bot(api)}, agent=ECHO) for n in ("a", "b"))
    wait_for(lambda: polling(a) or polling(b), timeout=30)
    return (a, b) if polling(a) else (b, a)


def delivered(node: Any) -> float:
    """Replies the node has sent to Telegram and recorded as delivered."""
    return sum(
        v
        for k, v in node.metrics().items()
        if k.startswith("corral_replies_delivered_total") and "telegram" in k
    )


def test_one_node_polls_telegram_and_another_takes_over_when_it_dies(
    corral: Any,
    pg_url: str,
    fake: Any,  # noqa: F811
) -> None:
    leader, other = two_nodes_and_their_leader(corral, pg_url, fake)
    assert not polling(other)
    # the other node says why it does not poll
    wait_for(lambda: {p["state"] for p in status_json(other)["pollers"]} == {"standby"})
    fake.user_message(TOKEN, PRIVATE, "first")
    (reply,) = fake.wait_sent(TOKEN, 1, timeout=60)
    assert reply["text"] == "first"
    # killed once the send is recorded: killed between Telegram's answer and that commit,
    # the next leader sends it again (CI met that window once); at-least-once, and
    # Telegram has no idempotency key to drop the repeat with. The node that ran the
    # session's turn sends its reply, and that may be either (CI met the other one).
    wait_for(lambda: delivered(leader) + delivered(other) >= 1, timeout=30)
    leader.kill9()
    fake.user_message(TOKEN, PRIVATE, "second")  # fetched by the other node once it leads
    sent = fake.wait_sent(TOKEN, 2, timeout=90)
    assert [m["text"] for m in sent] == ["first", "second"]
    assert polling(other)


def test_a_stopped_leader_hands_telegram_over_and_stands_down_when_it_wakes(
    corral: Any,
    pg_url: str,
    fake: Any,  # noqa: F811
) -> None:
    leader, other = two_nodes_and_their_leader(corral, pg_url, fake)
    assert leader.proc is not None
    os.kill(leader.proc.pid, signal.SIGSTOP)  # alive to the kernel, silent to the database
    try:
        fake.user_message(TOKEN, PRIVATE, "while stopped")
        (reply,) = fake.wait_sent(TOKEN, 1, timeout=60)  # lease_ttl 3 s: well before
        assert reply["text"] == "while stopped"
        assert polling(other)
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
    wait_for(lambda: not polling(leader), timeout=30)  # it finds its leadership gone
    fake.user_message(TOKEN, PRIVATE, "after")
    sent = fake.wait_sent(TOKEN, 2, timeout=60)
    assert [m["text"] for m in sent] == ["while stopped", "after"]
    assert polling(other)
    assert {p["state"] for p in status_json(leader)["pollers"]} == {"standby"}
