"""corral's schema in PostgreSQL: versioned migrations, applied once, serialised across
nodes; and the errors a PostgreSQL store raises."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Final

import psycopg

from corral.supervisor.config import redact_url
from corral.supervisor.storethread import StoreError, StoreUnavailable

log = logging.getLogger("corral.store")
__all__ = ["SchemaMismatch", "StoreError", "StoreUnavailable", "migrate", "redact"]

SCHEMA: Final = "corral"
# pg_advisory_xact_lock key that serialises migrations of every corral on one database
# ("corral" in ASCII)
MIGRATION_LOCK: Final = 0x636F7272616C
MIGRATION_LOCK_WAIT: Final = "60s"

# Each migration runs once, in order, in the migration transaction; append only.
MIGRATIONS: Final[list[tuple[int, str]]] = [
    (
        1,
        """
CREATE TABLE corral.messages (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    session text NOT NULL,
    text bytea NOT NULL,
    origin text NOT NULL,
    accepted_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'pending',
    finished_at double precision
);
CREATE INDEX messages_pending ON corral.messages (state, seq);
CREATE TABLE corral.replies (
    cursor bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    message_id text NOT NULL,
    session text NOT NULL,
    idx integer NOT NULL,
    text bytea NOT NULL,
    kind text NOT NULL,
    channel text NOT NULL,
    origin text NOT NULL,
    created_at double precision NOT NULL,
    delivery text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX replies_by_session ON corral.replies (session, channel, cursor);
CREATE INDEX replies_by_message ON corral.replies (message_id, idx);
CREATE INDEX replies_undelivered ON corral.replies (delivery, next_attempt_at);
CREATE TABLE corral.sessions (
    key text PRIMARY KEY,
    quarantined_until double precision,
    restarts integer NOT NULL DEFAULT 0,
    last_exit text
);
""",
    ),
    (2, "CREATE INDEX messages_by_session ON corral.messages (session, seq);"),
    (
        3,
        """
-- polling channels (Telegram): where to resume, committed with the messages it covers
CREATE TABLE corral.channel_offsets (
    name text PRIMARY KEY,
    next_offset bigint NOT NULL
);
-- a reply sent in parts (Telegram's 4096 limit): how many parts went out already
CREATE TABLE corral.reply_parts (
    reply_id text PRIMARY KEY,
    sent integer NOT NULL
);
""",
    ),
    # retention prunes finished messages oldest first
    (4, "CREATE INDEX IF NOT EXISTS messages_finished ON corral.messages (finished_at);"),
    # the last `corral dead-letters retry` of a reply: delivery's max_age counts from it
    (5, "ALTER TABLE corral.replies ADD COLUMN retried_at double precision;"),
    (
        6,
        """
-- one lease per session: the node that runs its turns, and a fencing epoch that every
-- write of a turn checks; `node` NULL: free. Times are the database's (now()) only.
CREATE TABLE corral.leases (
    session text PRIMARY KEY,
    node text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    last_node text
);
CREATE INDEX leases_by_node ON corral.leases (node);
INSERT INTO corral.leases (session)
    SELECT DISTINCT session FROM corral.messages WHERE state = 'pending'
    ON CONFLICT DO NOTHING;
CREATE INDEX messages_pending_by_session ON corral.messages (session, seq)
    WHERE state = 'pending';
-- the nodes of the cluster: heartbeat, and what `corral ls` on another node shows of them
CREATE TABLE corral.nodes (
    name text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    draining boolean NOT NULL DEFAULT false,
    pid integer,
    sessions bytea
);
-- operator actions (kill, release) for the node that owns a session
CREATE TABLE corral.commands (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node text NOT NULL,
    op text NOT NULL,
    session text NOT NULL,
    force boolean NOT NULL DEFAULT false,
    taken boolean NOT NULL DEFAULT false,
    result bytea,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_by_node ON corral.commands (node, taken);
""",
    ),
    # how the agent asked a reply to be shown: "", "html", "markdown"
    (7, "ALTER TABLE corral.replies ADD COLUMN markup text NOT NULL DEFAULT '';"),
]
LATEST: Final = MIGRATIONS[-1][0]


class SchemaMismatch(StoreError):
    """The database holds a corral schema this corral does not know."""


def redact(url: str) -> str:
    """The URL (or key=value string) as it may be shown: any password replaced by ***."""
    return redact_url(url)


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The corral schema version of the database; None when it has none yet."""
    row = conn.execute("SELECT to_regclass('corral.schema_version')").fetchone()
    if row is None or row[0] is None:
        return None
    (version,) = conn.execute("SELECT max(version) FROM corral.schema_version").fetchone() or (
        None,
    )
    return None if version is None else int(version)


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring corral's schema to LATEST; the version found before. `conn` is in autocommit.

    One transaction under a transaction-scoped advisory lock: a second node starting
    at the same moment waits for the first and then finds nothing to do. Objects are
    created only where missing, so a role without CREATE on the database can run
    corral once an administrator has migrated.
    """
    conn.execute("BEGIN")
    try:
        conn.execute(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_WAIT}'")
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        found = schema_version(conn)
        if found is not None and found > LATEST:
            raise SchemaMismatch(
                f"store.url: the database's corral schema is version {found}, newer than this "
                f"corral knows ({LATEST}): upgrade corral on this node (every node of a cluster "
                "runs the same version), or point store.url at another database"
            )
        if found is None:
            exists = conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (SCHEMA,)
            ).fetchone()
            if exists is None:
                conn.execute(f"CREATE SCHEMA {SCHEMA}")
            conn.execute(
                "CREATE TABLE corral.schema_version (version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for version, sql in MIGRATIONS:
            if found is None or version > found:
                conn.execute(sql)
                conn.execute("INSERT INTO corral.schema_version (version) VALUES (%s)", (version,))
                log.info("store: corral schema migrated to version %d", version)
        conn.execute("COMMIT")
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
    return found or 0


# ---- rows
