"""Encryption at rest for credentials and webhook secrets (Fernet, with key rotation).

Keys come from IPAAS_SECRET_KEYS (comma-separated, newest first) or, when unset, from a key
file generated on first start in the data dir with mode 0600. Rotation: put a new key first;
old keys still decrypt, and `rotate` re-encrypts a value under the newest key. Several
replicas add the new key last everywhere before any puts it first (docs/operating.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

KEY_FILE = "secret.key"


class SecretBox:
    def __init__(self, keys: list[str] | tuple[str, ...]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        try:
            self._fernet = MultiFernet([Fernet(k.encode() if isinstance(k, str) else k) for k in keys])
        except (ValueError, TypeError):
            raise SystemExit("IPAAS_SECRET_KEYS must hold url-safe base64 Fernet keys (32 bytes each)") from None

    def encrypt(self, value: object) -> str:
        return self._fernet.encrypt(orjson.dumps(value)).decode()

    def decrypt(self, token: str) -> object:
        try:
            return orjson.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken:
            # Never include the token: it is secret material too.
            raise ValueError("cannot decrypt a stored secret, as the key that encrypted it is not configured") from None

    def rotate(self, token: str) -> str:
        return self._fernet.rotate(token.encode()).decode()


def load_keys(configured: tuple[str, ...], data_dir: Path) -> list[str]:
    if configured:
        return list(configured)
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(Fernet.generate_key().decode() + "\n")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
