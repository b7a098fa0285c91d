"""Callers and API keys: keys are random, shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "ipk_"
ADMIN_KEY_FILE = "admin.key"


@dataclass(frozen=True)
class Caller:
    tenant_id: str | None
    tier: str
    key_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.tier == "admin"


ADMIN = Caller(tenant_id=None, tier="admin", key_id=None)
_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("ipaas_caller", default=None)


def current_caller() -> Caller | None:
    return _current.get()


def set_caller(caller: Caller | None) -> contextvars.Token:
    return _current.set(caller)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_match(a_hash: str, b_hash: str) -> bool:
    return hmac.compare_digest(a_hash, b_hash)


def load_admin_key(configured: str | None, data_dir: Path) -> tuple[str, bool]:
    """The admin key, and whether it was generated now (so the caller prints it once)."""
    if configured:
        return configured, False
    path = data_dir / ADMIN_KEY_FILE
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = "ipk_admin_" + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key, True


def current_tenant() -> str:
    """The calling tenant's id; the interceptor guarantees one for tenant RPCs."""
    caller = _current.get()
    if caller is None or not caller.tenant_id:
        raise RuntimeError("no tenant caller bound: is this RPC routed through CoreInterceptor?")
    return caller.tenant_id
