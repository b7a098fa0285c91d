"""Engine set-up for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import orjson
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own locking (and busy handler) alone
    fcntl = None  # type: ignore[assignment]


READERS = 4  # SQLite reader threads per process (see Database.read)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _json_dumps_sqlite(value: Any) -> bytearray:
    # SQLite gives a column declared JSON numeric affinity: text that reads as a number is
    # stored as one, so a document that is a bare number changed (2.0 came back as 2, and
    # 12345678901234567890 as 1.2345678901234567e+19). A BLOB is never converted. bytearray,
    # not bytes: sqlite3 binds str, int, float and bytearray as they are but looks for an
    # adapter for bytes, which cost more than it saves on a small document (timeit: 101 B,
    # serialize + INSERT 2.2 µs as str, 2.7 as bytes, 2.3 as bytearray; 803 B: 4.3, 3.7, 3.4).
    return bytearray(orjson.dumps(value))


def _json_loads(value: Any) -> Any:
    # bytes from a BLOB; from rows SQLite stored before documents were bound as BLOBs, a
    # str (TEXT) or, for a bare number, that number.
    if isinstance(value, (int, float)):
        return value
    return orjson.loads(value)


def sync_url(url: str) -> URL:
    """The URL for synchronous use (migrations): sqlite via pysqlite, PostgreSQL via psycopg 3."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")


def async_url(url: str) -> URL:
    parsed = sync_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    return parsed


def ensure_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def install_sqlite_pragmas(sync_engine: Any, synchronous: str = "FULL") -> None:
    """WAL lets readers run beside the single writer; busy_timeout waits instead of failing.

    synchronous=FULL makes a commit durable against power loss, which is what "durably
    enqueued" promises; group commit keeps its cost per event low.
    """

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


T = TypeVar("T")


def _writer_lock_path(url: str) -> str | None:
    parsed = make_url(url)
    if fcntl is None or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database + "-writer.lock"


class Database:
    """One async engine and session factory per process, plus `transaction()` for the hot
    path (enqueue, claim, outcomes)."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False, synchronous: str = "FULL") -> None:
        ensure_sqlite_dir(url)
        self.url = url
        target = async_url(url)
        self.dialect = target.get_backend_name()
        json_codec = {"json_serializer": _json_dumps if self.dialect == "postgresql" else _json_dumps_sqlite, "json_deserializer": _json_loads}
        kwargs: dict[str, Any] = {"echo": echo, **json_codec}
        if self.dialect == "postgresql":
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        else:
            # SQLite has one writer. Many connections in one process would contend for the
            # lock and sleep in SQLite's busy handler (up to 100 ms a time). There are two:
            # this one for the API (reads, rare writes) and the hot path's writer below,
            # which takes every frequent write, so the two seldom meet.
            kwargs.update(pool_size=1, max_overflow=0, pool_timeout=120)
        self.engine: AsyncEngine = create_async_engine(target, **kwargs)
        if self.dialect == "sqlite":
            install_sqlite_pragmas(self.engine.sync_engine, synchronous)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._writer: Engine | None = None
        self._writer_conn: Connection | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        self._reader: Engine | None = None
        self._reader_threads: ThreadPoolExecutor | None = None
        self._lock_path: str | None = None
        self._lock_fd: int | None = None
        if self.dialect == "sqlite":
            # aiosqlite hands every driver call (cursor, execute, fetch, commit) to its thread
            # and back through the event loop: a dozen loop round trips per transaction, each
            # waiting behind whatever else the loop has queued. The hot path instead runs a
            # whole transaction in one hand-off, on a writer thread with its own connection.
            self._writer = create_engine(sync_url(url), **json_codec, pool_size=1, max_overflow=0)
            install_sqlite_pragmas(self._writer, synchronous)
            # Engine processes write the same file. SQLite makes a writer that finds the lock
            # taken sleep in its busy handler (1, 2, 5 ... 100 ms); waiting on a file lock
            # instead wakes the next writer the moment the last one commits.
            self._lock_path = _writer_lock_path(url)
            # The API's frequent reads (the caller's key on every call, the execution a run
            # answers with) likewise take one hand-off each, on reader threads: through the
            # API's single aiosqlite connection they queued behind each other at ~1.7 ms a
            # session, so a core answered ~60 runs or ~140 reads a second at any concurrency.
            # WAL lets readers run beside the writer, and sqlite3 lets go of the GIL in a query.
            self._reader = create_engine(sync_url(url), **json_codec, pool_size=READERS, max_overflow=0)
            install_sqlite_pragmas(self._reader, synchronous)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def session(self) -> AsyncSession:
        return self.sessions()

    async def transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn(connection)` in one transaction: committed if it returns, rolled back if
        it raises. `fn` is synchronous and must not touch the event loop."""
        if self._writer is None:
            async with self.engine.begin() as conn:
                return await conn.run_sync(fn)
        if self._writer_thread is None:  # started on first use, again after dispose()
            self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipaas-sqlite-writer")
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, self._run_writer, fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run `fn(connection)` for reading only (no transaction is committed). `fn` is
        synchronous and must not touch the event loop."""
        if self._reader is None:
            async with self.engine.connect() as conn:
                return await conn.run_sync(fn)
        if self._reader_threads is None:  # started on first use, again after dispose()
            self._reader_threads = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="ipaas-sqlite-reader")
        return await asyncio.get_running_loop().run_in_executor(self._reader_threads, self._run_reader, fn)

    def _run_reader(self, fn: Callable[[Connection], T]) -> T:
        assert self._reader is not None
        with self._reader.connect() as conn:
            return fn(conn)

    def _run_writer(self, fn: Callable[[Connection], T]) -> T:
        if self._lock_path is None:
            return self._in_writer_transaction(fn)
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            return self._in_writer_transaction(fn)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _in_writer_transaction(self, fn: Callable[[Connection], T]) -> T:
        # The writer thread keeps its connection: checking one out of the pool and back in
        # (with the pool's reset, a ROLLBACK) cost ~20 % of each hot-path transaction (py-spy).
        assert self._writer is not None
        if self._writer_conn is None:
            self._writer_conn = self._writer.connect()
        try:
            with self._writer_conn.begin():
                return fn(self._writer_conn)
        except BaseException:
            # Rolled back; a connection in an unknown state is not reused.
            if self._writer_conn.invalidated or self._writer_conn.in_transaction():
                self._close_writer_conn()
            raise

    def _close_writer_conn(self) -> None:
        if self._writer_conn is not None:
            conn, self._writer_conn = self._writer_conn, None
            try:
                conn.close()
            except Exception:
                pass  # an unusable connection: the next transaction opens a new one

    def _dispose_writer(self) -> None:
        self._close_writer_conn()
        if self._writer is not None:
            self._writer.dispose()

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._reader_threads is not None:
            threads, self._reader_threads = self._reader_threads, None
            threads.shutdown(wait=True)
        if self._reader is not None:
            self._reader.dispose()
        if self._writer is not None and self._writer_thread is not None:
            thread, self._writer_thread = self._writer_thread, None
            await asyncio.get_running_loop().run_in_executor(thread, self._dispose_writer)
            thread.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
