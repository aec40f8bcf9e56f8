"""Backend mixes for the two-phase tests: ``mix_urls(request, mix) -> {shard: url}``."""

from __future__ import annotations

from typing import Any

import pytest

MIXES = ["pg+pg", "pg2db", "pg+mariadb", "mariadb+mariadb", "pg+sqlite"]
#: PostgreSQL + MariaDB + SQLite (SQLite decides). SQLite comes first: the MariaDB branch
#: fixes the gtrid (and so the decider) at its XA START; a SQLite writer that joins after
#: that can decide only when the coordinator knows the session's shards (a ShardedSession,
#: or ``install(..., shards=...)``).
THREE_WAY = "sqlite+pg+mariadb"


def mix_urls(request: pytest.FixtureRequest, mix: str) -> dict[str, str]:
    get = request.getfixturevalue
    if mix == "pg+pg":
        return {"alpha": get("pg_url_a"), "beta": get("pg_url_b")}
    if mix == "pg2db":
        # two databases on one server: different GIDs are required (server-wide unique)
        server: Any = get("pg_server_a")
        first = get("pg_url_a")
        second = server.create_database()
        request.addfinalizer(lambda: _drop(server, second))
        return {"alpha": first, "beta": second}
    if mix == "pg+mariadb":
        return {"alpha": get("pg_url_a"), "beta": get("mariadb_url")}
    if mix == "mariadb+mariadb":
        server = get("mariadb_server")
        first = get("mariadb_url")
        second = server.create_database()
        request.addfinalizer(lambda: _drop(server, second))
        return {"alpha": first, "beta": second}
    if mix == "pg+sqlite":
        folder = get("sqlite_dir")
        return {"alpha": get("pg_url_a"), "beta": f"sqlite:///{folder / 'beta.db'}"}
    if mix == THREE_WAY:
        folder = get("sqlite_dir")
        return {"gamma": f"sqlite:///{folder / 'gamma.db'}", "alpha": get("pg_url_a"),
                "beta": get("mariadb_url")}
    if mix == "pg+mariadb_binlog":
        return {"alpha": get("pg_url_a"), "beta": get("mariadb_binlog_url")}
    raise AssertionError(mix)


def _drop(server: Any, url: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        from harness.servers import clear_prepared

        clear_prepared(url, None if server.kind == "postgresql" else ("ss",))
        server.drop_database(make_url(url).database)
    except Exception:
        pass
