"""What `corral ls`, `show` and `status` print for people, from answers of known shape."""

from __future__ import annotations

from corral.cli.render import fmt_bytes, fmt_secs, session_fields, session_table, status_fields
from corral.protocol.control import SessionInfo, Status


def session(**changes: object) -> SessionInfo:
    fields: dict[str, object] = {
        "session": "alice",
        "state": "idle",
        "pid": 4321,
        "rss": 50 * 1024 * 1024,
        "cpu": 1.26,
        "processes": 2,
        "age": 75.0,
        "turn_age": None,
        "turn": None,
        "attempt": None,
        "queue": 0,
        "restarts": 0,
        "last_exit": None,
        "demoted": False,
        "quarantined_until": None,
    }
    fields.update(changes)
    return SessionInfo(**fields)  # type: ignore[arg-type]


def test_sizes_and_durations_read_in_the_largest_whole_unit():
    assert [fmt_bytes(n) for n in (None, 0, 512, 2048, 3 * 1024**2, 5 * 1024**3)] == [
        "-",
        "-",
        "512B",
        "2.0KiB",
        "3.0MiB",
        "5.0GiB",
    ]
    assert [fmt_secs(s) for s in (None, 0.04, 59.9, 60, 3599, 3600, 90061)] == [
        "-",
        "0.0s",
        "59.9s",
        "1m00s",
        "59m59s",
        "1h00m",
        "25h01m",
    ]


def test_ls_lines_up_columns_and_shows_a_dash_for_what_a_session_without_worker_lacks():
    lines = session_table(
        [
            session(session="a-long-session-name", state="busy", turn_age=3.5, queue=2),
            session(
                session="q",
                state="quarantined",
                pid=None,
                rss=0,
                cpu=0.0,
                age=None,
                restarts=3,
                last_exit="oom",
            ),
        ]
    )
    header, busy, quarantined = lines
    assert header.split() == [
        "SESSION", "STATE", "PID", "RSS", "CPU", "AGE", "TURN", "QUEUE", "RESTARTS", "LAST-EXIT",
    ]  # fmt: skip
    assert busy.split() == [
        "a-long-session-name", "busy", "4321", "50.0MiB", "1.3s", "1m15s", "3.5s", "2", "0", "-",
    ]  # fmt: skip
    assert quarantined.split() == ["q", "quarantined", "-", "-", "-", "-", "-", "0", "3", "oom"]
    # every column starts where its header does
    for name in ("STATE", "PID", "QUEUE", "LAST-EXIT"):
        col = header.index(name)
        assert busy[col - 2 : col] == "  " and busy[col] != " "
        assert quarantined[col - 2 : col] == "  " and quarantined[col] != " "


def test_show_says_until_when_a_session_is_quarantined_and_that_it_was_demoted():
    lines = session_fields(
        session(state="quarantined", demoted=True, quarantined_until=1_700_000_000.0)
    )
    shown = dict(line.split(":", 1) for line in lines)
    assert shown["quarantined until"].strip() == "2023-11-14 22:13:20 UTC"
    assert shown["scheduling"].strip().startswith("idle")
    assert shown["pid"].strip() == "4321" and shown["turn"].strip() == "-"
    assert all(line[18] == " " and line[19] != " " for line in lines)  # values in one column


def test_status_counts_only_the_states_that_have_workers():
    st = Status(
        pid=10,
        version="0.1.0",
        uptime=7200.0,
        draining=True,
        agent="pkg:agent",
        state_dir="/var/lib/corral",
        zygote_pid=None,
        sessions=3,
        workers={"starting": 0, "idle": 2, "busy": 1},
        inbox=1,
        loop_lag=0.0004,
        loop_lag_max=0.0321,
    )
    shown = {k: v.strip() for k, v in (line.split(":", 1) for line in status_fields(st))}
    assert shown["sessions"] == "3 (2 idle, 1 busy)"
    assert shown["state"] == "draining"
    assert shown["zygote pid"] == "-"
    assert shown["loop lag"] == "0.4ms (max 32.1ms in the last minute)"
    idle = Status(**{**{f: getattr(st, f) for f in st.__struct_fields__}, "workers": {"idle": 0}})
    assert "3 (none)" in "\n".join(status_fields(idle))
