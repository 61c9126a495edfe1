"""Which store a config asks for: SQLite in state_dir (the default) or PostgreSQL."""

from __future__ import annotations

from typing import TypeAlias

from corral.supervisor.config import Config
from corral.supervisor.store import Store
from corral.supervisor.store_pg import PgStore, StoreError

AnyStore: TypeAlias = Store | PgStore

__all__ = ["AnyStore", "StoreError", "make_store"]


def make_store(config: Config, durable: bool = True) -> AnyStore:
    """The store `[store] url` names, not yet opened (`await store.open()`).

    `durable=False` (benchmarks only) commits without waiting for the disk: SQLite's
    synchronous=OFF, PostgreSQL's synchronous_commit=off. Opening a PostgreSQL store
    raises StoreError (StoreUnavailable, SchemaMismatch) with a message that names
    `store.url` and shows no password.
    """
    if config.store.url:
        return PgStore(config.store.url, durable=durable, lease_ttl=float(config.cluster.lease_ttl))
    return Store(config.state_path / "corral.db", durable=durable)
