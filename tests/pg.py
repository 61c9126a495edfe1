"""A real PostgreSQL for the tests: $CORRAL_TEST_PG_URL, or a throwaway server started here.

The throwaway server: `initdb` and `postgres` from Debian's packages (or $PATH) in a
temporary directory, as the `postgres` user when the tests run as root (PostgreSQL
refuses to run as root), on a free 127.0.0.1 port and a unix socket in that
directory, fsync off (these tests prove corral's behaviour, not the disk's). It is
stopped by its PID at the end of the session, and dies with the test run if that is
killed (parent-death signal).

Without PostgreSQL the tests that need it are skipped on a developer's machine and
FAIL in CI (CI=true): a CI run must not pass by not testing.

Every test gets a database of its own, from a template that already holds corral's
schema (`pg_url`), or an empty one (`pg_empty_url`) for the migration tests.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.harness import free_port

ENV = "CORRAL_TEST_PG_URL"
PASSWORD_ROLE = "corral_pw"  # a role that must log in with a password over TCP


class Unavailable(Exception):
    pass


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_bin(name: str) -> Path | None:
    """The newest Debian PostgreSQL's `name`, else the one on $PATH."""

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=version)
    if found:
        return found[-1]
    on_path = shutil.which(name)
    return Path(on_path) if on_path else None


def with_db(url: str, dbname: str) -> str:
    """`url` pointing at another database (a postgresql:// URL stays one)."""
    if url.startswith(("postgresql://", "postgres://")):
        scheme, _, rest = url.partition("://")
        netloc, _, path = rest.partition("/")
        _, q, query = path.partition("?")
        return f"{scheme}://{netloc}/{dbname}{q}{query}"
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


class PgServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.admin_url = admin_url  # a superuser (or CREATEDB role) on a maintenance db
        self.proc = proc
        self.base: Path | None = None
        self.port: int | None = None
        self.password_url: str | None = None  # only on a server started here

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)

    def create_database(self, template: str | None = None) -> str:
        name = f"corral_t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template or "template0"}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, dbname: str) -> str:
        return with_db(self.admin_url, dbname)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGINT, 0, 0, 0)  # PR_SET_PDEATHSIG: fast shutdown if pytest dies


def start_server(timeout: float = 60.0) -> PgServer:
    initdb, postgres = find_bin("initdb"), find_bin("postgres")
    if initdb is None or postgres is None:
        raise Unavailable(
            "no PostgreSQL server binaries (initdb, postgres) found: "
            f"apt-get install postgresql, or set {ENV}"
        )
    base = Path(tempfile.mkdtemp(prefix="corral-pg-"))  # short: the socket path has a limit
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            raise Unavailable("running as root and there is no `postgres` user to run as") from None
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data = base / "data"
    init = subprocess.run(
        [
            *(str(initdb), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-sync"),
            *("--auth-local=trust", "--auth-host=trust"),
        ],
        capture_output=True,
        timeout=120,
        cwd=base,
        **as_user,
    )
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise Unavailable(f"initdb failed: {init.stderr.decode(errors='replace')[-2000:]}")
    # the password role must authenticate over TCP; everyone else is trusted
    hba = data / "pg_hba.conf"
    hba.write_text(
        "local all all trust\n"
        f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
        "host all all 127.0.0.1/32 trust\n"
    )
    port = free_port()
    log = open(base / "postgres.log", "wb")  # the server inherits it
    proc = subprocess.Popen(
        [
            *(str(postgres), "-D", str(data), "-p", str(port), "-k", str(base)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"),
            *("-c", "max_connections=300", "-c", "shared_buffers=32MB"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=base,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        **as_user,
    )
    log.close()
    server = PgServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", proc)
    server.base, server.port = base, port
    deadline = time.monotonic() + timeout
    while True:  # ends when the server answers, exits, or at the deadline
        if proc.poll() is not None:
            text = (base / "postgres.log").read_text(errors="replace")[-2000:]
            server.stop()
            raise Unavailable(f"postgres exited {proc.returncode}: {text}")
        try:
            with server.admin() as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise Unavailable(f"postgres did not answer within {timeout:.0f}s") from None
            time.sleep(0.1)
    with server.admin() as conn:
        conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'pw-for-tests'")
        conn.execute(f"CREATE DATABASE {PASSWORD_ROLE} OWNER {PASSWORD_ROLE}")
    server.password_url = f"postgresql://{PASSWORD_ROLE}@127.0.0.1:{port}/{PASSWORD_ROLE}"
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL; FAILS in CI when there is none, else skips."""
    external = os.environ.get(ENV)
    server: PgServer | None = None
    try:
        if external:
            server = PgServer(external)
            with server.admin() as conn:
                conn.execute("SELECT 1")
        else:
            server = start_server()
    except (Unavailable, psycopg.Error) as e:
        if server is not None:
            server.stop()
        message = f"no PostgreSQL for the tests: {e}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_template(pg_server: PgServer) -> Iterator[str]:
    """A database holding corral's current schema, to copy for each test."""
    from corral.supervisor.store_pg import migrate

    name = pg_server.create_database()
    with psycopg.connect(pg_server.url(name), autocommit=True) as conn:
        migrate(conn)
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def pg_url(pg_server: PgServer, pg_template: str) -> Iterator[str]:
    """A fresh database with corral's schema, dropped after the test."""
    name = pg_server.create_database(template=pg_template)
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture
def pg_empty_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database without corral's schema, dropped after the test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
