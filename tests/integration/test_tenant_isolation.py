"""The tenant-isolation attack matrix (issue 13): an acme session tries to read or write
the rows of other tenants every way a user could, on SQLite, PostgreSQL, MariaDB and a
PostgreSQL + MariaDB mix.

Tenants ``acme`` and ``initech`` share shard s0 (so the filter, not the routing, is what
keeps them apart there), ``globex`` is on s1 and ``hooli`` on s2. A poisoned row is
planted with plain SQL on s0: an initech comment that points at acme's account (what a
join or relationship load without the tenant filter would hand to acme).

The oracle of "nothing written" is the content of every table on every shard, read with
plain SQL before and after each test: it must not change.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    UniqueConstraint,
    column,
    create_engine,
    delete,
    exists,
    func,
    insert,
    lambda_stmt,
    literal,
    literal_column,
    select,
    table,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    column_property,
    joinedload,
    make_transient_to_detached,
    mapped_column,
    query_expression,
    relationship,
    selectinload,
    sessionmaker,
    with_expression,
)
from sqlalchemy.orm.exc import ObjectDeletedError

from shardsession import Broadcast, Follows, HashSharding, Placement, ShardedSession
from shardsession.exc import (
    ConfigurationError,
    ShardSessionError,
    StaleTenantDirectoryError,
    TenantError,
    TenantIsolationError,
    TenantRequiredError,
    UnsupportedQueryError,
)
from shardsession.query import paginate
from shardsession.tenancy import (
    CHECKED_OPTION,
    TenantDirectory,
    TenantSharding,
    tenancy_metadata,
    tenant_scope,
)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "tn_account"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(40))
    balance: Mapped[int] = mapped_column(Integer)
    invoices: Mapped[list[Invoice]] = relationship(back_populates="account")
    comments: Mapped[list[Comment]] = relationship(order_by="Comment.id")
    __table_args__ = (UniqueConstraint("tenant_id", "id"),)


class Invoice(Base):
    """Follows its account through a foreign key that carries the tenant key."""

    __tablename__ = "tn_invoice"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(40))
    account_id: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(Integer)
    account: Mapped[Account] = relationship(back_populates="invoices")
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "account_id"], ["tn_account.tenant_id", "tn_account.id"]
        ),
    )


class Comment(Base):
    """Tenant-owned, related to its account by ``account_id`` alone (as most schemas are)."""

    __tablename__ = "tn_comment"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(40))
    account_id: Mapped[int] = mapped_column(ForeignKey("tn_account.id"))
    body: Mapped[str] = mapped_column(String(60))


class Product(Base):
    """A global table spread by hash (not a tenant's)."""

    __tablename__ = "tn_product"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class Country(Base):
    __tablename__ = "tn_country"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


SHARDS = ("s0", "s1", "s2")
HOME = {"acme": "s0", "initech": "s0", "globex": "s1", "hooli": "s2"}
#: tenant -> (account id, invoice id, comment id); ids are unique across tenants
IDS = {"acme": 100, "initech": 300, "globex": 200, "hooli": 400}
TABLES = ("tn_account", "tn_invoice", "tn_comment", "tn_country", "tn_product",
          "shardsession_tenants", "shardsession_tenant_owners")


class Env:
    def __init__(self, engines: dict[str, Engine]) -> None:
        self.engines = engines
        self.directory = TenantDirectory("s0")
        self.placement = Placement({
            Account: TenantSharding(Account.tenant_id, self.directory),
            Invoice: Follows(Invoice.account),
            Comment: TenantSharding(Comment.tenant_id, self.directory),
            Country: Broadcast(),
            Product: HashSharding(Product.id),
        })
        self.Session = sessionmaker(class_=ShardedSession, shards=engines,
                                    placement=self.placement)
        self.Session().close()  # binds the directory to the engines

    @staticmethod
    def directory_owner_table() -> Any:
        return tenancy_metadata.tables["shardsession_tenant_owners"]

    def snapshot(self) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
        out: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
        for name, engine in self.engines.items():
            with engine.connect() as c:
                out[name] = {
                    t: sorted(tuple(r) for r in c.exec_driver_sql(f"SELECT * FROM {t}"))
                    for t in TABLES
                }
        return out


def _urls(request: pytest.FixtureRequest, backend: str, tmp: Any) -> tuple[list[str], Any]:
    made: list[tuple[Any, str]] = []

    def new(fixture: str) -> str:
        server = request.getfixturevalue(fixture)
        url = str(server.create_database())
        made.append((server, url))
        return url

    if backend == "sqlite":
        return [f"sqlite:///{tmp}/{s}.db" for s in SHARDS], made
    if backend == "postgresql":
        return [new("pg_server_a"), new("pg_server_b"), new("pg_server_a")], made
    if backend == "mysql":
        return [new("mariadb_server") for _ in SHARDS], made
    if backend == "pg+mariadb":
        return [new("pg_server_a"), new("mariadb_server"), new("pg_server_b")], made
    raise AssertionError(backend)


def _seed(env: Env) -> None:
    for e in env.engines.values():
        Base.metadata.create_all(e)
        tenancy_metadata.create_all(e)
        with e.begin() as c:
            c.execute(insert(Country.__table__), [{"code": "de", "name": "Germany"}])
    for tenant, shard in HOME.items():
        assert env.directory.add(tenant, shard) == shard
    for tenant, base in IDS.items():
        with env.Session(tenant=tenant) as s:
            a = Account(id=base + 1, name=f"{tenant}-account", balance=base)
            a.invoices.append(Invoice(id=base + 1, amount=base + 5))
            s.add(a)
            s.add(Comment(id=base + 1, account_id=base + 1, body=f"{tenant}-comment"))
            s.add(Account(id=base + 2, name=f"{tenant}-second", balance=base + 1))
            s.commit()
    # the poison: an initech comment on acme's account, on the shard they share
    with env.engines["s0"].begin() as c:
        c.execute(insert(Comment.__table__).values(
            id=999, tenant_id="initech", account_id=IDS["acme"] + 1, body="initech-secret"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "mysql", "pg+mariadb"])
def env(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Env]:
    urls, made = _urls(request, request.param, tmp_path_factory.mktemp("tenants"))
    engines = {s: create_engine(u) for s, u in zip(SHARDS, urls, strict=True)}
    try:
        e = Env(engines)
        _seed(e)
        yield e
    finally:
        for engine in engines.values():
            engine.dispose()
        for server, url in made:
            server.drop_database(make_url(url).database)


@pytest.fixture
def acme(env: Env) -> Iterator[ShardedSession]:
    before = env.snapshot()
    with env.Session(tenant="acme") as s:
        yield s
        s.rollback()
    assert env.snapshot() == before, "an attack changed some shard's rows"


def _tenants_of(objs: Any) -> set[str]:
    return {o.tenant_id for o in objs}


ACME_ACCOUNTS = {101, 102}


# -- reads ---------------------------------------------------------------------------------


def test_get_by_another_tenants_primary_key(acme: ShardedSession) -> None:
    assert acme.get(Account, 201) is None  # globex, another shard
    assert acme.get(Account, 301) is None  # initech, the same shard
    assert acme.get(Comment, 999) is None  # the poison
    assert acme.get(Account, 101) is not None


def test_select_without_a_filter(acme: ShardedSession) -> None:
    assert {a.id for a in acme.scalars(select(Account))} == ACME_ACCOUNTS
    assert {c.body for c in acme.scalars(select(Comment))} == {"acme-comment"}
    assert set(acme.scalars(select(Account.name))) == {"acme-account", "acme-second"}
    assert {a.id for a in acme.query(Account)} == ACME_ACCOUNTS  # legacy Query


def test_select_asking_for_another_tenant(acme: ShardedSession) -> None:
    assert acme.scalars(select(Account).where(Account.tenant_id == "initech")).all() == []
    assert acme.scalars(select(Account).where(Account.id.in_([201, 301]))).all() == []
    assert acme.scalars(
        select(Account).where((Account.tenant_id == "globex") | (Account.id > 0))
    ).all() != []  # an OR cannot widen the filter: only acme's rows come back
    got = acme.scalars(select(Account).where((Account.tenant_id == "globex") | (Account.id > 0)))
    assert _tenants_of(got) == {"acme"}


def test_lazy_load_of_a_relationship(acme: ShardedSession) -> None:
    a = acme.get(Account, 101)
    assert a is not None
    assert [c.body for c in a.comments] == ["acme-comment"]  # not the poison
    assert [i.id for i in a.invoices] == [101]


def test_selectin_load(acme: ShardedSession) -> None:
    accounts = acme.scalars(select(Account).options(selectinload(Account.comments))).all()
    bodies = {c.body for a in accounts for c in a.comments}
    assert bodies == {"acme-comment"}


def test_joined_load(acme: ShardedSession) -> None:
    accounts = acme.scalars(
        select(Account).options(joinedload(Account.comments))).unique().all()
    assert {c.body for a in accounts for c in a.comments} == {"acme-comment"}


def test_explicit_join_to_another_tenants_rows(acme: ShardedSession) -> None:
    rows = acme.execute(
        select(Account.id, Comment.body).join(Comment, Comment.account_id == Account.id)
    ).all()
    assert {r.body for r in rows} == {"acme-comment"}
    other = aliased(Account)
    rows = acme.execute(
        select(Account.id, other.id).join(other, other.id != Account.id)
    ).all()
    assert {r[1] for r in rows} <= ACME_ACCOUNTS


def test_subquery_on_another_tenants_rows(acme: ShardedSession) -> None:
    sub = select(Comment.account_id).where(Comment.body == "initech-secret")
    assert acme.scalars(select(Account).where(Account.id.in_(sub))).all() == []
    exists = select(Comment.id).where(Comment.account_id == Account.id).exists()
    assert {a.id for a in acme.scalars(select(Account).where(exists))} == {101}


def test_union_cte_lambda_and_nested_selects(acme: ShardedSession) -> None:
    ids = acme.execute(union_all(select(Account.id), select(Account.id))).scalars().all()
    assert sorted(ids) == [101, 101, 102, 102]
    cte = select(Comment.body).cte()
    assert acme.execute(select(cte.c.body)).scalars().all() == ["acme-comment"]
    counts = acme.execute(
        select(Account.id, select(func.count(Comment.id)).scalar_subquery())).all()
    assert {tuple(r) for r in counts} == {(101, 1), (102, 1)}
    got = acme.scalars(lambda_stmt(lambda: select(Account))).all()
    assert {a.id for a in got} == ACME_ACCOUNTS
    sub = select(Comment).subquery()
    assert [c.body for c in acme.scalars(select(aliased(Comment, sub)))] == ["acme-comment"]
    poisoned = select(Comment.id).where(Comment.id == 999).exists()
    assert acme.execute(select(poisoned)).scalar() is False


def test_aggregates(acme: ShardedSession) -> None:
    assert acme.scalar(select(func.count()).select_from(Account)) == 2
    assert acme.scalar(select(func.sum(Account.balance))) == 100 + 101
    assert acme.scalar(select(func.count(Comment.id))) == 1
    rows = acme.execute(select(Comment.tenant_id, func.count()).group_by(Comment.tenant_id)).all()
    assert [tuple(r) for r in rows] == [("acme", 1)]


def test_pagination_token_made_under_another_tenant(env: Env, acme: ShardedSession) -> None:
    stmt = select(Account).order_by(Account.id)
    with env.Session(tenant="initech") as other:
        page = paginate(other, stmt, page_size=1)
        assert [a.tenant_id for a in page.items] == ["initech"]
        assert page.next_token is not None
    got = paginate(acme, stmt, page_size=1, token=page.next_token)
    assert _tenants_of(got.items) <= {"acme"}
    with env.Session() as admin:  # an admin token, too
        admin_page = paginate(admin, stmt, page_size=1)
        assert admin_page.next_token is not None
    seen = []
    token: str | None = admin_page.next_token
    while token is not None:
        got = paginate(acme, stmt, page_size=1, token=token)
        seen += got.items
        token = got.next_token
    assert _tenants_of(seen) == {"acme"}
    first = paginate(acme, stmt, page_size=1)
    assert [a.id for a in first.items] == [101]


def test_text_is_refused_unless_checked(acme: ShardedSession) -> None:
    with pytest.raises(TenantIsolationError):
        acme.execute(text("SELECT id FROM tn_account"))
    with pytest.raises(TenantIsolationError):
        acme.execute(text("UPDATE tn_account SET name = 'pwned'"))
    with pytest.raises(TenantIsolationError):  # Core on a tenant table: no ORM filter
        acme.execute(select(Account.__table__))
    with pytest.raises(TenantIsolationError):
        acme.execute(Account.__table__.delete())
    rows = acme.execute(
        text("SELECT id FROM tn_account WHERE tenant_id = :t"), {"t": "acme"},
        execution_options={CHECKED_OPTION: True},
    ).scalars().all()
    assert set(rows) == ACME_ACCOUNTS


def test_orm_objects_from_raw_sql_of_another_tenant(acme: ShardedSession) -> None:
    stmt = select(Account).from_statement(text("SELECT * FROM tn_account ORDER BY id"))
    with pytest.raises(TenantIsolationError):  # initech's row shares acme's shard
        acme.scalars(stmt).all()
    assert acme.get(Account, 301) is None  # not left in the identity map
    assert acme.get(Account, 302) is None


# -- writes --------------------------------------------------------------------------------


def test_update_and_delete_by_criteria(acme: ShardedSession) -> None:
    r = acme.execute(update(Account).where(Account.id == 301).values(name="pwned"))
    assert r.rowcount == 0
    r = acme.execute(update(Account).where(Account.tenant_id == "globex").values(name="pwned"))
    assert r.rowcount == 0
    r = acme.execute(delete(Comment).where(Comment.id == 999))
    assert r.rowcount == 0
    r = acme.execute(update(Account).values(balance=Account.balance + 1))
    assert r.rowcount == 2  # its own rows only (rolled back by the fixture)
    assert acme.scalar(select(func.count()).select_from(Comment)) == 1


def test_bulk_update_and_insert(acme: ShardedSession) -> None:
    with pytest.raises(TenantIsolationError):
        acme.execute(update(Account), [{"id": 301, "name": "pwned"}])
    with pytest.raises(TenantIsolationError):
        acme.execute(insert(Account), [{"id": 900, "tenant_id": "initech", "name": "x",
                                        "balance": 0}])
    acme.rollback()
    with pytest.raises(TenantIsolationError):
        acme.bulk_insert_mappings(Account, [{"id": 901, "tenant_id": "globex", "name": "x",
                                             "balance": 0}])
    acme.rollback()
    with pytest.raises(TenantIsolationError):
        acme.bulk_save_objects([Account(id=904, tenant_id="initech", name="x", balance=0)])
    acme.rollback()
    with pytest.raises(TenantIsolationError):
        acme.bulk_update_mappings(Account, [{"id": 301, "name": "pwned"}])
    acme.rollback()
    r = acme.execute(update(Account).where(Account.id.in_([101, 301])).values(name="n"))
    assert r.rowcount == 1


def test_new_object_of_another_tenant(acme: ShardedSession) -> None:
    with pytest.raises(TenantIsolationError):
        acme.add(Account(id=902, tenant_id="globex", name="x", balance=0))
    a = Account(id=903, name="x", balance=0)
    acme.add(a)
    acme.flush()
    assert a.tenant_id == "acme"  # new objects get the tenant's key


def test_changing_an_objects_tenant_key(acme: ShardedSession) -> None:
    a = acme.get(Account, 101)
    assert a is not None
    a.tenant_id = "initech"
    with pytest.raises(TenantIsolationError):
        acme.flush()


def test_merge_of_a_detached_object_of_another_tenant(env: Env, acme: ShardedSession) -> None:
    with env.Session(tenant="initech") as other:
        stolen = other.get(Account, 301)
        clean = other.get(Account, 302)
        assert stolen is not None and clean is not None
        other.expunge_all()
    stolen.name = "pwned"
    with pytest.raises(TenantIsolationError):
        acme.merge(stolen)
        acme.flush()
    acme.rollback()
    with pytest.raises(TenantIsolationError):
        acme.merge(clean, load=False)
    assert acme.get(Account, 302) is None  # not left in the identity map
    acme.rollback()
    with pytest.raises(TenantIsolationError):
        acme.add(clean)
    assert acme.get(Account, 302) is None


def test_delete_of_another_tenants_object(env: Env, acme: ShardedSession) -> None:
    with env.Session() as admin:
        stolen = admin.get(Account, 301)
        assert stolen is not None
        admin.expunge(stolen)
    with pytest.raises(TenantIsolationError):
        acme.delete(stolen)
        acme.flush()


def _forged(cls: Any, **kw: Any) -> Any:
    """An object with another tenant's primary key and acme's tenant key, made detached:
    it passes the object checks (it looks like acme's) but its row is initech's (on
    acme's shard s0) -- attack 13, B3/B4."""
    obj = cls(tenant_id="acme", **kw)
    make_transient_to_detached(obj)
    return obj


def test_attribute_load_of_a_forged_detached_object(acme: ShardedSession) -> None:
    a = _forged(Account, id=301)
    acme.add(a)
    with pytest.raises((ObjectDeletedError, TenantIsolationError)):
        a.name  # noqa: B018 (an unloaded attribute: loaded by primary key)
    acme.rollback()
    acme.expunge_all()
    i = _forged(Invoice, id=301, account_id=101, amount=0)
    acme.add(i)
    acme.expire(i, ["amount"])
    with pytest.raises((ObjectDeletedError, TenantIsolationError)):
        i.amount  # noqa: B018
    acme.rollback()
    acme.expunge_all()
    b = _forged(Account, id=301, name="?")
    acme.add(b)
    with pytest.raises((InvalidRequestError, TenantIsolationError)):  # ("Could not
        acme.refresh(b)  # refresh instance": the row is not there for acme)
    acme.rollback()
    acme.expunge_all()
    own = _forged(Account, id=101)  # acme's own row: loads
    acme.add(own)
    assert own.name == "acme-account"


def test_flush_of_a_forged_detached_object(acme: ShardedSession) -> None:
    a = _forged(Account, id=301, name="x")
    acme.add(a)
    a.name = "pwned"
    with pytest.raises(TenantIsolationError):
        acme.flush()
    acme.rollback()
    acme.expunge_all()
    m = acme.merge(_forged(Account, id=302, name="x"), load=False)
    m.name = "pwned"
    with pytest.raises(TenantIsolationError):
        acme.flush()
    acme.rollback()
    acme.expunge_all()
    i = _forged(Invoice, id=301, account_id=301, amount=0)
    acme.add(i)
    acme.delete(i)
    with pytest.raises(TenantIsolationError):
        acme.flush()
    acme.rollback()
    acme.expunge_all()
    own = _forged(Account, id=101, name="x")  # acme's own row: written
    acme.add(own)
    own.balance = 7
    acme.flush()
    assert acme.scalar(select(Account.balance).where(Account.id == 101)) == 7


def _dialect_insert(acme: ShardedSession) -> Any:
    name = acme.get_bind(Account, shard_id="s0").dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert
    if name == "mysql":
        from sqlalchemy.dialects.mysql import insert as my_insert
        return my_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert
    return sqlite_insert


def test_tenant_key_in_statement_values(acme: ShardedSession) -> None:
    row = {"name": "planted", "balance": 0}
    for bad in ("initech", "globex"):
        with pytest.raises(TenantIsolationError):
            acme.execute(insert(Account).values(id=555, tenant_id=bad, **row))
    with pytest.raises(TenantIsolationError):
        acme.execute(insert(Account).values([{"id": 556, "tenant_id": "acme", **row},
                                             {"id": 557, "tenant_id": "initech", **row}]))
    with pytest.raises(TenantIsolationError):
        acme.execute(update(Invoice).where(Invoice.id == 101)
                     .values(tenant_id="initech", account_id=301))
    with pytest.raises(TenantIsolationError):
        acme.execute(update(Account).values({Account.tenant_id: Account.name}))
    with pytest.raises(TenantIsolationError):
        acme.execute(insert(Account).from_select(
            ["id", "tenant_id", "name", "balance"],
            select(Account.id + 1000, Account.tenant_id, Account.name, Account.balance)))
    acme.rollback()
    # the session's own key, or none (it is given): written as acme's
    acme.execute(insert(Account).values(id=558, **row))
    acme.execute(insert(Account).values(id=559, tenant_id="acme", **row))
    assert acme.scalars(select(Account.tenant_id).where(Account.id.in_([558, 559]))).all() \
        == ["acme", "acme"]


def test_upserts_on_tenant_tables_are_refused(acme: ShardedSession) -> None:
    ins = _dialect_insert(acme)
    stmt = ins(Account).values(id=301, tenant_id="acme", name="x", balance=0)
    if acme.get_bind(Account, shard_id="s0").dialect.name == "mysql":
        stmt = stmt.on_duplicate_key_update(name="pwned")
    else:
        stmt = stmt.on_conflict_do_update(index_elements=["id"], set_={"name": "pwned"})
    with pytest.raises(TenantIsolationError):
        acme.execute(stmt)


def test_core_references_and_text_inside_orm_statements(acme: ShardedSession) -> None:
    """Attack 13, B1/B1b/B2: the filter reaches ORM entities only; a tenant table named
    as a Core object, and SQL text, inside an ORM statement are refused."""
    acct, inv = Account.__table__, Invoice.__table__
    t2 = acct.alias("t2")
    sq = select(acct.c.id, acct.c.name, acct.c.balance,
                literal("acme").label("tenant_id")).subquery()
    light = table("tn_account", column("name"), column("tenant_id"))
    refused: list[Any] = [
        select(Account.id, t2.c.name).join_from(Account, t2, true()),
        select(Account.name, inv.c.amount).join(inv, true()),
        select(Account.id, select(func.count(acct.c.id)).scalar_subquery()),
        select(Account.name).where(exists(select(inv.c.id).where(inv.c.amount == 305))),
        union_all(select(Account.name), select(acct.c.name)),
        select(Account).with_only_columns(acct.c.name),
        update(Invoice).values(amount=select(func.sum(inv.c.amount)).scalar_subquery()),
        select(aliased(Account, sq)),  # B1b
        select(literal_column("name")).select_from(text("tn_account")),
        select(Account.id, Account.name).from_statement(text("SELECT id, name FROM tn_account")),
        select(Account.name, text("(SELECT count(*) FROM tn_account)")),
        select(Account.name).suffix_with("UNION ALL SELECT name FROM tn_account"),
        select(Account.name).prefix_with("/* x */"),
        select(Account.name).where(literal_column("1=1 OR 1")),
        select(light.c.name),
        update(light).values(name="pwned"),
    ]
    for stmt in refused:
        with pytest.raises(TenantIsolationError):
            acme.execute(stmt)
    with pytest.raises(TenantIsolationError):
        acme.query(func.count()).select_from(acct).all()
    acme.rollback()
    # what stays allowed: the entity's own table in its own statement, count(*), EXISTS
    assert acme.scalars(select(Account.id).where(acct.c.id == 101)).all() == [101]
    assert acme.scalar(select(func.count()).select_from(Account)) == 2
    assert acme.scalar(select(acme.query(Account).filter(Account.id == 101).exists()))
    assert acme.scalars(select(Account.id).where(exists(
        select(Invoice.id).where(Invoice.account_id == Account.id)))).all() == [101]


# -- sessions and scopes -------------------------------------------------------------------


def test_switching_the_tenant_of_a_session(acme: ShardedSession) -> None:
    with pytest.raises(TenantIsolationError):
        acme.tenant = "globex"  # type: ignore[misc]
    assert acme.tenant == "acme"
    assert acme.get(Account, 201) is None


def test_identity_map_is_not_reused_across_tenants(env: Env, acme: ShardedSession) -> None:
    a = acme.get(Account, 101)
    assert a is not None
    with env.Session(tenant="initech") as other:
        assert other.get(Account, 101) is None  # acme's object is not in initech's map
        assert other.scalars(select(Account).where(Account.id == 101)).all() == []


def test_session_reused_after_a_scope_change(env: Env) -> None:
    with tenant_scope("acme"):
        s = env.Session()
    admin = env.Session()  # no tenant
    with tenant_scope("globex"), s:
        assert s.tenant == "acme"
        with pytest.raises(TenantIsolationError):  # acme's session serving globex
            s.scalars(select(Account)).all()
        with pytest.raises(TenantIsolationError):  # not even from its identity map
            s.get(Account, 101)
        with pytest.raises(TenantIsolationError):  # an admin session inside a scope
            admin.scalars(select(Account)).all()
        assert [c.code for c in admin.scalars(select(Country))] == ["de"]  # global: fine
        with env.Session() as inner:
            assert inner.tenant == "globex"
            assert {a.tenant_id for a in inner.scalars(select(Account))} == {"globex"}
    admin.close()
    with tenant_scope("acme"), env.Session() as again:  # in its own scope: fine
        assert {a.id for a in again.scalars(select(Account))} == ACME_ACCOUNTS


def test_scoped_session_registry_across_requests(env: Env) -> None:
    from shardsession import ShardedScopedSession

    registry = ShardedScopedSession(env.Session)
    with tenant_scope("acme"):
        assert {a.id for a in registry.scalars(select(Account))} == ACME_ACCOUNTS
    # the next request on this thread forgot remove(): the registry hands back acme's
    with tenant_scope("initech"), pytest.raises(TenantIsolationError):
        registry.scalars(select(Account)).all()
    registry.remove()
    with tenant_scope("initech"):
        assert {a.tenant_id for a in registry.scalars(select(Account))} == {"initech"}
    registry.remove()


def test_scope_does_not_leak_across_asyncio_tasks(env: Env) -> None:
    async def read(tenant: str | None) -> tuple[str | None, set[str]]:
        await asyncio.sleep(0)
        if tenant is None:
            with env.Session() as s:
                return s.tenant, set()
        with tenant_scope(tenant):
            await asyncio.sleep(0.01)  # the other tasks run inside their own scopes
            with env.Session() as s:
                return s.tenant, {a.tenant_id for a in s.scalars(select(Account))}

    async def main() -> list[tuple[str | None, set[str]]]:
        with tenant_scope("acme"):
            # a task created inside the scope copies it; the others set their own
            inherited = asyncio.create_task(read("acme"))
        tasks = [asyncio.create_task(read(t)) for t in ("globex", "initech", None)]
        return [await inherited, *[await t for t in tasks]]

    got = asyncio.run(main())
    assert got == [("acme", {"acme"}), ("globex", {"globex"}), ("initech", {"initech"}),
                   (None, set())]


def test_scope_does_not_leak_across_threads(env: Env) -> None:
    results: dict[str, Any] = {}
    barrier = threading.Barrier(3)

    def work(tenant: str) -> None:
        with tenant_scope(tenant):
            barrier.wait(timeout=60)
            with env.Session() as s:
                results[tenant] = {a.tenant_id for a in s.scalars(select(Account))}

    def bare() -> None:
        barrier.wait(timeout=60)
        results["thread started in a scope"] = contextvars.copy_context().get(
            __import__("shardsession._scope", fromlist=["x"]).tenant_var)

    with tenant_scope("acme"):
        threads = [threading.Thread(target=work, args=("globex",)),
                   threading.Thread(target=work, args=("initech",)),
                   threading.Thread(target=bare)]
        for t in threads:
            t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {"globex": {"globex"}, "initech": {"initech"},
                       "thread started in a scope": None}


def test_unscoped_session_refused_when_the_placement_says_so(env: Env) -> None:
    strict = Placement({
        Account: TenantSharding(Account.tenant_id, env.directory, allow_unscoped=False),
        Invoice: Follows(Invoice.account),
        Comment: TenantSharding(Comment.tenant_id, env.directory, allow_unscoped=False),
        Country: Broadcast(),
        Product: HashSharding(Product.id),
    })
    Strict = sessionmaker(class_=ShardedSession, shards=env.engines, placement=strict)
    with Strict() as s:
        with pytest.raises(TenantRequiredError):
            s.scalars(select(Account)).all()
        assert [c.code for c in s.scalars(select(Country))] == ["de"]  # global: fine
    with Strict(tenant="globex") as s:
        assert {a.tenant_id for a in s.scalars(select(Account))} == {"globex"}


def test_admin_session_reads_across_tenants(env: Env) -> None:
    with env.Session() as s:
        got = s.scalars(select(Account.tenant_id).order_by(Account.id)).all()
        assert got == ["acme", "acme", "globex", "globex", "initech", "initech",
                       "hooli", "hooli"]
        assert s.scalar(select(func.count()).select_from(Comment)) == 5


def test_global_and_broadcast_tables_keep_working(acme: ShardedSession) -> None:
    assert [c.name for c in acme.scalars(select(Country))] == ["Germany"]
    assert acme.get(Country, "de") is not None
    assert acme.scalars(select(Product)).all() == []  # a fan-out over every shard


def test_join_with_a_hash_sharded_global_table_is_refused(acme: ShardedSession) -> None:
    # run on acme's shard alone it would miss the products on the other shards
    with pytest.raises(UnsupportedQueryError):
        acme.execute(select(Account.id, Product.name).join(Product, Product.id == Account.id))
    rows = acme.execute(
        select(Account.id, Country.name).join(Country, Country.code == "de")).all()
    assert {r[0] for r in rows} == ACME_ACCOUNTS  # a Broadcast table is on acme's shard


def test_a_follower_without_the_tenant_key_is_refused(tmp_path: Any) -> None:
    class Base2(DeclarativeBase):
        pass

    class Shop(Base2):
        __tablename__ = "tn2_shop"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        tenant_id: Mapped[str] = mapped_column(String(40))

    class Order(Base2):  # follows its shop implicitly (no rule), by shop_id alone
        __tablename__ = "tn2_order"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        shop_id: Mapped[int] = mapped_column(ForeignKey("tn2_shop.id"))
        shop: Mapped[Shop] = relationship()

    engines = {"s0": create_engine(f"sqlite:///{tmp_path}/x.db")}
    directory = TenantDirectory("s0")
    placement = Placement({Shop: TenantSharding(Shop.tenant_id, directory)})
    with pytest.raises(ConfigurationError, match="Order follows a tenant-owned parent"):
        ShardedSession(shards=engines, placement=placement, tenant="acme")
    engines["s0"].dispose()


# -- the directory ---------------------------------------------------------------------------


def test_directory(env: Env) -> None:
    assert env.directory.tenants() == sorted(HOME)
    assert env.directory.tenants("s0") == ["acme", "initech"]
    assert env.directory.shard_of("globex") == "s1"
    with pytest.raises(ShardSessionError):
        env.directory.add("globex", "s2")  # already on s1
    assert env.directory.add("globex") == "s1"


def test_tenant_ids_have_one_spelling(env: Env) -> None:
    """Attack 13, B7/B11: under MariaDB's case-, accent- and trailing-space-insensitive
    collations "Acme", "acme " and "ACMÉ" are acme's directory and owner rows; tenant
    ids are lowercase ASCII, and only str or int."""
    before = env.snapshot()
    for bad in ("Acme", "acme ", "ACMÉ", "ACME", " acme", "acme\n", "", "a" * 192):
        with pytest.raises(TenantError):
            env.directory.add(bad, "s0")
        with pytest.raises(TenantError):
            env.Session(tenant=bad)
    for wrong in (True, 1.5, b"acme"):
        with pytest.raises(TenantError):
            env.Session(tenant=wrong)  # type: ignore[arg-type]
        with pytest.raises(TenantError), tenant_scope(wrong):  # type: ignore[arg-type]
            pass
    assert env.snapshot() == before  # (acme's owner row untouched)
    with env.Session(tenant="acme") as s:  # acme keeps working
        assert {a.id for a in s.scalars(select(Account))} == ACME_ACCOUNTS


def test_int_tenant_keys_in_canonical_form(tmp_path: Any) -> None:
    """Attack 13, B8: with an integer tenant key column, "042", "4_2", " 42" would be
    other tenants to the directory but tenant 42 to int()."""

    class Base3(DeclarativeBase):
        pass

    class Shop(Base3):
        __tablename__ = "tn3_shop"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        tenant_id: Mapped[int] = mapped_column(Integer)

    engines = {"s0": create_engine(f"sqlite:///{tmp_path}/int.db")}
    directory = TenantDirectory("s0")
    placement = Placement({Shop: TenantSharding(Shop.tenant_id, directory)})
    Session = sessionmaker(class_=ShardedSession, shards=engines, placement=placement)
    Session().close()
    Base3.metadata.create_all(engines["s0"])
    tenancy_metadata.create_all(engines["s0"])
    directory.add(42, "s0")
    with Session(tenant=42) as s:
        s.add(Shop(id=1))
        s.commit()
    for bad in ("042", "4_2", "+42", " 42", "٤٢", "42.0"):
        with pytest.raises(TenantError):
            Session(tenant=bad)
    for bad in ("+42", " 42", "٤٢"):  # (not a tenant id at all)
        with pytest.raises(TenantError):
            directory.add(bad, "s0")
    with Session(tenant="42") as s:
        assert [x.id for x in s.scalars(select(Shop))] == [1]
    engines["s0"].dispose()


# -- a stale directory -----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Env]:
    urls, made = _urls(request, request.param, tmp_path)
    engines = {s: create_engine(u) for s, u in zip(SHARDS, urls, strict=True)}
    try:
        e = Env(engines)
        _seed(e)
        yield e
    finally:
        for engine in engines.values():
            engine.dispose()
        for server, url in made:
            server.drop_database(make_url(url).database)


def _move_by_hand(env: Env, tenant: str, source: str, target: str) -> None:
    """What a tenant move's switch does, written out in SQL by another process: copy the
    tenant's rows, hand the owner row over with a new version, delete the source rows."""
    src, dst = env.engines[source], env.engines[target]
    tables = ("tn_account", "tn_invoice", "tn_comment")
    with src.connect() as c:
        rows = {t: [dict(r._mapping) for r in c.execute(
            select(Base.metadata.tables[t]).where(Base.metadata.tables[t].c.tenant_id == tenant))]
            for t in tables}
    with dst.begin() as c:
        for t in tables:
            if rows[t]:
                c.execute(insert(Base.metadata.tables[t]), rows[t])
        c.execute(insert(tenancy_metadata.tables["shardsession_tenant_owners"]).values(
            tenant=tenant, version=2))
    with src.begin() as c:
        for t in reversed(tables):
            c.execute(delete(Base.metadata.tables[t]).where(
                Base.metadata.tables[t].c.tenant_id == tenant))
        owners = tenancy_metadata.tables["shardsession_tenant_owners"]
        c.execute(delete(owners).where(owners.c.tenant == tenant))
    directory = tenancy_metadata.tables["shardsession_tenants"]
    with env.engines["s0"].begin() as c:
        c.execute(update(directory).where(directory.c.tenant == tenant).values(
            shard=target, version=2))


def test_stale_directory_during_a_move(fresh: Env) -> None:
    env = fresh
    assert env.directory.shard_of("globex") == "s1"  # cached: (s1, 1)
    _move_by_hand(env, "globex", "s1", "s2")
    with env.Session(tenant="globex") as s:
        s.add(Account(id=250, name="late", balance=0))
        with pytest.raises(StaleTenantDirectoryError) as info:
            s.commit()  # the flush's first statement on s1 finds no owner row there
        assert info.value.shard_id == "s1"
    with env.engines["s1"].connect() as c:  # nothing landed on the old shard
        assert c.exec_driver_sql("SELECT count(*) FROM tn_account").scalar() == 0
    with env.Session(tenant="globex") as s:  # the retry goes to the new shard
        s.add(Account(id=250, name="late", balance=0))
        s.commit()
        assert {a.id for a in s.scalars(select(Account))} == {201, 202, 250}
    with env.engines["s2"].connect() as c:
        assert set(c.exec_driver_sql(
            "SELECT id FROM tn_account WHERE tenant_id = 'globex'").scalars()) == {201, 202, 250}
    # a stale reader is refused too, rather than shown an empty tenant
    env.directory._cache["globex"] = ("s1", 1)  # (as another process's cache would be)
    with env.Session(tenant="globex") as s, pytest.raises(StaleTenantDirectoryError):
        s.scalars(select(Account)).all()



def test_unscoped_writer_with_a_stale_directory(fresh: Env) -> None:
    """Attack 13, B9: a session without a tenant writes tenant-owned rows after the
    tenant moved, its process's cache still on the old shard: refused as a scoped
    writer is, nothing orphaned on the old shard."""
    env = fresh
    assert env.directory.shard_of("globex") == "s1"  # cached: (s1, 1)
    _move_by_hand(env, "globex", "s1", "s2")
    with env.Session() as s:
        s.add(Account(id=251, tenant_id="globex", name="late", balance=0))
        with pytest.raises(StaleTenantDirectoryError):
            s.commit()
    with env.engines["s1"].connect() as c:  # nothing landed on the old shard
        assert c.exec_driver_sql("SELECT count(*) FROM tn_account").scalar() == 0
    with env.Session() as s:  # the retry goes to the new shard
        s.add(Account(id=251, tenant_id="globex", name="late", balance=0))
        s.commit()
    with env.engines["s2"].connect() as c:
        assert 251 in set(c.exec_driver_sql(
            "SELECT id FROM tn_account WHERE tenant_id = 'globex'").scalars())


def test_mapping_level_expressions_over_tenant_tables(tmp_path: Any) -> None:
    """Attack 13, B6: column_property / with_expression over a tenant table, a second
    mapper of a tenant table, are refused in a tenant-scoped session; a joinedload from
    a Broadcast mapper into a tenant-owned one is filtered (not refused by the row check)."""

    class Base4(DeclarativeBase):
        pass

    class Doc(Base4):
        __tablename__ = "tn4_doc"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        tenant_id: Mapped[str] = mapped_column(String(40))
        title: Mapped[str] = mapped_column(String(40))
        country: Mapped[str] = mapped_column(ForeignKey("tn4_country.code"))
        extra: Mapped[str] = query_expression()

    doc_t = Doc.__table__

    class Country4(Base4):
        __tablename__ = "tn4_country"
        code: Mapped[str] = mapped_column(String(2), primary_key=True)
        docs: Mapped[list[Doc]] = relationship(order_by=Doc.id)

    class Region(Base4):  # Broadcast, with a column_property over the tenant table
        __tablename__ = "tn4_region"
        code: Mapped[str] = mapped_column(String(2), primary_key=True)
        n_docs: Mapped[int] = column_property(
            select(func.count(doc_t.c.id)).scalar_subquery())

    class DocView(Base4):  # a second mapper of the tenant table, not placed
        __table__ = doc_t

    engines = {"s0": create_engine(f"sqlite:///{tmp_path}/b6.db")}
    directory = TenantDirectory("s0")
    placement = Placement({Doc: TenantSharding(Doc.tenant_id, directory),
                           Country4: Broadcast(), Region: Broadcast()})
    Session = sessionmaker(class_=ShardedSession, shards=engines, placement=placement)
    Session().close()
    Base4.metadata.create_all(engines["s0"])
    tenancy_metadata.create_all(engines["s0"])
    directory.add("acme", "s0")
    directory.add("initech", "s0")
    with engines["s0"].begin() as c:
        c.execute(insert(Country4.__table__), [{"code": "de"}])
        c.execute(insert(Region.__table__), [{"code": "eu"}])
        c.execute(insert(doc_t), [
            {"id": 1, "tenant_id": "acme", "title": "acme-doc", "country": "de"},
            {"id": 2, "tenant_id": "initech", "title": "initech-doc", "country": "de"}])
    with Session(tenant="acme") as s:
        for stmt in (select(Region), select(Region.n_docs), select(DocView),
                     select(DocView.title),
                     select(Doc).options(with_expression(
                         Doc.extra, select(func.max(doc_t.c.title)).scalar_subquery()))):
            with pytest.raises(TenantIsolationError):
                s.execute(stmt).all()
        # filtered, not refused
        got = s.scalars(select(Country4).options(joinedload(Country4.docs))).unique().all()
        assert [[d.title for d in c.docs] for c in got] == [["acme-doc"]]
        assert [d.extra for d in s.scalars(select(Doc).options(with_expression(
            Doc.extra, func.upper(Doc.title))))] == ["ACME-DOC"]
    engines["s0"].dispose()
