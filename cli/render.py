"""How the `corral` commands print answers for people (and, with `--json`, for scripts)."""

from __future__ import annotations

import json
import time
from typing import Any

from corral.protocol.control import (
    DeadLetterInfo,
    HistoryEntry,
    NodeInfo,
    PollerHealth,
    SessionInfo,
    Status,
)
from corral.protocol.spawn import SandboxLevel


def as_json(plain: Any) -> str:
    return json.dumps(plain)


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def fmt_secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def fmt_until(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def fmt_ago(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "-"
    return f"{fmt_secs(max(0.0, (now or time.time()) - t))} ago"


SESSION_COLUMNS = (
    "SESSION",
    "STATE",
    "PID",
    "RSS",
    "CPU",
    "AGE",
    "TURN",
    "QUEUE",
    "RESTARTS",
    "LAST-EXIT",
)


def session_row(s: SessionInfo) -> tuple[str, ...]:
    return (
        s.session,
        s.state,
        str(s.pid or "-"),
        fmt_bytes(s.rss),
        f"{s.cpu:.1f}s" if s.pid else "-",
        fmt_secs(s.age),
        fmt_secs(s.turn_age),
        str(s.queue),
        str(s.restarts),
        s.last_exit or "-",
    )


STORED_COLUMNS = ("MESSAGES", "LAST-MESSAGE")


def session_table(sessions: list[SessionInfo], stored: bool = False) -> list[str]:
    """`corral ls`: a header and a row per session, in columns two spaces apart; with
    `stored` (`ls --all`), the store's message count and last message time too."""
    header = SESSION_COLUMNS + (STORED_COLUMNS if stored else ())
    now = time.time()
    rows = [session_row(s) + (stored_cells(s, now) if stored else ()) for s in sessions]
    if any(s.node for s in sessions):  # a cluster: which node runs each session
        header = (header[0], "NODE", *header[1:])
        rows = [(r[0], s.node or "-", *r[1:]) for r, s in zip(rows, sessions, strict=True)]
    return table([header, *rows])


def stored_cells(s: SessionInfo, now: float) -> tuple[str, ...]:
    return ("-" if s.messages is None else str(s.messages), fmt_ago(s.last_message_at, now))


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def history_lines(entries: list[HistoryEntry]) -> list[str]:
    """`corral history`: a line per message or reply (time, kind, id, state), its text
    indented below."""
    lines = []
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at))
        lines.append(f"{when}  {e.kind:<7}  {e.id}  ({e.channel}, {e.state})")
        lines.extend(f"    {line}" for line in (e.text.splitlines() or [""]))
    return lines


DEAD_LETTER_COLUMNS = ("REPLY", "CHANNEL", "SESSION", "ATTEMPTS", "AGE", "LAST-ERROR")


def dead_letter_table(rows: list[DeadLetterInfo]) -> list[str]:
    """`corral dead-letters`: a row per reply given up on."""
    now = time.time()
    return table(
        [
            DEAD_LETTER_COLUMNS,
            *(
                (
                    d.id,
                    d.channel,
                    d.session,
                    str(d.attempts),
                    fmt_secs(max(0.0, now - d.created_at)),
                    d.last_error or "-",
                )
                for d in rows
            ),
        ]
    )


def fields(shown: dict[str, object], width: int) -> list[str]:
    """`key:` padded to `width` (wider if a key needs it), then the value; a line each."""
    width = max([width, *(len(key) + 2 for key in shown)])
    return [f"{key + ':':<{width}}{value}" for key, value in shown.items()]


def session_fields(s: SessionInfo) -> list[str]:
    """`corral show SESSION`."""
    return fields(
        {
            "session": s.session,
            "state": s.state,
            "pid": s.pid or "-",
            "rss": fmt_bytes(s.rss),
            "cpu": f"{s.cpu:.2f}s",
            "processes": s.processes,
            "tasks": s.tasks,
            "age": fmt_secs(s.age),
            "turn": s.turn or "-",
            "turn age": fmt_secs(s.turn_age),
            "attempt": s.attempt or "-",
            "queue": s.queue,
            "restarts": s.restarts,
            "last exit": s.last_exit or "-",
            "scheduling": "idle (since a CPU-heavy turn or a broken bound)"
            if s.demoted
            else "normal",
            "quarantined until": fmt_until(s.quarantined_until),
            "messages": "-" if s.messages is None else s.messages,
            "last message": fmt_until(s.last_message_at),
        },
        19,
    )


def status_fields(st: Status) -> list[str]:
    """`corral status`."""
    workers = ", ".join(f"{n} {state}" for state, n in st.workers.items() if n) or "none"
    return fields(
        {
            "pid": st.pid,
            "version": st.version,
            "uptime": fmt_secs(st.uptime),
            "state": "draining" if st.draining else "serving",
            "config": st.config or "(none: built-in defaults)",
            "agent": st.agent,
            "state dir": st.state_dir,
            "zygote pid": f"{st.zygote_pid or '-'}"
            + (f" ({st.zygotes_replaced} replaced: no answer)" if st.zygotes_replaced else "")
            + (f"; {st.spawn_failures} spawns failed in a row" if st.spawn_failures else ""),
            "sessions": f"{st.sessions} ({workers})",
            "inbox": st.inbox,
            "store": st.store,
            "descriptors": f"{st.fds} of {st.fds_limit}" if st.fds_limit else "-",
            "loop lag": f"{st.loop_lag * 1000:.1f}ms "
            f"(max {st.loop_lag_max * 1000:.1f}ms in the last minute)",
            "sandbox": sandbox_line(st.sandbox),
            **{f"telegram {p.bot}": poller_line(p) for p in st.pollers},
            **({"node": st.node} if st.node else {}),
            **{f"node {n.name}": node_line(n) for n in st.nodes},
        },
        12,
    )


def sandbox_line(level: SandboxLevel | None) -> str:
    """The sandbox in force, in `corral status`."""
    if level is None:
        return "unknown (the zygote is not ready)"
    if not level.enabled:
        return "off ([sandbox] enabled = false)"
    if level.abi == 0:
        return f"NONE ({level.why or 'no Landlock here'}): workers are not confined"
    line = f"Landlock ABI {level.abi}: {', '.join(level.enforced)}"
    return line + (f" (not enforced: {', '.join(level.missing)})" if level.missing else "")


def node_line(n: NodeInfo, now: float | None = None) -> str:
    """One node of a cluster in `corral status`."""
    now = time.time() if now is None else now
    beat = f"{fmt_secs(max(0.0, now - n.heartbeat_at))} ago"
    state = "gone" if not n.alive else "draining" if n.draining else "serving"
    return f"{state}, {n.sessions} sessions, last heartbeat {beat}"


def poller_line(p: PollerHealth, now: float | None = None) -> str:
    """One bot's poller in `corral status`."""
    now = time.time() if now is None else now
    who = f" as @{p.username}" if p.username else ""
    last = "never" if p.last_poll is None else f"{fmt_secs(max(0.0, now - p.last_poll))} ago"
    line = f"{p.state}{who}, last poll {last}, {p.updates} updates, {p.errors} errors"
    if p.conflicts:
        line += f" ({p.conflicts} conflicts)"
    if p.last_error and p.state != "polling":
        line += f"; {p.last_error}"
    return line
