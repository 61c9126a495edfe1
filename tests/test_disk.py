"""Promise 3 on a failing disk: a full disk loses nothing accepted, a lost or corrupted
database stops the supervisor loudly, and the state on disk is private."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.protocol.types import Origin
from corral.supervisor.store import Store
from corral.supervisor.storethread import StoreBroken
from tests.harness import REPO, Corral, wait_for

CHAOS = "corral.worker.agents.chaos:agent"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:  # ends at ENOSPC
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def status(c: Corral) -> dict:
    r = c.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def replies_of(c: Corral, session: str) -> list[dict]:
    code, body = c.request("GET", f"/v1/sessions/{session}/replies?limit=1000")
    assert code == 200, body
    return body["replies"]


def test_full_disk_refuses_with_503_and_answers_every_accepted_message_once_space_returns(
    tmp_path, small_disk
):
    c = Corral(tmp_path, {"supervisor": {"state_dir": str(small_disk)}}, agent=CHAOS).start()
    assert c.texts("warm", "hello") == ["hello"]
    # turns running while the disk fills: their replies and finishes hit the full disk
    running = {}
    for i in range(5):
        code, body = c.request(
            "POST", "/v1/messages", {"session": f"run{i}", "text": f"sleep 2; echo done{i}"}
        )
        assert code == 202, body
        running[f"run{i}"] = body["id"]
    time.sleep(0.5)
    filler = fill(small_disk)
    accepted: dict[str, str] = {}
    refused = []
    big = "x" * 30_000  # many pages per message: the WAL must grow
    for i in range(30):
        session = f"full{i % 6}"
        code, body = c.request(
            "POST", "/v1/messages", {"session": session, "text": f"echo {i} {big}"}
        )
        assert code in (202, 503), (code, body)  # never a 500
        if code == 202:
            accepted[body["id"]] = session
        else:
            refused.append(body)
    assert refused, "the full disk refused nothing: the test did not fill it"
    assert all("cannot store messages now" in b["error"] for b in refused), refused
    code, body = c.request("POST", "/v1/messages", {"session": "full0", "text": big})
    assert code == 503
    st = status(c)
    assert st["store"].startswith("cannot write"), st
    assert "disk is full" in st["store"] or "cannot be written" in st["store"], st
    time.sleep(3)  # the running turns end on the full disk

    filler.unlink()
    want = {**{m: s for s, m in running.items()}, **accepted}

    def answered() -> bool:
        got = {r["in_reply_to"] for s in set(want.values()) for r in replies_of(c, s)}
        return set(want) <= got

    wait_for(answered, timeout=60)
    for i, (session, message_id) in enumerate(running.items()):
        texts = [r["text"] for r in replies_of(c, session) if r["in_reply_to"] == message_id]
        assert texts == [f"done{i}"], texts  # the real reply, once: no error, no repeat
    wait_for(lambda: status(c)["store"] == "ok", timeout=30)  # nothing left unwritten
    wait_for(lambda: status(c)["inbox"] == 0, timeout=30)
    assert c.texts("after", "still serving") == ["still serving"]
    assert "Traceback" not in c.log()
    assert c.stop() == 0


def test_start_on_a_corrupted_database_fails_naming_the_file_with_exit_2(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = state / "corral.db"
    db.write_bytes(b"this is not an SQLite database, it is garbage\n" * 200)
    c = Corral(tmp_path)
    with pytest.raises(RuntimeError, match="exited with 2"):
        c.start()
    log = c.log()
    assert "cannot start:" in log and str(db) in log, log
    assert "corrupted" in log and "mv " in log, log
    assert "Traceback" not in log, log


def test_database_deleted_while_serving_stops_intake_and_exits_non_zero(tmp_path):
    c = Corral(tmp_path, agent=CHAOS).start()
    assert c.texts("a", "hello") == ["hello"]
    for suffix in ("", "-wal", "-shm"):
        (c.state / f"corral.db{suffix}").unlink(missing_ok=True)
    assert c.proc is not None
    code = c.proc.wait(timeout=30)
    assert code != 0
    log = c.log()
    assert "was deleted while serving" in log, log
    assert "Traceback" not in log, log
    assert not c.leftovers()


def test_database_replaced_while_serving_is_noticed(tmp_path):
    c = Corral(tmp_path).start()
    assert c.texts("a", "hello") == ["hello"]
    db = c.state / "corral.db"
    shutil.copy(db, tmp_path / "copy.db")
    os.replace(tmp_path / "copy.db", db)
    assert c.proc is not None
    assert c.proc.wait(timeout=30) != 0
    assert "was replaced by another file while serving" in c.log()


def corrupt(db: Path) -> None:
    """Overwrite every page but the first two with random bytes."""
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(8192)
        f.write(os.urandom(size - 8192))


def test_corruption_found_while_serving_breaks_the_store(tmp_path):
    async def scenario() -> None:
        store = Store(tmp_path / "corral.db")
        broken: list[str] = []
        await store.open()
        store.on_broken.append(broken.append)
        try:
            for i in range(400):  # more pages than the connection caches
                await store.accept(f"s{i}", "x" * 8000, Origin(channel="http"), None)
            await store.close()
            # closed, the WAL is checkpointed into the file; a fresh connection caches nothing
            await store.open()
            corrupt(tmp_path / "corral.db")
            with pytest.raises(StoreBroken, match="is corrupted"):
                await store.session_summaries()
            await asyncio.sleep(0.1)
            assert broken and "is corrupted" in broken[0]
            with pytest.raises(StoreBroken):  # everything after fails fast
                await store.pending()
        finally:
            await store.close()

    asyncio.run(scenario())


def test_state_files_are_private_even_when_the_directory_existed_wider(tmp_path):
    state = tmp_path / "state"
    (state / "sessions").mkdir(parents=True)
    os.chmod(state, 0o755)
    db = state / "corral.db"
    sqlite3.connect(db).close()  # an older corral's database, world-readable
    os.chmod(db, 0o644)
    transcript = state / "sessions" / "alice.jsonl"
    transcript.write_text("")
    os.chmod(transcript, 0o644)
    c = Corral(tmp_path).start()
    assert c.texts("alice", "secret") == ["secret"]
    assert c.texts("bob", "secret too") == ["secret too"]

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(state) == 0o700
    for name in ("corral.db", "corral.db-wal", "corral.db-shm"):
        assert mode(state / name) == 0o600, name
    assert mode(transcript) == 0o600
    assert mode(state / "sessions" / "bob.jsonl") == 0o600
    assert c.stop() == 0


def test_config_check_knows_retention_keep(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[retention]\nkeep = "2h"\n')
    r = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "config", "check", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    path.write_text('[retention]\nkeep = "soon"\n')
    r = subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "config", "check", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert r.returncode != 0 and "retention.keep" in r.stderr + r.stdout


def test_full_disk_does_not_end_webhook_delivery_and_every_reply_is_delivered_after(
    tmp_path, small_disk
):
    from tests.receiver import Receiver

    with Receiver([200], delay=2.0) as rx:
        config = {
            "supervisor": {"state_dir": str(small_disk)},
            "channels.webhook.hooks": {"url": rx.url},
            "delivery": {"retry_initial": "200ms", "retry_max": "1s"},
        }
        c = Corral(tmp_path, config, agent=CHAOS).start()
        ids = []
        for i in range(4):
            code, body = c.request(
                "POST", "/v1/channels/hooks/messages", {"session": f"h{i}", "text": f"echo h{i}"}
            )
            assert code == 202, body
            ids.append(body["id"])
        rx.wait_requests(0)
        time.sleep(1.0)  # the replies are stored; their POSTs are in flight
        filler = fill(small_disk)
        big = "x" * 30_000
        for _ in range(40):  # use up what room the WAL had: marking a delivery must fail too
            code, _ = c.request("POST", "/v1/messages", {"session": "filler", "text": big})
            if code == 503:
                break
        time.sleep(8)  # deliveries finish and cannot be recorded, again and again
        assert c.proc is not None and c.proc.poll() is None, c.log()
        filler.unlink()
        wait_for(lambda: {r["in_reply_to"] for r in rx.delivered()} >= set(ids), timeout=60)

        def recorded() -> bool:
            db = sqlite3.connect(small_disk / "corral.db")
            try:
                rows = db.execute(
                    "SELECT count(*) FROM replies WHERE channel = 'hooks' "
                    "AND delivery = 'delivered'"
                ).fetchone()
            finally:
                db.close()
            return rows[0] == len(ids)

        wait_for(recorded, timeout=60)
        assert len(rx.requests) > len(ids)  # some deliveries could not be recorded: sent again
        # a full disk is not a failure of the delivery service (past 5 a minute: exit 1)
        assert "service delivery to hooks failed" not in c.log()
        assert "Traceback" not in c.log()
        assert c.stop() == 0
