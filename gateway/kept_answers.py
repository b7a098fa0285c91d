"""Answers kept for Idempotency-Key replays, sealed with the caller's own API key.

A kept answer can hold a secret shown once (a new API key, a webhook secret), and the store
is a table beside the core's or a shared Redis: in plaintext, anyone who can read either for
24 hours could read it. The answer is encrypted (AES-GCM) under a key derived (HKDF) from
the API key that made the request, which no store holds: the core keeps only its SHA-256,
from which HKDF's HMAC cannot be computed. Only that API key can open it again, so a replay
by another key of the same tenant is refused instead of answered.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = b"\x01"
NONCE_BYTES = 12


def _cipher(authorization: str, scope: str) -> AESGCM:
    token = authorization.split(None, 1)[-1].strip()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ipaas idempotency answer\x00" + scope.encode()).derive(token.encode())
    return AESGCM(key)


def seal(authorization: str, scope: str, fingerprint: str, content: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + _cipher(authorization, scope).encrypt(nonce, content, fingerprint.encode())


def open_sealed(authorization: str, scope: str, fingerprint: str, kept: bytes) -> bytes | None:
    """The answer, or None when this caller's key did not seal it."""
    if not kept.startswith(VERSION):
        return kept  # kept in plaintext by an earlier release (JSON starts with "{")
    nonce, sealed = kept[1 : 1 + NONCE_BYTES], kept[1 + NONCE_BYTES :]
    try:
        return _cipher(authorization, scope).decrypt(nonce, sealed, fingerprint.encode())
    except InvalidTag:
        return None
