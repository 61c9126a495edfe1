"""What only the PostgreSQL store has: its schema and migrations, the URL in the config,
the password from libpq, and a connection that can be lost."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from corral.protocol.types import Origin
from corral.supervisor.config import Config, ConfigError, StoreConfig, parse_config
from corral.supervisor.store import Store
from corral.supervisor.store_pg import (
    LATEST,
    PgStore,
    SchemaMismatch,
    StoreUnavailable,
    schema_version,
)
from corral.supervisor.stores import make_store
from tests.harness import free_port
from tests.pg import PgServer

HTTP = Origin(channel="http")


def run(body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await body()

    asyncio.run(bounded())


def versions(url: str) -> list[tuple[int, object]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT version, applied_at FROM corral.schema_version ORDER BY version"
        ).fetchall()
    return [(int(v), at) for v, at in rows]


# ---- schema


def test_nodes_starting_at_once_on_an_empty_database_migrate_it_once(pg_empty_url: str) -> None:
    async def body() -> None:
        stores = [PgStore(pg_empty_url) for _ in range(5)]
        await asyncio.gather(*(s.open() for s in stores))  # five threads, five connections
        accepted = await asyncio.gather(
            *(s.accept("s", "x", HTTP, f"n{i}") for i, s in enumerate(stores))
        )
        assert not any(a.duplicate for a in accepted)
        await asyncio.gather(*(s.close() for s in stores))

    run(body)
    assert [v for v, _ in versions(pg_empty_url)] == list(range(1, LATEST + 1))
    with psycopg.connect(pg_empty_url) as conn:
        assert schema_version(conn) == LATEST


def test_opening_a_migrated_database_again_changes_nothing(pg_empty_url: str) -> None:
    async def open_accept_close(n: int) -> None:
        store = PgStore(pg_empty_url)
        await store.open()
        await store.accept("s", "x", HTTP, f"m{n}")
        await store.close()

    run(lambda: open_accept_close(1))
    first = versions(pg_empty_url)
    run(lambda: open_accept_close(2))
    assert versions(pg_empty_url) == first  # the same rows, the same applied_at

    async def both_there() -> None:
        store = PgStore(pg_empty_url)
        await store.open()
        assert [m.id for m in await store.pending()] == ["m1", "m2"]
        await store.close()

    run(both_there)


def test_a_database_with_a_newer_schema_is_refused_with_what_to_do(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO corral.schema_version (version) VALUES (%s)", (LATEST + 1,))

    async def body() -> None:
        store = PgStore(pg_url)
        with pytest.raises(SchemaMismatch) as e:
            await store.open()
        text = str(e.value)
        assert "store.url" in text and f"version {LATEST + 1}" in text
        assert "upgrade corral" in text

    run(body)


def test_a_role_without_create_rights_runs_on_a_schema_an_admin_migrated(
    pg_server: PgServer, pg_url: str
) -> None:
    """Migration creates only what is missing, so an unprivileged runtime role works."""
    role = "corral_runtime_" + pg_url.rsplit("/", 1)[-1][-8:]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA corral TO {role}")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA corral TO {role}")
        dbname = pg_url.rsplit("/", 1)[-1]
        # a new role has no CREATE on the database: CREATE SCHEMA would fail
    runtime_url = pg_url.replace("://postgres@", f"://{role}@", 1)
    if runtime_url == pg_url:
        pytest.skip("the test server's URL names no user to swap")

    async def body() -> None:
        store = PgStore(runtime_url)
        await store.open()
        assert not (await store.accept("s", "x", HTTP, "r1")).duplicate
        await store.close()

    try:
        run(body)
    finally:
        with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {role}")


# ---- connection


def test_an_unreachable_database_is_an_error_naming_store_url_without_the_password() -> None:
    url = f"postgresql://corral:s3cret-pw@127.0.0.1:{free_port()}/corral?connect_timeout=5"

    async def body() -> None:
        store = PgStore(url)
        with pytest.raises(StoreUnavailable) as e:
            await store.open()
        text = str(e.value)
        assert text.startswith("store.url: cannot connect to postgresql://corral:***@127.0.0.1:")
        assert "s3cret-pw" not in text

    run(body)


def test_the_password_comes_from_libpq_not_the_url(
    pg_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role that needs a password: the URL has none; PGPASSWORD or a .pgpass file has it."""
    if pg_server.password_url is None:
        pytest.skip("only the server these tests start has a password-only role")
    url = pg_server.password_url
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))

    async def open_close() -> None:
        store = PgStore(url)
        await store.open()
        await store.close()

    with pytest.raises(StoreUnavailable, match=r"^store\.url: cannot connect to postgresql://"):
        run(open_close)
    monkeypatch.setenv("PGPASSWORD", "pw-for-tests")
    run(open_close)
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_server.port}:*:corral_pw:pw-for-tests\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    run(open_close)


def test_a_lost_connection_fails_that_group_and_the_store_comes_back_by_itself(
    pg_url: str,
) -> None:
    async def body() -> None:
        store = PgStore(pg_url)
        await store.open()
        await store.accept("s", "before", HTTP, "l1")
        with psycopg.connect(pg_url, autocommit=True) as admin:
            dbname = pg_url.rsplit("/", 1)[-1]
            pids = [
                pid
                for (pid,) in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                    "AND application_name = 'corral'",
                    (dbname,),
                )
            ]
            assert len(pids) == 1
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pids[0],))
        with pytest.raises(StoreUnavailable, match=r"^store\.url: lost the database"):
            await store.accept("s", "during", HTTP, "l2")
        # the next group reconnects: nothing was lost, and the failed accept can be retried
        assert not (await store.accept("s", "during", HTTP, "l2")).duplicate
        assert [m.id for m in await store.pending()] == ["l1", "l2"]
        await store.close()

    run(body)


def test_an_accept_is_on_disk_before_it_returns_whatever_the_database_default(
    pg_url: str,
) -> None:
    dbname = pg_url.rsplit("/", 1)[-1]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')

    async def setting(durable: bool) -> str:
        store = PgStore(pg_url, durable=durable)
        await store.open()
        value = await store._submit(
            lambda c: str(c.execute("SHOW synchronous_commit").fetchone()[0])  # type: ignore[index]
        )
        await store.close()
        return value

    async def body() -> None:
        assert await setting(True) == "on"
        assert await setting(False) == "off"  # the benchmark's no-fsync run

    run(body)


# ---- config


def test_store_url_in_the_config_chooses_the_store(tmp_path: Path) -> None:
    cfg = parse_config(f'[supervisor]\nstate_dir = "{tmp_path}"\n'.encode())
    assert cfg.store.url == ""
    sqlite = make_store(cfg)
    assert isinstance(sqlite, Store) and sqlite.path == tmp_path / "corral.db"
    cfg = parse_config(b'[store]\nurl = "postgresql://corral@db.internal:5432/corral"\n')
    pg = make_store(cfg)
    assert isinstance(pg, PgStore) and pg.url == "postgresql://corral@db.internal:5432/corral"
    assert Config().store == StoreConfig(url="")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://corral:hunter2@db/corral", "store.url: expected"),
        ("corral:hunter2@db.internal:5432", "store.url: expected"),
        ("postgresql://corral:hunter2@db/corral?sslmode", "store.url: libpq cannot parse"),
        ("postgresql://corral:hunter2@db/%zz", "store.url: libpq cannot parse"),
    ],
)
def test_a_bad_store_url_is_an_error_naming_the_key_and_hiding_the_password(
    url: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(f'[store]\nurl = "{url}"\n'.encode(), "corral.toml")
    text = str(e.value)
    assert text.startswith(f"corral.toml: {expected}")
    assert "hunter2" not in text and "***" in text
