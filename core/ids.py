"""Identifiers: a type prefix plus a time-ordered random part (monotonic ULID, Crockford
base32).

Time-ordered ids keep B-tree inserts at the right edge and let listings page by id. Within
one millisecond the random part is incremented, so ids made by one process sort in creation
order (the monotonic ULID rule).
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def new_id(prefix: str) -> str:
    global _last_ms, _last_rand
    with _lock:
        ms = int(time.time() * 1000)
        if ms <= _last_ms:
            ms, rand = _last_ms, (_last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        _last_ms, _last_rand = ms, rand
    value = (ms << 80) | rand
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
