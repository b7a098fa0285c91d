"""Idempotency keys (IETF draft-ietf-httpapi-idempotency-key-header; Stripe's rules).

The first request with a key runs and its response is kept for 24 h; a repeat with the same
request gets the kept response (`X-Idempotency-Replay: true`) and runs nothing; the same key
with another request → 422; a repeat while the first is still running → 409. Keys are
scoped per tenant. Webhooks are not kept here (the gateway would keep an answer before the
core checked the signature): their key goes to the core, which dedupes what it accepted.
The store is shared by every replica and survives restarts: SQL (the gateway's own table)
by default, Redis when IPAAS_REDIS_URL is set. A lock left by a gateway that died
mid-request expires after LOCK_SECONDS; the core dedupes the trigger by the same key, so the
retry that takes over cannot enqueue twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol

import orjson
from sqlalchemy import Column, DateTime, Integer, LargeBinary, MetaData, String, Table, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ipaas.storage.db import Database
from ipaas.storage.group_commit import GroupCommit

KEEP = timedelta(hours=24)
LOCK_SECONDS = 60
MAX_KEY_LENGTH = 255
KEPT_HEADERS = ("location", "content-type")
# Answers that say nothing about the request itself (a timeout, the queue full, the core
# down or failing): kept, they would be replayed for 24 h after the cause had passed. The
# key is released instead, so a retry runs again; the core dedupes the trigger by the key.
# A conflict (409, ABORTED: a stale version) is the request's real answer and is kept.
TRANSIENT_STATUSES = frozenset({408, 429, 499, 500, 502, 503, 504})


def fingerprint(method: str, path: str, query: str, precondition: str, body: bytes) -> str:
    """What a key stands for: everything that decides what the request does, If-Match's
    version (precondition) included."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode(), precondition.encode("latin-1"), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class Record:
    fingerprint: str
    done: bool
    status: int = 0
    headers: dict[str, str] | None = None
    body: bytes = b""


class Store(Protocol):
    async def begin(self, key: str, fingerprint: str) -> Record | None:
        """Reserve the key (None) or return what it already holds."""

    async def complete(self, key: str, fingerprint: str, status: int, headers: dict[str, str], body: bytes) -> None: ...

    async def abandon(self, key: str) -> None: ...

    async def purge(self) -> int: ...

    async def close(self) -> None: ...


metadata = MetaData()
table = Table(
    "gateway_idempotency_keys",
    metadata,
    Column("key", String(600), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("status", Integer, nullable=False),  # 0 while in flight
    Column("headers", LargeBinary, nullable=True),
    Column("body", LargeBinary, nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class SqlStore:
    """Reservations and completions that arrive together share one transaction (group
    commit, each item still answered on its own): two transactions per keyed request were
    most of what the key cost. On SQLite a transaction is one hand-off to the writer thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._insert = (postgresql.insert if db.is_postgres else sqlite.insert)(table).on_conflict_do_nothing(index_elements=["key"]).returning(table.c.key)
        self._complete = (
            table.update()
            .where(table.c.key == bindparam("b_key"))
            .values(status=bindparam("b_status"), headers=bindparam("b_headers"), body=bindparam("b_body"), expires_at=bindparam("b_expires"))
        )
        self._begins: GroupCommit[tuple[str, str], Record | None | bool] = GroupCommit(self._begin_many, name="idempotency-begin", isolate=True)
        self._completes: GroupCommit[dict[str, object], None] = GroupCommit(self._complete_many, name="idempotency-complete", isolate=True)

    async def create(self) -> None:
        def create(conn: Connection) -> None:
            if self.db.is_postgres:
                # Gateways that start together (a first deploy, a scale-up) would all see no
                # table and all create it: check-then-create is not atomic on PostgreSQL, and
                # the losers exited at start-up. One at a time; the lock ends with the
                # transaction. (The core's migrations hold 724011 the same way.)
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724012)")
            metadata.create_all(conn, checkfirst=True)

        await self.db.transaction(create)

    async def begin(self, key: str, fingerprint: str) -> Record | None:
        for _ in range(3):
            outcome = await self._begins.submit((key, fingerprint))
            if outcome is not False:
                return outcome  # type: ignore[return-value]
        raise RuntimeError("idempotency store contention")

    def _reserve(self, conn: Connection, now: datetime, key: str, fingerprint: str) -> Record | None | bool:
        values = {"key": key, "fingerprint": fingerprint, "status": 0, "expires_at": now + timedelta(seconds=LOCK_SECONDS)}
        if conn.execute(self._insert, values).first() is not None:  # rowcount is -1 here on psycopg
            return None
        row = conn.execute(select(table).where(table.c.key == key)).first()
        if row is None:
            return False  # deleted meanwhile: try again
        if _aware(row.expires_at) <= now:  # an expired entry or an abandoned lock
            conn.execute(delete(table).where(table.c.key == key, table.c.expires_at == row.expires_at))
            return False
        return Record(row.fingerprint, row.status != 0, row.status, orjson.loads(row.headers) if row.headers else {}, row.body or b"")

    async def _begin_many(self, items: list[tuple[str, str]]) -> list[Record | None | bool]:
        # In order, in one transaction: a key twice in one batch finds the first reservation.
        now = _now()
        return await self.db.transaction(lambda conn: [self._reserve(conn, now, key, fp) for key, fp in items])

    async def complete(self, key: str, fingerprint: str, status: int, headers: dict[str, str], body: bytes) -> None:
        await self._completes.submit({"b_key": key, "b_status": status, "b_headers": orjson.dumps(headers), "b_body": body, "b_expires": _now() + KEEP})

    async def _complete_many(self, items: list[dict[str, object]]) -> list[None]:
        await self.db.transaction(lambda conn: conn.execute(self._complete, items))
        return [None] * len(items)

    async def close(self) -> None:
        """Write what was handed over before the database goes away."""
        await self._begins.close()
        await self._completes.close()

    async def abandon(self, key: str) -> None:
        stmt = delete(table).where(table.c.key == key, table.c.status == 0)
        await self.db.transaction(lambda conn: conn.execute(stmt))

    async def purge(self) -> int:
        stmt = delete(table).where(table.c.expires_at < _now())
        return await self.db.transaction(lambda conn: conn.execute(stmt).rowcount)


class RedisStore:
    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.redis = redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    @staticmethod
    def _key(key: str) -> str:
        return "ipaas:idem:" + hashlib.sha256(key.encode()).hexdigest()

    async def begin(self, key: str, fingerprint: str) -> Record | None:
        name = self._key(key)
        if await self.redis.set(name, orjson.dumps({"f": fingerprint, "s": 0}), nx=True, ex=LOCK_SECONDS):
            return None
        raw = await self.redis.get(name)
        if raw is None:  # expired between the two calls
            return await self.begin(key, fingerprint)
        data = orjson.loads(raw)
        return Record(data["f"], data["s"] != 0, data["s"], data.get("h", {}), bytes.fromhex(data.get("b", "")))

    async def complete(self, key: str, fingerprint: str, status: int, headers: dict[str, str], body: bytes) -> None:
        await self.redis.set(self._key(key), orjson.dumps({"f": fingerprint, "s": status, "h": headers, "b": body.hex()}), ex=int(KEEP.total_seconds()))

    async def abandon(self, key: str) -> None:
        await self.redis.delete(self._key(key))

    async def purge(self) -> int:
        return 0  # Redis expires entries itself

    async def close(self) -> None:
        await self.redis.aclose()
