"""Read-only views of the supervisor for the control API, /metrics and sd_notify.

Views read several owners' state at once and change none of it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import time
from typing import TYPE_CHECKING

from corral.protocol.control import SessionInfo, SessionList, Status
from corral.protocol.types import SessionState
from corral.supervisor.metrics import SessionRow
from corral.supervisor.sessions import Session

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


def session_info(sup: Supervisor, key: str) -> SessionInfo:
    """What `corral show` shows; a session with nothing live shows as such."""
    s = sup.sessions.get(key) or Session(key)
    now = asyncio.get_running_loop().time()
    w = s.worker
    t = w.turn if w else None
    record = sup.crashloops.records.get(key)
    return SessionInfo(
        session=key,
        state=state_of(sup, s),
        pid=w.pid if w else None,
        rss=w.rss if w else 0,
        cpu=w.cpu if w else 0.0,
        processes=w.sample.processes if w and w.sample else (1 if w else 0),
        age=now - w.started if w else None,
        turn_age=now - t.started if t else None,
        turn=t.message.id if t else None,
        attempt=t.attempt if t else None,
        queue=len(s.queue),
        restarts=record.restarts if record else 0,
        last_exit=record.last_exit if record else None,
        demoted=w.demoted if w else False,
        quarantined_until=sup.crashloops.quarantined(key),
    )


def session_list(sup: Supervisor) -> SessionList:
    return SessionList([session_info(sup, s.key) for s in sorted(sup.sessions, key=_key)])


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
        pollers=sup.telegram.status() if sup.telegram is not None else [],
    )


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
