"""The database's key check: one row holding a known value encrypted with the key the
database was set up with, so a core can tell at start whether its keys read the stored
secrets, rather than on the first webhook (503) or step (retried forever).

The row is written once: the primary key lets exactly one of several cores racing on an
empty database win (INSERT ... ON CONFLICT DO NOTHING), and every core then reads back the
winner's row. Any configured key that decrypts it will do, so key rotation keeps working;
`ipaas secrets reencrypt` moves it to the newest key with the secrets (ipaas.reencrypt).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from ipaas.storage.tables import Credential, SecretKeyCheck, WebhookSecret, utcnow

if TYPE_CHECKING:
    from ipaas.crypto import SecretBox
    from ipaas.storage.db import Database

CHECK = SecretKeyCheck.__table__
ROW_ID = 1
KNOWN_VALUE = "simple-ipaas secret key check"
# A database written by releases before the check may hold secrets of more than one key
# (replicas that each generated their own): a key that opens any of these is adopted.
ADOPTION_SAMPLE = 50


class OtherKey(Exception):
    """The database was set up with a key the box does not hold."""


async def ensure_opens(db: Database, box: SecretBox) -> None:
    """Return if `box` decrypts the database's key check, writing the check first with the
    box's newest key if there is none yet; raise OtherKey otherwise."""
    token = await db.read(read_check)
    if token is None:
        if not await _may_adopt(db, box):
            raise OtherKey
        await db.transaction(partial(_insert_check, box.encrypt(KNOWN_VALUE)))
        token = await db.read(read_check)  # ours, or that of a core that got there first
    if token is None or not opens(box, token):
        raise OtherKey


async def is_set_up(db: Database) -> bool:
    """Whether the database already belongs to some key: it has a key check or a secret."""
    return await db.read(_is_set_up)


def opens(box: SecretBox, token: str) -> bool:
    try:
        return box.decrypt(token) == KNOWN_VALUE
    except ValueError:
        return False


async def _may_adopt(db: Database, box: SecretBox) -> bool:
    # Without a check, secrets stored by an older release decide: the first core whose key
    # opens one of them writes the check. A database without secrets takes any key.
    tokens = await db.read(_sample_secrets)
    if not tokens:
        return True
    for token in tokens:
        try:
            box.decrypt(token)
        except ValueError:
            continue
        return True
    return False


def read_check(conn: Connection) -> str | None:
    return conn.scalar(select(CHECK.c.ciphertext).where(CHECK.c.id == ROW_ID))


def _insert_check(token: str, conn: Connection) -> None:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(insert(CHECK).values(id=ROW_ID, ciphertext=token, created_at=utcnow()).on_conflict_do_nothing(index_elements=[CHECK.c.id]))


def _sample_secrets(conn: Connection) -> list[str]:
    tokens: list[str] = []
    for table in (Credential, WebhookSecret):
        tokens += conn.scalars(select(table.ciphertext).limit(ADOPTION_SAMPLE))
    return tokens


def _is_set_up(conn: Connection) -> bool:
    if read_check(conn) is not None:
        return True
    return any(conn.scalar(select(table.id).limit(1)) is not None for table in (Credential, WebhookSecret))
