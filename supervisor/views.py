"""Read-only views of the supervisor for the control API, /metrics and sd_notify.

Views read several owners' state at once and change none of it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import time
from typing import TYPE_CHECKING

import msgspec

from corral.protocol.control import (
    DeadLetterInfo,
    DeadLetterList,
    History,
    HistoryEntry,
    SessionInfo,
    SessionList,
    Status,
)
from corral.protocol.types import SessionState
from corral.supervisor.metrics import SessionRow
from corral.supervisor.sandbox import with_peer_check
from corral.supervisor.sessions import Session
from corral.supervisor.store import DeadLetter, HistoryItem, SessionSummary

if TYPE_CHECKING:
    from corral.supervisor.supervisor import Supervisor

try:
    VERSION = importlib.metadata.version("corral")
except importlib.metadata.PackageNotFoundError:
    VERSION = "unknown"


def state_of(sup: Supervisor, s: Session) -> SessionState:
    if sup.crashloops.quarantined(s.key) is not None:
        return SessionState.QUARANTINED
    return s.worker_state


INACTIVE = "inactive"  # the store knows the session; no worker, nothing queued


def session_info(sup: Supervisor, key: str, stored: SessionSummary | None = None) -> SessionInfo:
    """What `corral show` shows; a session with nothing live shows as such. `stored`
    (the store's summary of it) adds its message count and last message time, and
    its restarts and last exit if this run has not seen it yet."""
    live = sup.sessions.get(key)
    if live is None and sup.cluster is not None:  # another node may run it
        row = sup.cluster.others.get(key)
        if row is not None:
            if stored is None:
                return row
            return msgspec.structs.replace(
                row, messages=stored.messages, last_message_at=stored.last_message_at
            )
    s = live or Session(key)
    now = asyncio.get_running_loop().time()
    w = s.worker
    t = w.turn if w else None
    record = sup.crashloops.records.get(key)
    if live is None and sup.crashloops.quarantined(key) is None:
        state: str = INACTIVE
    else:
        state = state_of(sup, s)
    restarts = record.restarts if record else (stored.restarts if stored else 0)
    last_exit = record.last_exit if record else (stored.last_exit if stored else None)
    return SessionInfo(
        session=key,
        state=state,
        pid=w.pid if w else None,
        rss=w.rss if w else 0,
        cpu=w.cpu if w else 0.0,
        processes=w.sample.processes if w and w.sample else (1 if w else 0),
        tasks=w.sample.tasks if w and w.sample else (1 if w else 0),
        age=now - w.started if w else None,
        turn_age=now - t.started if t else None,
        turn=t.message.id if t else None,
        attempt=t.attempt if t else None,
        queue=len(s.queue),
        restarts=restarts,
        last_exit=last_exit,
        demoted=w.demoted if w else False,
        quarantined_until=sup.crashloops.quarantined(key),
        messages=stored.messages if stored else None,
        last_message_at=stored.last_message_at if stored else None,
        progress=t.note if t else None,
        node=sup.cluster.node if sup.cluster is not None else "",
    )


def local_session_infos(sup: Supervisor) -> list[SessionInfo]:
    """The sessions this node runs (in a cluster, what it tells the others)."""
    return [session_info(sup, s.key) for s in sorted(sup.sessions, key=_key)]


def session_list(sup: Supervisor, stored: list[SessionSummary] | None = None) -> SessionList:
    """The live sessions; with `stored` (`ls --all`), every session the store knows too."""
    if stored is None:
        return SessionList(_with_other_nodes(sup, local_session_infos(sup)))
    by_key = {r.session: r for r in stored}
    keys = sorted({*by_key, *(s.key for s in sup.sessions)})
    return SessionList(_with_other_nodes(sup, [session_info(sup, k, by_key.get(k)) for k in keys]))


def _with_other_nodes(sup: Supervisor, rows: list[SessionInfo]) -> list[SessionInfo]:
    """In a cluster: the live sessions of the other nodes too (this node's rows win)."""
    if sup.cluster is None:
        return rows
    by_key = {r.session: r for r in rows}
    for r in sup.cluster.other_sessions():
        mine = by_key.get(r.session)
        if mine is None or (mine.state == INACTIVE and mine.pid is None):
            by_key[r.session] = r
    return [by_key[k] for k in sorted(by_key)]


async def stored_sessions(sup: Supervisor, key: str | None = None) -> list[SessionSummary]:
    """What the store knows of sessions (all, or one), live or not."""
    return await sup.store.session_summaries(key)


async def stored_history(sup: Supervisor, key: str, limit: int) -> History:
    return history(key, await sup.store.history(key, limit))


async def stored_dead_letters(sup: Supervisor, limit: int) -> DeadLetterList:
    return dead_letters(await sup.store.dead_letters(limit))


def history(key: str, items: list[HistoryItem]) -> History:
    """`corral history`: each message, then its replies, oldest first."""
    entries: list[HistoryEntry] = []
    for item in items:
        m = item.message
        entries.append(
            HistoryEntry(
                id=m.id,
                kind="message",
                at=item.accepted_at,
                text=m.text,
                in_reply_to=None,
                channel=m.origin.channel,
                state=m.state,
            )
        )
        entries.extend(
            HistoryEntry(
                id=r.reply.id,
                kind=r.reply.kind,
                at=r.created_at,
                text=r.reply.text,
                in_reply_to=m.id,
                channel=r.reply.origin.channel,
                state=r.delivery,
            )
            for r in item.replies
        )
    return History(key, entries)


def dead_letters(rows: list[DeadLetter]) -> DeadLetterList:
    return DeadLetterList(
        [
            DeadLetterInfo(
                id=d.reply.id,
                channel=d.reply.origin.channel,
                session=d.reply.session,
                in_reply_to=d.reply.in_reply_to,
                kind=d.reply.kind,
                text=d.reply.text,
                attempts=d.attempts,
                last_error=d.last_error,
                created_at=d.created_at,
            )
            for d in rows
        ]
    )


def _key(s: Session) -> str:
    return s.key


def status(sup: Supervisor) -> Status:
    by_state = dict.fromkeys(SessionState, 0)
    for s in sup.sessions:
        by_state[state_of(sup, s)] += 1
    return Status(
        pid=os.getpid(),
        version=VERSION,
        uptime=time.time() - sup.started_wall,
        draining=sup.draining,
        agent=sup.config.agent.entrypoint,
        state_dir=str(sup.config.state_path),
        zygote_pid=sup.spawner.zygote_pid,
        sessions=len(sup.sessions),
        workers={str(k): n for k, n in by_state.items()},
        inbox=sup.inbox.pending,
        loop_lag=sup.lag.lag,
        loop_lag_max=sup.lag.lag_max,
        kill_grace=float(sup.config.supervisor.kill_grace),
        fds=sup.fds.in_use(),
        fds_limit=sup.fds.limit,
        zygotes_replaced=sup.spawner.replaced,
        spawn_failures=sup.spawner.failures,
        pollers=sup.telegram.status() if sup.telegram is not None else [],
        config=sup.config_path,
        store=store_health(sup),
        sandbox=with_peer_check(sup.spawner.sandbox, sup.config),
        node=sup.cluster.node if sup.cluster is not None else "",
        nodes=sup.cluster.nodes() if sup.cluster is not None else [],
    )


def store_health(sup: Supervisor) -> str:
    health = sup.store.health()
    if n := sup.inbox.unsaved:
        health += f"; {n} replies and finishes waiting to be written"
    return health


def session_rows(sup: Supervisor) -> list[SessionRow]:
    """The per-session series of /metrics."""
    return [
        SessionRow(
            s.key,
            state_of(sup, s),
            s.worker.rss if s.worker else 0,
            s.worker.cpu if s.worker else 0.0,
            len(s.queue),
            s.worker is not None,
            s.worker.sample.tasks if s.worker and s.worker.sample else 0,
        )
        for s in sup.sessions
    ]


def systemd_status(sup: Supervisor) -> str:
    st = status(sup)
    quarantined = st.workers[SessionState.QUARANTINED]
    return (
        f"STATUS={st.sessions} sessions, {st.sessions - quarantined} workers "
        f"({st.workers[SessionState.BUSY]} busy), {quarantined} quarantined, inbox {st.inbox}, "
        f"loop lag {st.loop_lag * 1000:.0f}ms"
    )
