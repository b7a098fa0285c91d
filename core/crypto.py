"""Encryption at rest for credentials and webhook secrets (Fernet, with key rotation).

Keys come from IPAAS_SECRET_KEYS (comma-separated, newest first) or, when unset, from a key
file generated on first start in the data dir with mode 0600 (only for a database no key
was set up for yet, see `load_box`). Rotation: put a new key first;
old keys still decrypt, and `rotate` re-encrypts a value under the newest key. Several
replicas add the new key last everywhere before any puts it first (docs/operating.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from ipaas import key_check

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


def create_key_file(data_dir: Path) -> tuple[list[str], bool]:
    """The key file's keys, and whether this call created the file (False: another process
    sharing the data dir created it first, and its key is used)."""
    path = data_dir / KEY_FILE
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    # Written aside, synced, then linked into place: the file appears whole or not at all, so
    # a process sharing the data dir never reads it half written, and the key is on disk
    # before any row encrypted with it is committed.
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=data_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return existing_keys((), data_dir) or [], False
    finally:
        os.unlink(tmp)
    _sync_dir(data_dir)
    return [key], True


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_key_file(data_dir: Path, keys: list[str]) -> None:
    """Delete the key file if it still holds exactly `keys` (the ones this process made)."""
    if existing_keys((), data_dir) == keys:
        (data_dir / KEY_FILE).unlink(missing_ok=True)


async def load_box(settings: Settings, db: Database) -> SecretBox:
    """The keys this process encrypts and decrypts with, from its settings or key file,
    checked against the database's key check (ipaas.key_check).

    A key is generated only for a database that no key has been set up for yet. A core with
    keys that read none of its secrets (a second replica without IPAAS_SECRET_KEYS or with
    other keys, a lost key file, replicas racing on an empty database) would answer every
    webhook 503 and retry every step forever, so it exits at start with one line.
    """
    key_file = (settings.data_dir / KEY_FILE).resolve()
    keys = existing_keys(settings.secret_keys, settings.data_dir)
    if keys is not None:
        box = SecretBox(keys)
        try:
            await key_check.ensure_opens(db, box)
        except key_check.OtherKey:
            where = "none of the keys in IPAAS_SECRET_KEYS decrypts it" if settings.secret_keys else f"the key file {key_file} does not decrypt it"
            raise SystemExit(_refusal(where, bool(settings.secret_keys))) from None
        return box
    missing = f"IPAAS_SECRET_KEYS is unset and there is no key file at {key_file}"
    if await key_check.is_set_up(db):
        raise SystemExit(_refusal(missing, False))
    # The key file is written before the check, and deleted if another core's check won:
    # a check committed before its key was on disk would, after a crash between the two,
    # lock the database to a key nobody has. A crash after losing leaves a key file that
    # the next start finds does not decrypt the check, and says so.
    keys, created = create_key_file(settings.data_dir)
    box = SecretBox(keys)
    try:
        await key_check.ensure_opens(db, box)
    except key_check.OtherKey:
        if created:
            remove_key_file(settings.data_dir, keys)
        raise SystemExit(_refusal(missing if created else f"the key file {key_file} does not decrypt it", False)) from None
    return box


def _refusal(where: str, configured: bool) -> str:
    # Never the keys themselves: this line goes to the terminal and the service's journal.
    fix = "put the key the other cores use in IPAAS_SECRET_KEYS (newest first)" if configured else "set IPAAS_SECRET_KEYS to the keys the other cores use (newest first), or restore the key file of the core that set it up"
    return f"the database was set up with an encryption key this core does not have (its credentials and webhook secrets are encrypted with it): {where}; {fix}"
