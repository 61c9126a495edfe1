"""`corral top`: a live table of sessions, refreshed without a keypress.

In a terminal it is a Textual app: a header with the supervisor's figures, a table with a
row cursor, `s` to switch the sort key, `r` to reverse it, `k` to kill the selected
session (after a confirmation), `q` to quit. Every request to corral runs in a thread
under the same client deadline as every other command, so a slow or stopped supervisor
never freezes the screen: the header says "no answer" and the last rows stay. When
stdout is not a terminal, the same table is printed again every interval.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import click

from corral.cli import render
from corral.cli.client import ControlClient
from corral.protocol.control import SessionInfo, Status
from corral.supervisor.config import Config

SORTS: dict[str, Callable[[SessionInfo], tuple[float | str, ...]]] = {
    "session": lambda s: (s.session,),
    "state": lambda s: (s.state, s.session),
    "rss": lambda s: (-s.rss, s.session),
    "cpu": lambda s: (-s.cpu, s.session),
    "turn": lambda s: (-(s.turn_age if s.turn_age is not None else -1.0), s.session),
    "queue": lambda s: (-s.queue, s.session),
    "restarts": lambda s: (-s.restarts, s.session),
}


@dataclass(frozen=True)
class Snapshot:
    """One look at corral: its status and sessions, or why there was no answer."""

    status: Status | None
    sessions: list[SessionInfo]
    error: str | None
    at: float  # wall time


def look(client: ControlClient) -> Snapshot:
    try:
        status = client.status().body
        sessions = client.sessions().body.sessions
    except click.ClickException as e:
        return Snapshot(None, [], e.format_message(), time.time())
    return Snapshot(status, sessions, None, time.time())


def header(snap: Snapshot, sort: str, reverse: bool) -> str:
    """The supervisor's figures in one line (or the reason there are none)."""
    st = snap.status
    if st is None:
        return f"no answer from corral: {snap.error}"
    workers = " ".join(f"{state} {n}" for state, n in st.workers.items() if n) or "none"
    state = "draining" if st.draining else "serving"
    return (
        f"corral {st.version} pid {st.pid} {state}, up {render.fmt_secs(st.uptime)} | "
        f"workers: {workers} | sessions {st.sessions} | inbox {st.inbox} | "
        f"loop lag {st.loop_lag * 1000:.1f}ms (max {st.loop_lag_max * 1000:.1f}ms/min) | "
        f"sorted by {sort}{' (reversed)' if reverse else ''}"
    )


def ordered(sessions: list[SessionInfo], sort: str, reverse: bool) -> list[SessionInfo]:
    return sorted(sessions, key=SORTS[sort], reverse=reverse)


def plain(config: Config, timeout: float, interval: float, count: int | None, sort: str) -> None:
    """Not a terminal: the header and the table, again every `interval` seconds."""
    client = ControlClient(config, timeout)
    shown = 0
    while count is None or shown < count:  # ends after `count` tables, or at Ctrl-C/EPIPE
        if shown:
            time.sleep(interval)
        snap = look(client)
        stamp = time.strftime("%H:%M:%S", time.localtime(snap.at))
        click.echo(f"{stamp}  {header(snap, sort, False)}")
        if snap.status is not None:
            for line in render.session_table(ordered(snap.sessions, sort, False)):
                click.echo(line)
        click.echo("")
        sys.stdout.flush()
        shown += 1


def live(config: Config, timeout: float, interval: float, sort: str) -> None:
    """In a terminal: the Textual app."""
    # imported here: only `corral top` in a terminal needs Textual
    from textual import work
    from textual.app import App, ComposeResult
    from textual.binding import Binding
    from textual.containers import Vertical
    from textual.screen import ModalScreen
    from textual.widgets import DataTable, Footer, Label, Static

    class ConfirmKill(ModalScreen[bool]):
        BINDINGS = [
            Binding("y", "answer(True)", "yes, kill it"),
            Binding("n,escape", "answer(False)", "no"),
        ]
        DEFAULT_CSS = """
        ConfirmKill { align: center middle; }
        ConfirmKill > Vertical {
            width: auto; height: auto; padding: 1 2; border: thick $error; background: $panel;
        }
        """

        def __init__(self, session: str, pid: int | None) -> None:
            super().__init__()
            self.question = (
                f"Kill session {session} (worker {pid or '-'})? Its running turn gets an "
                "error reply.  y: kill   n: keep"
            )

        def compose(self) -> ComposeResult:
            with Vertical():
                yield Label(self.question)

        def action_answer(self, yes: bool) -> None:
            self.dismiss(yes)

    class Top(App[None]):
        TITLE = "corral top"
        BINDINGS = [
            Binding("q", "quit", "quit"),
            Binding("s", "next_sort", "sort"),
            Binding("r", "reverse", "reverse"),
            Binding("k", "kill", "kill selected"),
        ]
        DEFAULT_CSS = """
        #header { height: auto; background: $boost; padding: 0 1; }
        #message { height: auto; padding: 0 1; color: $warning; }
        DataTable { height: 1fr; }
        """

        def __init__(self) -> None:
            super().__init__()
            self.client = ControlClient(config, timeout)
            self.sort = sort
            self.reverse = False
            self.snap: Snapshot | None = None
            self.busy = threading.Lock()  # one look at a time: a slow corral costs no threads

        def compose(self) -> ComposeResult:
            yield Static("connecting to corral ...", id="header")
            yield DataTable(cursor_type="row", zebra_stripes=True)
            yield Static("", id="message")
            yield Footer()

        def on_mount(self) -> None:
            table = self.query_one(DataTable)
            for column in render.SESSION_COLUMNS:
                table.add_column(column, key=column)
            self.refresh_look()
            self.set_interval(interval, self.refresh_look)

        @work(thread=True)
        def refresh_look(self) -> None:
            if not self.busy.acquire(blocking=False):
                return  # the last look has not come back yet (bounded by --timeout)
            try:
                snap = look(self.client)
            finally:
                self.busy.release()
            self.call_from_thread(self.show, snap)

        def show(self, snap: Snapshot) -> None:
            if snap.status is None and self.snap is not None and self.snap.status is not None:
                # keep the last rows; say that corral stopped answering, and since when
                last = time.strftime("%H:%M:%S", time.localtime(self.snap.at))
                self.query_one("#header", Static).update(
                    f"{header(snap, self.sort, self.reverse)} (rows as of {last})"
                )
                return
            self.snap = snap
            self.query_one("#header", Static).update(header(snap, self.sort, self.reverse))
            self.fill()

        def fill(self) -> None:
            if self.snap is None:
                return
            table = self.query_one(DataTable)
            selected = self.selected()
            table.clear()
            rows = ordered(self.snap.sessions, self.sort, self.reverse)
            for s in rows:
                table.add_row(*render.session_row(s), key=s.session)
            keys = [s.session for s in rows]
            if selected in keys:
                table.move_cursor(row=keys.index(selected), scroll=False)

        def selected(self) -> str | None:
            table = self.query_one(DataTable)
            if not table.row_count:
                return None
            row_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
            return None if row_key.value is None else str(row_key.value)

        def action_next_sort(self) -> None:
            names = list(SORTS)
            self.sort = names[(names.index(self.sort) + 1) % len(names)]
            self.redraw()

        def action_reverse(self) -> None:
            self.reverse = not self.reverse
            self.redraw()

        def redraw(self) -> None:
            if self.snap is not None:
                self.query_one("#header", Static).update(header(self.snap, self.sort, self.reverse))
            self.fill()

        def action_kill(self) -> None:
            session = self.selected()
            if session is None or self.snap is None:
                self.say("no session selected")
                return
            pid = next((s.pid for s in self.snap.sessions if s.session == session), None)

            def answered(yes: bool | None) -> None:
                if yes:
                    self.say(f"killing {session} ...")
                    self.kill(session)
                else:
                    self.say(f"{session}: not killed")

            self.push_screen(ConfirmKill(session, pid), answered)

        @work(thread=True)
        def kill(self, session: str) -> None:
            try:
                result = self.client.kill(session, False).body
            except click.ClickException as e:
                self.call_from_thread(self.say, f"kill {session}: {e.format_message()}")
                return
            done = "killed" if result.reaped else "still stopping:"
            self.call_from_thread(self.say, f"{done} {result.session} (worker {result.pid})")
            self.call_from_thread(self.refresh_look)

        def say(self, text: str) -> None:
            self.query_one("#message", Static).update(text)

    Top().run()
