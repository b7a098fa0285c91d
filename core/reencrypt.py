"""`ipaas secrets reencrypt`: every stored secret (credentials, webhook secrets) encrypted
anew with the newest key, after which the older keys can be removed (docs/operating.md).

It runs beside serving cores. Each batch is read, re-encrypted outside any transaction and
written in a short transaction of its own, a row only where it still holds the ciphertext
that was read: a secret a core rewrote meanwhile keeps the core's value, never the old one.
The database's key check (ipaas.key_check) moves last, once the secrets have: from then on
a core whose keys lack the newest refuses to start, as it could read none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import Connection, Table, bindparam, select, update

from ipaas import key_check
from ipaas.crypto import SecretBox
from ipaas.storage.db import Database
from ipaas.storage.tables import Credential, WebhookSecret

TABLES: tuple[Table, ...] = (Credential.__table__, WebhookSecret.__table__)  # type: ignore[assignment]
BATCH = 500


@dataclass
class Reencrypted:
    rewritten: int = 0
    current: int = 0  # already encrypted with the newest key
    changed: int = 0  # rewritten (or deleted) by a core meanwhile, left as the core wrote it
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # table -> ids no key decrypts
    # The key check, not counted among the secrets: "reencrypted", "current", "changed",
    # "unreadable" (no key decrypts it), or "absent" (no core has started since the migration).
    key_check: str = "absent"


async def reencrypt_secrets(db: Database, box: SecretBox, batch: int = BATCH) -> Reencrypted:
    done = Reencrypted()
    for table in TABLES:
        after = ""
        while rows := await db.read(partial(_read_batch, table, after, batch)):
            after = rows[-1].id
            changes = []
            for row in rows:
                try:
                    token = box.rotate(row.ciphertext)
                except ValueError:
                    done.unreadable.setdefault(table.name, []).append(row.id)
                    continue
                if token is None:
                    done.current += 1
                else:
                    changes.append({"b_id": row.id, "b_old": row.ciphertext, "b_new": token})
            if changes:
                written = await db.transaction(partial(_write_batch, table, changes))
                done.rewritten += written
                done.changed += len(changes) - written
    done.key_check = await _reencrypt_key_check(db, box)
    return done


async def _reencrypt_key_check(db: Database, box: SecretBox) -> str:
    token = await db.read(key_check.read_check)
    if token is None:
        return "absent"
    if not key_check.opens(box, token):
        return "unreadable"
    if (new := box.rotate(token)) is None:
        return "current"
    change = {"b_id": key_check.ROW_ID, "b_old": token, "b_new": new}
    return "reencrypted" if await db.transaction(partial(_write_batch, key_check.CHECK, [change])) else "changed"


def _read_batch(table: Table, after: str, batch: int, conn: Connection) -> list[Any]:
    return list(conn.execute(select(table.c.id, table.c.ciphertext).where(table.c.id > after).order_by(table.c.id).limit(batch)))


def _write_batch(table: Table, changes: list[dict[str, str]], conn: Connection) -> int:
    # One statement a row rather than executemany: each rowcount says whether that row
    # still held what was read.
    stmt = update(table).where(table.c.id == bindparam("b_id"), table.c.ciphertext == bindparam("b_old")).values(ciphertext=bindparam("b_new"))
    return sum(conn.execute(stmt, change).rowcount for change in changes)
