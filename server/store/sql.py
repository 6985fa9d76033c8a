"""One SQL store over two drivers: SQLite (on a thread of its own) and PostgreSQL (asyncpg).

Queries are written once with ``?`` placeholders; the PostgreSQL driver numbers
them.  SQLite runs on a thread of its own, so no query blocks the event loop, and
a batch of writes is one hop to it and one transaction; the file is in WAL mode.
The one exception is :meth:`SqliteDriver.script_now`: a small transaction run on the
caller's thread while no write is in flight on the store's thread, which never
waits for a lock and never checkpoints, and gives up (None) instead.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import orjson

from bridge.wire import RunStatus
from server.store.base import (
    UNFINISHED,
    MessageRow,
    RunRow,
    Step,
    StoreError,
    ThreadRow,
)
from server.store.migrations import LATEST, statements

log = logging.getLogger("chat.store")

Row = Sequence[Any]
T = TypeVar("T")


class Driver(Protocol):
    dialect: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def script(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run statements, each with its arguments, in one transaction; the rows each
        one changed."""
        ...

    def can_script_now(self) -> bool:
        """Whether :meth:`script_now` may run now: no write of this driver in progress
        or pending (for a database of one connection, no call at all)."""
        ...

    def script_now(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int] | None:
        """:meth:`script` at once, on the caller's thread, when that takes no wait
        (:meth:`can_script_now`, and the database's write lock free).  None (nothing
        written) when it cannot."""
        ...

    async def migrate_step(self, version: int, sqls: list[str]) -> bool:
        """Apply one migration unless the database has it; False when it had.

        Holds the database's write lock from reading the version to committing, so
        processes starting together migrate once.
        """
        ...


VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

#: How long a SQLite call on the store's thread waits for another process's write lock.
BUSY_TIMEOUT_MS: Final = 5000
#: Commits on the event loop's thread (``SqliteDriver.script_now``, which never
#: checkpoints) after which the store's thread checkpoints the WAL: a run's first
#: record is about ten pages, so about SQLite's own 1,000 pages.
CHECKPOINT_EVERY: Final = 100


def _version_steps(current: int, version: int) -> str:
    if current == 0:
        return f"INSERT INTO schema_version (version) VALUES ({version})"
    return f"UPDATE schema_version SET version = {version}"


class SqliteDriver:
    """SQLite on a thread of its own: every call is one hop to it, and a whole
    transaction (:meth:`script`, :meth:`migrate_step`) is a single hop.

    A small transaction may also run on the caller's thread when no write is in
    flight on the store's thread (:meth:`script_now`), through a connection of its
    own that never waits for a lock and never checkpoints (for ``:memory:``, the one
    connection, while the thread is idle: nothing else can lock it, and it has no WAL).
    """

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        #: The connection of :meth:`script_now`.
        self._now: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        #: The call handed to the thread last, and the last that writes: the thread
        #: takes them in order, so it is idle once the first is done, and nothing written
        #: before is still to commit once the second is.
        self._last: Future[Any] | None = None
        self._last_write: Future[Any] | None = None
        #: Commits made by :meth:`script_now` since the thread last checkpointed.
        self._commits_now = 0
        #: A checkpoint copied the whole WAL: the next commit starts the WAL over and
        #: syncs it to disk, which is for the store's thread to do, not the loop's.
        self._restart_due = False

    async def _run(self, fn: Callable[..., T], *args: Any, writes: bool = True) -> T:
        if self._thread is None:
            raise StoreError("the SQLite store is closed")
        job = self._last = self._thread.submit(fn, *args)
        if writes:
            self._last_write = job
        return await asyncio.wrap_future(job)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the SQLite store is closed")
        return self._conn

    async def connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._conn, self._now = await self._run(self._open)

    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        conn = _connect(self.path, BUSY_TIMEOUT_MS, ("PRAGMA journal_mode=WAL",))
        if self.path == ":memory:":
            return conn, conn
        # Never waits for another process's lock (timeout 0), never checkpoints.
        return conn, _connect(self.path, 0, ("PRAGMA wal_autocheckpoint=0",))

    async def close(self) -> None:
        if self._conn is not None and self._thread is not None:
            conns = {id(c): c for c in (self._conn, self._now) if c is not None}
            self._conn = self._now = None
            job = self._last = self._thread.submit(_close_all, list(conns.values()))
            await asyncio.wrap_future(job)
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._run(lambda: self._db().execute(sql, args).rowcount)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return await self._run(lambda: list(self._db().execute(sql, args).fetchall()), writes=False)

    async def script(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        # The write lock first: a transaction that reads before it writes cannot then
        # fail to upgrade because another process wrote meanwhile.
        return await self._run(self._transaction, "BEGIN IMMEDIATE", steps)

    def _transaction(self, begin: str, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        counts = _transaction(self._db(), begin, steps)
        self._restart_due = False  # this commit started the WAL over, if it was due
        return counts

    def can_script_now(self) -> bool:
        # Its own connection may commit while the thread reads: only a write still to
        # commit there (or a checkpoint) must come first.  The one connection of
        # ``:memory:`` must be idle.
        # After a checkpoint that copied the whole WAL, the next commit restarts it and
        # syncs: the thread's.
        pending = self._last if self._now is self._conn else self._last_write
        return (
            self._now is not None and (pending is None or pending.done()) and not self._restart_due
        )

    def script_now(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int] | None:
        """The transaction of :meth:`script`, run on the caller's thread (the event
        loop's) when no write handed to the store's thread is still to commit (for
        ``:memory:``, when that thread is idle), or None, with nothing written.

        It does not wait: another process's write lock makes it give up at once (its
        connection has no busy timeout), and it never checkpoints the WAL (every
        :data:`CHECKPOINT_EVERY` of its commits, the store's thread does; the commit
        after a checkpoint that copied the whole WAL, which starts the WAL over and
        syncs it, is left to that thread too).  What is left is the statements
        themselves, a few indexed rows: less than the two thread switches that
        :meth:`script` costs.
        """
        db = self._now
        if db is None or not self.can_script_now():
            return None
        try:
            counts = _transaction(db, "BEGIN IMMEDIATE", steps)
        except sqlite3.OperationalError as exc:
            if _busy(exc):  # rolled back: another process is writing
                return None
            raise
        if db is not self._conn:
            self._commits_now += 1
            if self._commits_now >= CHECKPOINT_EVERY and self._thread is not None:
                self._commits_now = 0
                # Taken for a write: commits wait for it (through this thread), or the
                # pages they add would keep the WAL from starting over.
                self._last = self._last_write = self._thread.submit(self._checkpoint)
        return counts

    def _checkpoint(self) -> None:
        """Copy the WAL's pages into the database file, so that the WAL starts over."""
        try:
            rows = self._db().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            busy, frames, copied = rows[0] if rows else (1, 0, -1)
            self._restart_due = not busy and frames == copied
        except Exception as exc:  # the next one tries again; a commit on this thread too
            log.warning("store sqlite: checkpoint failed: %r", exc)

    async def migrate_step(self, version: int, sqls: list[str]) -> bool:
        return await self._run(self._migrate_step, version, sqls)

    def _migrate_step(self, version: int, sqls: list[str]) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # the write lock, before reading
        try:
            db.execute(VERSION_TABLE)
            rows = db.execute("SELECT version FROM schema_version").fetchall()
            current = int(rows[0][0]) if rows else 0
            if current >= version:
                db.execute("ROLLBACK")
                return False
            for sql in sqls:
                db.execute(sql)
            db.execute(_version_steps(current, version))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return True


def _connect(path: str, busy_ms: int, pragmas: Sequence[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000
    )
    for pragma in (
        f"PRAGMA busy_timeout={busy_ms}",
        *pragmas,
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
    ):
        # Switching to WAL while another process opens the file can answer "locked"
        # without waiting for the busy timeout: try again for a while.
        for attempt in range(100):
            try:
                conn.execute(pragma)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
    return conn


def _close_all(conns: list[sqlite3.Connection]) -> None:
    for conn in conns:
        conn.close()


def _transaction(
    db: sqlite3.Connection, begin: str, steps: list[tuple[str, tuple[Any, ...]]]
) -> list[int]:
    db.execute(begin)
    try:
        counts = [db.execute(sql, args).rowcount for sql, args in steps]
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a COMMIT that failed leaves it open
            db.execute("ROLLBACK")
        raise
    return counts


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite answered that another connection holds a lock it needs."""
    text = str(exc)
    return "locked" in text or "busy" in text


def _changed(status: str) -> int:
    """The row count of a command tag such as ``INSERT 0 1`` or ``UPDATE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _numbered(sql: str) -> str:
    parts = sql.split("?")
    return "".join(part + (f"${i}" if i < len(parts) else "") for i, part in enumerate(parts, 1))


class PostgresDriver:
    dialect = "postgresql"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: Any = None

    async def connect(self) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=10)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def execute(self, sql: str, *args: Any) -> int:
        return _changed(await self._pool.execute(_numbered(sql), *args))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(r) for r in await self._pool.fetch(_numbered(sql), *args)]

    async def script(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        async with self._pool.acquire() as conn, conn.transaction():
            return [_changed(await conn.execute(_numbered(sql), *args)) for sql, args in steps]

    def can_script_now(self) -> bool:
        return False  # every call is a round trip to the server

    def script_now(self, steps: list[tuple[str, tuple[Any, ...]]]) -> list[int] | None:
        return None

    async def migrate_step(self, version: int, sqls: list[str]) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(VERSION_TABLE)
            rows = await conn.fetch("SELECT version FROM schema_version")
            current = int(rows[0][0]) if rows else 0
            if current >= version:
                return False
            for sql in sqls:
                await conn.execute(sql)
            await conn.execute(_version_steps(current, version))
        return True


#: The advisory lock key that serializes migrations across processes.
MIGRATION_LOCK = 0x63686174  # "chat"


_THREAD = "id, owner, title, created_at, updated_at"
_MESSAGE = "id, thread_id, role, content, run_id, fallback, created_at, pos"
_RUN = (
    "id, thread_id, owner, agent, status, error_code, created_at, updated_at, last_seq, node, usage"
)


def _thread(row: Row) -> ThreadRow:
    return ThreadRow(row[0], row[1], row[2], float(row[3]), float(row[4]))


def _message(row: Row) -> MessageRow:
    return MessageRow(
        row[0], row[1], row[2], row[3], row[4], bool(row[5]), float(row[6]), int(row[7])
    )


def _run(row: Row) -> RunRow:
    return RunRow(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        float(row[6]),
        float(row[7]),
        int(row[8]),
        row[9],
        orjson.loads(row[10]) if row[10] else None,
    )


class SqlStore:
    """The :class:`~server.store.base.Store` over a SQL driver."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.name = driver.dialect

    # Lifecycle ----------------------------------------------------------------

    async def open(self, *, target: int = LATEST) -> None:
        """Connect and migrate up to ``target`` (the newest version by default)."""
        try:
            await self.driver.connect()
            await self.migrate(target)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open the {self.name} store: {exc}") from exc

    async def migrate(self, target: int = LATEST) -> None:
        for version in range(1, target + 1):
            if await self.driver.migrate_step(version, statements(version, self.driver.dialect)):
                log.info("store %s: schema migrated to version %d", self.name, version)

    async def close(self) -> None:
        await self.driver.close()

    async def schema_version(self) -> int:
        await self.driver.execute(VERSION_TABLE)
        rows = await self.driver.fetch("SELECT version FROM schema_version")
        return int(rows[0][0]) if rows else 0

    # Threads ------------------------------------------------------------------

    async def get_thread(self, thread_id: str) -> ThreadRow | None:
        rows = await self.driver.fetch(
            f"SELECT {_THREAD} FROM threads WHERE id = ? AND deleted_at IS NULL", thread_id
        )
        return _thread(rows[0]) if rows else None

    def thread_steps(self, row: ThreadRow) -> list[Step]:
        """Create the thread; nothing when a thread of that id exists already (a deleted
        one's tombstone included), except that a thread of the same owner made without a
        title (by :meth:`~server.persistence.Persistence.run_lost`) takes this one's."""
        return [
            (
                f"INSERT INTO threads ({_THREAD}) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET title = excluded.title "
                "WHERE threads.title = '' AND threads.owner = excluded.owner "
                "AND threads.deleted_at IS NULL",
                (row.id, row.owner, row.title, row.created_at, row.updated_at),
            )
        ]

    async def write(self, steps: list[Step]) -> list[int]:
        """Run writes made by the ``*_steps`` methods, in order, in one transaction."""
        return await self.driver.script(steps)

    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may write (else it answers None at once)."""
        return self.driver.can_script_now()

    def write_now(self, steps: list[Step]) -> list[int] | None:
        """:meth:`write` at once, on the caller's thread, or None (nothing written) when
        that would wait."""
        return self.driver.script_now(steps)

    async def list_threads(
        self, owner: str, limit: int, before: tuple[float, str] | None
    ) -> list[ThreadRow]:
        if before is None:
            rows = await self.driver.fetch(
                f"SELECT {_THREAD} FROM threads WHERE owner = ? AND deleted_at IS NULL "
                "ORDER BY updated_at DESC, id DESC LIMIT ?",
                owner,
                limit,
            )
        else:
            at, tid = before
            rows = await self.driver.fetch(
                f"SELECT {_THREAD} FROM threads WHERE owner = ? AND deleted_at IS NULL "
                "AND (updated_at < ? OR (updated_at = ? AND id < ?)) "
                "ORDER BY updated_at DESC, id DESC LIMIT ?",
                owner,
                at,
                at,
                tid,
                limit,
            )
        return [_thread(r) for r in rows]

    async def delete_thread(self, thread_id: str, owner: str, now: float) -> bool:
        tombstone = _TOMBSTONE_OF_OWNER
        counts = await self.write(
            [
                # The thread's row first.  On PostgreSQL this row lock orders the delete
                # against every write that checks the thread, since they lock it too;
                # SQLite has one writing transaction at a time.
                (
                    "UPDATE threads SET deleted_at = ? "
                    "WHERE id = ? AND owner = ? AND deleted_at IS NULL",
                    (now, thread_id, owner),
                ),
                # Children before the thread: not every SQLite build enforces ON DELETE
                # CASCADE.  Runs not yet ended are kept until they record their end.
                (
                    f"DELETE FROM messages WHERE thread_id = ? AND {tombstone}",
                    (thread_id, thread_id, owner),
                ),
                (
                    f"DELETE FROM runs WHERE thread_id = ? AND status NOT IN {_UNFINISHED} "
                    f"AND {tombstone}",
                    (thread_id, thread_id, owner),
                ),
                _purge_step(thread_id),
            ]
        )
        return counts[0] == 1

    async def purge_deleted_threads(self) -> int:
        counts = await self.write(
            [
                (
                    f"DELETE FROM runs WHERE status NOT IN {_UNFINISHED} AND thread_id IN "
                    "(SELECT id FROM threads WHERE deleted_at IS NOT NULL)",
                    (),
                ),
                (
                    "DELETE FROM threads WHERE deleted_at IS NOT NULL AND NOT EXISTS "
                    "(SELECT 1 FROM runs WHERE runs.thread_id = threads.id)",
                    (),
                ),
            ]
        )
        return counts[1]

    # Messages -----------------------------------------------------------------

    def forget_run_steps(self, run_id: str, thread_id: str, owner: str) -> list[Step]:
        return [
            (
                "DELETE FROM messages WHERE run_id = ? AND thread_id = ? "
                f"AND EXISTS (SELECT 1 FROM threads WHERE {_LIVE_OF_OWNER})",
                (run_id, thread_id, thread_id, owner),
            )
        ]

    def message_steps(self, row: MessageRow, owner: str) -> list[Step]:
        """Make the thread the most recently updated and add the message, if the thread
        is ``owner``'s and not deleted."""
        return [
            # The update first: on PostgreSQL it locks the thread's row, so a delete
            # waits for this transaction, or this one sees the delete.
            (
                f"UPDATE threads SET updated_at = ? WHERE {_LIVE_OF_OWNER}",
                (row.created_at, row.thread_id, owner),
            ),
            (
                "INSERT INTO messages (id, thread_id, role, content, run_id, fallback, "
                "created_at) SELECT ?, ?, ?, ?, ?, ?, ? "
                f"WHERE EXISTS (SELECT 1 FROM threads WHERE {_LIVE_OF_OWNER})",
                (
                    row.id,
                    row.thread_id,
                    row.role,
                    row.content,
                    row.run_id,
                    int(row.fallback),
                    row.created_at,
                    row.thread_id,
                    owner,
                ),
            ),
        ]

    def message_delete_steps(self, message_id: str, thread_id: str) -> list[Step]:
        return [("DELETE FROM messages WHERE id = ? AND thread_id = ?", (message_id, thread_id))]

    async def list_messages(self, thread_id: str, limit: int, after_pos: int) -> list[MessageRow]:
        rows = await self.driver.fetch(
            f"SELECT {_MESSAGE} FROM messages WHERE thread_id = ? AND pos > ? ORDER BY pos LIMIT ?",
            thread_id,
            after_pos,
            limit,
        )
        return [_message(r) for r in rows]

    async def recent_messages(self, thread_id: str, limit: int) -> list[MessageRow]:
        rows = await self.driver.fetch(
            f"SELECT {_MESSAGE} FROM messages WHERE thread_id = ? ORDER BY pos DESC LIMIT ?",
            thread_id,
            limit,
        )
        return [_message(r) for r in reversed(rows)]

    # Runs ---------------------------------------------------------------------

    def run_steps(self, row: RunRow, *, first: bool = False) -> list[Step]:
        """Insert the run if its thread is its owner's and not deleted, else update it.

        An existing row is updated even once its thread is deleted: that is how the
        tombstone learns that the run has ended.  A run that has ended keeps its ending:
        later writes of it change nothing (the first ending recorded wins).

        A run's ``first`` record (``queued``) is the insert alone: there is no row of
        the run before it to update (one that is there already is left as it is, and
        the write is not refused for it).
        """
        # On PostgreSQL the check locks the thread's row (FOR SHARE): a delete waits for
        # this transaction, or this one sees the delete.  Taken before the run's row, in
        # the order a delete takes them.
        share = " FOR SHARE" if self.driver.dialect == "postgresql" else ""
        usage = orjson.dumps(row.usage).decode() if row.usage is not None else None
        # A conflict changes nothing but counts as the row written (not refused).
        conflict = "DO UPDATE SET updated_at = runs.updated_at" if first else "DO NOTHING"
        steps: list[Step] = [
            (
                f"INSERT INTO runs ({_RUN}) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? "
                f"WHERE EXISTS (SELECT 1 FROM threads WHERE {_LIVE_OF_OWNER}{share}) "
                f"ON CONFLICT (id) {conflict}",
                (
                    row.id,
                    row.thread_id,
                    row.owner,
                    row.agent,
                    row.status,
                    row.error_code,
                    row.created_at,
                    row.updated_at,
                    row.last_seq,
                    row.node,
                    usage,
                    row.thread_id,
                    row.owner,
                ),
            ),
        ]
        if first:
            return steps
        steps += [
            (
                # An ended run is never changed again: a status written late (by a process
                # that was stopped past its lease, whose run another process ended) must not
                # undo the ending.  The row still counts as matched, so the write is not
                # taken for a refused one.
                f"UPDATE runs SET status = CASE WHEN {_OPEN} THEN ? ELSE status END, "
                f"error_code = CASE WHEN {_OPEN} THEN ? ELSE error_code END, "
                f"updated_at = CASE WHEN {_OPEN} THEN ? ELSE updated_at END, "
                f"last_seq = CASE WHEN {_OPEN} THEN ? ELSE last_seq END, "
                f"usage = CASE WHEN {_OPEN} THEN COALESCE(?, usage) ELSE usage END "
                "WHERE id = ? AND owner = ?",
                (
                    row.status,
                    row.error_code,
                    row.updated_at,
                    row.last_seq,
                    usage,
                    row.id,
                    row.owner,
                ),
            ),
        ]
        if row.status not in UNFINISHED:
            # The end of a run of a deleted thread: the run goes, and with the last one
            # the tombstone, which frees the id.
            steps.append(
                (
                    "DELETE FROM runs WHERE id = ? AND EXISTS "
                    "(SELECT 1 FROM threads WHERE id = ? AND deleted_at IS NOT NULL)",
                    (row.id, row.thread_id),
                )
            )
            steps.append(_purge_step(row.thread_id))
        return steps

    async def get_run(self, run_id: str) -> RunRow | None:
        rows = await self.driver.fetch(f"SELECT {_RUN} FROM runs WHERE id = ?", run_id)
        return _run(rows[0]) if rows else None

    async def unfinished_runs(self, thread_id: str, owner: str) -> list[str]:
        rows = await self.driver.fetch(
            f"SELECT id FROM runs WHERE thread_id = ? AND owner = ? AND status IN {_UNFINISHED}",
            thread_id,
            owner,
        )
        return [str(row[0]) for row in rows]

    async def fail_unfinished_runs(self, error_code: str, now: float) -> int:
        return await self.driver.execute(
            f"UPDATE runs SET status = '{RunStatus.FAILED}', error_code = ?, updated_at = ? "
            f"WHERE status IN {_UNFINISHED}",
            error_code,
            now,
        )


_UNFINISHED: Final = "(" + ", ".join(f"'{status}'" for status in UNFINISHED) + ")"
#: A run's row has not ended (its status may still change).
_OPEN: Final = f"status IN {_UNFINISHED}"
#: The thread ``?`` exists, is ``?``'s, and is not deleted.
_LIVE_OF_OWNER: Final = "id = ? AND owner = ? AND deleted_at IS NULL"
#: The thread ``?`` is ``?``'s and deleted.
_TOMBSTONE_OF_OWNER: Final = (
    "EXISTS (SELECT 1 FROM threads WHERE id = ? AND owner = ? AND deleted_at IS NOT NULL)"
)


def _purge_step(thread_id: str) -> Step:
    """Remove the thread's tombstone once it has no runs left."""
    return (
        "DELETE FROM threads WHERE id = ? AND deleted_at IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM runs WHERE thread_id = ?)",
        (thread_id, thread_id),
    )


def open_store(url: str) -> SqlStore:
    """A store for ``CHAT_DB_URL`` (not yet opened).

    Raises:
        ValueError: the URL names no supported database.
    """
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if path.startswith("/"):
            path = path[1:]  # sqlite:///relative.db → relative.db; sqlite:////abs → /abs
        if not path:
            raise ValueError("CHAT_DB_URL: sqlite needs a path, e.g. sqlite:///var/chat.db")
        return SqlStore(SqliteDriver(path))
    if url.startswith(("postgresql://", "postgres://")):
        return SqlStore(PostgresDriver(url))
    raise ValueError(
        f"CHAT_DB_URL must start with sqlite:// or postgresql://, got {url.split(':', 1)[0]!r}"
    )
