"""The coordinator's durable state: SQLAlchemy 2 Core over SQLite (WAL, the default) or PostgreSQL.

    store = Store.open("sqlite:////var/mujina/coordinator.db")          # creates + migrates
    store = Store.open("postgresql+psycopg://mujina@127.0.0.1/mujina")

Tables: tokens (hashed), workers, tasks, leases, failures (reasons kept), results (one accepted result
per task: a primary key), ledger (one row per task and unit: a unique constraint, so credit cannot be
counted twice whatever the code above does), schema_version.

One coordinator process serves a store. Its writes go through `Store.tx()` (SQLAlchemy) or, on the
RPC hot path, `Store.hot()` (plain SQL on one DBAPI connection; on SQLite grouped into one commit
per event-loop turn, see `group_commits`); both serialise them with one process-wide lock: SQLite
allows one writer anyway, and on PostgreSQL it removes lease races between the server's threads
(its gRPC loop, the expiry sweeper). Writers in other processes (the
`tasks`/`token` CLI) use row-level conditions (`UPDATE ... WHERE state = 'pending'`) so they never
fight the server.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

tokens = Table(
    "tokens", metadata,
    Column("name", String(64), primary_key=True),
    Column("hash", String(64), nullable=False, unique=True),  # sha256 hex of the token; the token is never stored
    Column("created", Float, nullable=False),
    Column("revoked", Float),                                  # Unix time, NULL while valid
    Column("max_leases", Integer),                             # NULL: the project's default
)

workers = Table(
    "workers", metadata,
    Column("id", String(32), primary_key=True),
    Column("token", String(64), nullable=False, index=True),
    Column("name", String(256), nullable=False),
    Column("capabilities", Text, nullable=False),   # JSON, as reported
    Column("gpu_memory", BigInteger, nullable=False),  # largest accelerator's memory, bytes (0 without one)
    Column("cuda", Boolean, nullable=False),
    Column("speed", Float, nullable=False),
    Column("registered", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

tasks = Table(
    "tasks", metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("run", String(128), nullable=False),
    Column("priority", Integer, nullable=False, default=0),     # higher first
    Column("state", String(16), nullable=False),               # pending | leased | done | dead
    Column("payload", Text, nullable=False),                   # JSON object
    Column("min_gpu_memory", BigInteger, nullable=False, default=0),
    Column("needs_cuda", Boolean, nullable=False, default=False),
    Column("min_speed", Float, nullable=False, default=0.0),
    Column("attempts", Integer, nullable=False, default=0),    # failed or expired attempts
    Column("max_attempts", Integer, nullable=False),
    Column("lease_id", String(32)),                            # the current lease while leased
    Column("last_error", Text),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
)
# Lease's pick (`state = 'pending' AND kind = K ORDER BY priority DESC, created, id`) walks this
# index in order instead of sorting every pending task.
Index("ix_tasks_pick", tasks.c.state, tasks.c.kind, tasks.c.priority.desc(), tasks.c.created, tasks.c.id)

leases = Table(
    "leases", metadata,
    Column("id", String(32), primary_key=True),
    Column("task_id", String(32), nullable=False, index=True),
    Column("worker_id", String(32), nullable=False),
    Column("token", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # active | expired | completed | failed | released | cancelled
    Column("granted", Float, nullable=False),
    Column("deadline", Float, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Index("ix_leases_state_deadline", "state", "deadline"),
    Index("ix_leases_token_state", "token", "state"),
)

failures = Table(
    "failures", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(32), nullable=False, index=True),
    Column("lease_id", String(32), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("at", Float, nullable=False),
    # the failing lease's token ('' for a cancel): a task is not leased again to a token that failed it
    Column("token", String(64), nullable=False, server_default=""),
    Index("ix_failures_token_task", "token", "task_id"),
)

results = Table(
    "results", metadata,
    Column("task_id", String(32), primary_key=True),   # at most one accepted result per task
    Column("lease_id", String(32), nullable=False, unique=True),
    Column("worker_id", String(32), nullable=False),
    Column("token", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("path", Text, nullable=False),              # relative to the state directory
    Column("metrics", Text, nullable=False),           # JSON
    Column("metadata", Text, nullable=False),          # the worker's metadata_json, checked to be an object
    Column("credited", Boolean, nullable=False),
    Column("at", Float, nullable=False),
)

ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", String(32), nullable=False),
    Column("volunteer", String(64), nullable=False),  # the token's name
    Column("kind", String(32), nullable=False),
    Column("unit", String(32), nullable=False),       # tasks | tokens_evaluated | gpu_seconds | ...
    Column("amount", Float, nullable=False),
    Column("at", Float, nullable=False),
    UniqueConstraint("task_id", "unit", name="uq_ledger_task_unit"),  # credit at most once per task
)

# version -> statements that bring a store at version-1 to it. Version 1 is create_all.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE failures ADD COLUMN token VARCHAR(64) NOT NULL DEFAULT ''",
        "CREATE INDEX ix_failures_token_task ON failures (token, task_id)"],
}


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so a plain SHA-256 is enough (no password stretching needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer. synchronous=NORMAL is durable against a crash or kill -9
    # of the coordinator (the WAL is in the OS cache); a power cut may lose the last commits.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")  # the CLI writing beside the server waits instead of failing
    cur.close()


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock = threading.RLock()
        self._hot_conn = None  # the DBAPI connection of hot(), opened on first use
        self._sql: dict[str, str] = {}
        self._group_loop, self._group_thread, self._group = None, None, None  # see group_commits()
        self.group_uses = 0  # hot() blocks run in groups so far: tells a caller whether it used the open group

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> Store:
        """Connect to the store at `url` (SQLAlchemy URL) and bring its schema to SCHEMA_VERSION."""
        u = make_url(url)
        if u.drivername.startswith("sqlite"):
            if u.database and u.database != ":memory:":
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 10},
                                   pool_size=20, max_overflow=20)
            event.listen(engine, "connect", _sqlite_pragmas)
        elif u.drivername.startswith("postgresql"):
            engine = create_engine(u, pool_size=20, max_overflow=20, pool_pre_ping=True)
        else:
            raise ValueError(f"--db {u.render_as_string(hide_password=True)}: unsupported database; use "
                             "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        store = cls(engine)
        if migrate:
            store.migrate()
        return store

    def migrate(self) -> None:
        with self.tx() as conn:
            if not inspect(conn).has_table("schema_version"):
                metadata.create_all(conn)
                conn.execute(insert(schema_version).values(version=SCHEMA_VERSION))
                log.info("created store schema version %d", SCHEMA_VERSION)
                return
            version = conn.execute(select(schema_version.c.version)).scalar_one()
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the store has schema version {version}, newer than this coordinator's "
                                   f"{SCHEMA_VERSION}: upgrade mujina")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[v]:
                    conn.execute(text(stmt))
                conn.execute(schema_version.update().values(version=v))
                log.info("migrated store to schema version %d", v)

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._write_lock:
            if self._group is not None and self._group_thread == threading.get_ident():
                self._commit_group()  # its other connection would wait on the group's open transaction
            with self.engine.begin() as conn:
                yield conn

    def _hot_driver(self):
        if self._hot_conn is None:
            self._hot_conn = self.engine.raw_connection()
            if self.is_sqlite:  # its commits never run a checkpoint (an fsync): checkpoint() does, off the loop
                self._hot_conn.driver_connection.execute("PRAGMA wal_autocheckpoint=0")
        return self._hot_conn.driver_connection

    @contextmanager
    def hot(self) -> Iterator:
        """One transaction on a raw DBAPI cursor, for the RPC hot path (lease, heartbeat, complete).

        SQLAlchemy's per-statement Python overhead (execution context, result proxy, pool checkout)
        costs several times what SQLite spends running a statement, so the hot statements are plain
        SQL (`sql()`) on one DBAPI connection kept for the process's life. It runs under the same
        write lock as tx(), so that connection is never used by two threads at once; it rolls back
        on any exception. It commits on success, except on the thread given to group_commits(),
        where it is a savepoint in the group's transaction (see there)."""
        if self._group_thread == threading.get_ident():
            with self._in_group() as cur:
                yield cur
            return
        with self._write_lock:
            conn = self._hot_driver()
            cur = conn.cursor()
            try:
                yield cur
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                cur.close()

    # group commit (SQLite, the server's event loop)

    def group_commits(self, loop) -> None:
        """Group the hot() transactions of `loop`'s thread (call this on it) into one commit per loop turn.

        The RPC handlers' transactions become savepoints of one open transaction, committed by a
        callback the loop runs after every handler that was ready ran. A handler that used the group
        (`group_uses` moved) awaits `pending_commit()` before it answers, so nothing is acknowledged
        before it is committed (and durable against a crash, as every commit). One commit writes
        each page once however many RPCs changed it: fewer WAL frames and commits per cycle. The
        write lock is held from the group's first statement to its commit, so other threads' writes
        wait for the commit."""
        self._group_loop, self._group_thread = loop, threading.get_ident()

    def pending_commit(self):
        """The future of the open group's commit, or None when nothing waits to be committed."""
        return self._group

    @contextmanager
    def _in_group(self) -> Iterator:
        conn = self._hot_driver() if self._group is not None else self._open_group()
        self.group_uses += 1
        cur = conn.cursor()
        cur.execute("SAVEPOINT hot")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK TO hot")
            cur.execute("RELEASE hot")
            raise
        else:
            cur.execute("RELEASE hot")
        finally:
            cur.close()

    def _open_group(self):
        self._write_lock.acquire()
        try:
            conn = self._hot_driver()
            conn.execute("BEGIN IMMEDIATE" if self.is_sqlite else "BEGIN")
        except BaseException:
            self._write_lock.release()
            raise
        self._group = self._group_loop.create_future()
        self._group_loop.call_soon(self._commit_group)
        return conn

    def _commit_group(self) -> None:
        fut, self._group = self._group, None
        if fut is None:  # committed early by tx()
            return
        conn = self._hot_conn.driver_connection
        try:
            conn.commit()
        except BaseException as exc:
            conn.rollback()
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(None)
        finally:
            self._write_lock.release()

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database file (PASSIVE: writers are not blocked, nor is the
        write lock taken). The server's sweeper thread calls it every sweep, so the RPC thread's
        commits never wait for a checkpoint's fsync. PostgreSQL: nothing to do."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def sql(self, statement: str) -> str:
        """`statement`, written with :name parameters, in this store's DBAPI paramstyle (cached)."""
        out = self._sql.get(statement)
        if out is None:
            out = statement if self.is_sqlite else re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", statement)
            self._sql[statement] = out
        return out

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    # tokens: used by the CLI and by the server's authentication

    def add_token(self, name: str, token: str, max_leases: int | None = None) -> None:
        with self.tx() as conn:
            row = conn.execute(select(tokens.c.name).where(tokens.c.name == name)).first()
            if row is not None:
                raise ValueError(f"a token named {name!r} exists; revoke it first or pick another name")
            conn.execute(insert(tokens).values(name=name, hash=hash_token(token), created=time.time(),
                                               max_leases=max_leases))

    def revoke_token(self, name: str) -> None:
        with self.tx() as conn:
            n = conn.execute(tokens.update().where(tokens.c.name == name, tokens.c.revoked.is_(None))
                             .values(revoked=time.time())).rowcount
        if n == 0:
            raise ValueError(f"no valid token named {name!r}; `mujina-coordinator token list` shows them")

    def token_by_hash(self, token_hash: str):
        with self.read() as conn:
            return conn.execute(select(tokens).where(tokens.c.hash == token_hash,
                                                     tokens.c.revoked.is_(None))).first()

    def close(self) -> None:
        with self._write_lock:
            if self._hot_conn is not None:
                self._hot_conn.close()
                self._hot_conn = None
        self.engine.dispose()
