"""Alembic on every shard: the ``env.py`` helper and the autogenerate filter.

``shardsession migrate`` (the CLI) runs the same Alembic command on every shard of a
cluster, one shard after another, handing each shard's connection to ``env.py`` in
``config.attributes["connection"]`` and its shard id in ``config.attributes["shard"]``.
An ``env.py`` that works both under ``shardsession migrate`` and under plain ``alembic``
(against ``sqlalchemy.url``)::

    from alembic import context
    from shardsession.migrations import run_migrations
    from myapp.models import Base

    run_migrations(context, Base.metadata)

A migration that must differ per shard (a broadcast table's seed rows on one shard only,
say) asks :func:`current_shard`. Every shard keeps its own ``alembic_version`` table, so
shards on different revisions are each upgraded from where they are.

This module needs the ``alembic`` extra (``pip install 'shardsession[alembic]'``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.pool import NullPool

from .backends.base import CLUSTER_TABLE, DECISION_TABLE

__all__ = ["SHARD_ATTRIBUTE", "current_shard", "include_object", "run_migrations"]

#: key of ``alembic.config.Config.attributes`` holding the shard id being migrated
SHARD_ATTRIBUTE = "shard"

#: shardsession's own tables: never proposed for change or drop by autogenerate
OWN_TABLES = frozenset({DECISION_TABLE, CLUSTER_TABLE})


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic ``include_object`` hook that keeps shardsession's decision and cluster
    tables (and their indexes and constraints) out of autogenerate, which would
    otherwise propose dropping them from every shard."""
    if type_ == "table":
        return name not in OWN_TABLES
    table = getattr(obj, "table", None)
    return getattr(table, "name", None) not in OWN_TABLES


def current_shard(context: Any) -> str | None:
    """The shard id being migrated (``None`` under plain ``alembic``): pass
    ``alembic.context`` or ``op.get_context()``."""
    config = getattr(context, "config", None)
    if config is None:  # a MigrationContext: its environment holds the config
        config = getattr(getattr(context, "environment_context", None), "config", None)
    shard = getattr(config, "attributes", {}).get(SHARD_ATTRIBUTE)
    return None if shard is None else str(shard)


@contextmanager
def transactional_sqlite_ddl(connection: Connection) -> Iterator[None]:
    """Make the transactions begun on ``connection`` inside this block real ones on a
    pysqlite connection (SQLite's DDL is transactional, but pysqlite's default mode
    commits before DDL and begins only before DML). The pysqlite recipe of SQLAlchemy's
    documentation: the driver's own transaction handling off (``isolation_level =
    None``) and an explicit ``BEGIN`` at each SQLAlchemy begin. Any other connection, or
    one already in a transaction, is left as it is."""
    if (
        connection.dialect.name != "sqlite"
        or connection.dialect.driver != "pysqlite"
        or connection.in_transaction()
    ):
        yield
        return
    dbapi_connection: Any = connection.connection.driver_connection
    previous = dbapi_connection.isolation_level

    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    dbapi_connection.isolation_level = None
    event.listen(connection, "begin", _begin)
    try:
        yield
    finally:
        event.remove(connection, "begin", _begin)
        dbapi_connection.isolation_level = previous


def run_migrations(context: Any, target_metadata: Any, **configure: Any) -> None:
    """The body of an ``env.py``: configure Alembic for one shard and run its migrations.

    :param context: ``alembic.context``.
    :param target_metadata: the application's ``MetaData`` (for autogenerate).
    :param configure: more ``context.configure()`` keywords; an ``include_object`` given
        here is applied after shardsession's own filter.

    Each migration runs in a transaction of its own (``transaction_per_migration``), so a
    shard where one revision fails keeps the revisions before it and a rerun resumes from
    there.

    Failure semantics: an exception in a migration propagates; on PostgreSQL and SQLite
    that migration's DDL is rolled back (on a pysqlite shard through
    :func:`transactional_sqlite_ddl`, as pysqlite would otherwise commit before each DDL
    statement), on MySQL/MariaDB (no transactional DDL) what it executed before the
    failure stays.
    """
    user_filter = configure.pop("include_object", None)

    def _include(obj: Any, name: str | None, type_: str, reflected: bool,
                 compare_to: Any) -> bool:
        if not include_object(obj, name, type_, reflected, compare_to):
            return False
        return True if user_filter is None else bool(
            user_filter(obj, name, type_, reflected, compare_to))

    configure.setdefault("transaction_per_migration", True)
    if context.is_offline_mode():
        context.configure(url=context.config.get_main_option("sqlalchemy.url"),
                          target_metadata=target_metadata, include_object=_include,
                          literal_binds=True, **configure)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=_include, **configure)
        with transactional_sqlite_ddl(connection), context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, target_metadata=target_metadata,
                              include_object=_include, **configure)
            with transactional_sqlite_ddl(conn), context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
