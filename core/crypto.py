"""Encryption at rest for credentials and webhook secrets (Fernet, with key rotation).

Keys come from IPAAS_SECRET_KEYS (comma-separated, newest first) or, when unset, from a key
file generated on first start in the data dir with mode 0600 (only while the database holds
no secret, see `load_box`). Rotation: put a new key first;
old keys still decrypt, and `rotate` re-encrypts a value under the newest key. Several
replicas add the new key last everywhere before any puts it first (docs/operating.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select

from ipaas.storage.tables import Credential, WebhookSecret

if TYPE_CHECKING:
    from ipaas.settings import Settings
    from ipaas.storage.db import Database

KEY_FILE = "secret.key"


class SecretBox:
    def __init__(self, keys: list[str] | tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        try:
            fernets = [Fernet(k.encode() if isinstance(k, str) else k) for k in keys]
        except (ValueError, TypeError):
            raise SystemExit("IPAAS_SECRET_KEYS must hold url-safe base64 Fernet keys (32 bytes each)") from None
        self._newest = fernets[0]
        self._fernet = MultiFernet(fernets)

    def encrypt(self, value: object) -> str:
        return self._fernet.encrypt(orjson.dumps(value)).decode()

    def decrypt(self, token: str) -> object:
        try:
            return orjson.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken:
            # Never include the token: it is secret material too.
            raise ValueError("cannot decrypt a stored secret, as the key that encrypted it is not configured") from None

    def rotate(self, token: str) -> str | None:
        """token encrypted with the newest key; None if it already is. ValueError if no key
        decrypts it."""
        try:
            self._newest.decrypt(token.encode())
        except InvalidToken:
            pass
        else:
            return None
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise ValueError("no configured key decrypts this stored secret") from None


def existing_keys(configured: tuple[str, ...], data_dir: Path) -> list[str] | None:
    """IPAAS_SECRET_KEYS, else the key file's keys; None when there are neither."""
    if configured:
        return list(configured)
    try:
        text = (data_dir / KEY_FILE).read_text()
    except FileNotFoundError:
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def create_key_file(data_dir: Path) -> list[str]:
    path = data_dir / KEY_FILE
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return existing_keys((), data_dir) or []
    key = Fernet.generate_key().decode()
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return [key]


async def load_box(settings: Settings, db: Database) -> SecretBox:
    """The keys this process encrypts and decrypts with, from its settings or key file.

    A key is generated only for a database that holds no secret yet. Over stored secrets a
    new key starts a core that can read none of them (a second replica without
    IPAAS_SECRET_KEYS, a lost key file): every webhook 503, every step retried forever.
    """
    keys = existing_keys(settings.secret_keys, settings.data_dir)
    if keys is None:
        if await _holds_secrets(db):
            raise SystemExit(
                "the database holds credentials or webhook secrets encrypted with a key this core does not have: "
                f"IPAAS_SECRET_KEYS is unset and there is no key file at {(settings.data_dir / KEY_FILE).resolve()}; "
                "set IPAAS_SECRET_KEYS to the other replicas' keys, or restore the key file"
            )
        keys = create_key_file(settings.data_dir)
    return SecretBox(keys)


async def _holds_secrets(db: Database) -> bool:
    async with db.session() as s:
        for table in (Credential, WebhookSecret):
            if await s.scalar(select(table.id).limit(1)) is not None:
                return True
    return False
