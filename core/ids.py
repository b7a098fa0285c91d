"""Identifiers: a type prefix plus a time-ordered random part (monotonic ULID, Crockford
base32).

Time-ordered ids keep B-tree inserts at the right edge and let listings page by id. Within
one millisecond the random part grows, so ids made by one process sort in creation order (the
monotonic ULID rule); it grows by a random step, not by 1 as the ULID spec has it, so an id
does not give away its neighbours' (a workflow id is a webhook's URL).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def new_id(prefix: str) -> str:
    global _last_ms, _last_rand
    with _lock:
        ms = int(time.time() * 1000)
        if ms <= _last_ms:
            # 48 random bits a step: at 2^79 headroom, 2^31 ids in one millisecond fit.
            ms, rand = _last_ms, (_last_rand + 1 + int.from_bytes(os.urandom(6), "big")) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        _last_ms, _last_rand = ms, rand
    return f"{prefix}_{_encode((ms << 80) | rand)}"


def first_id_at(prefix: str, when: datetime) -> str:
    """The smallest id `new_id(prefix)` could make at `when`: every id made earlier sorts
    below it, so the primary key's index finds rows by age without an index of their own."""
    return f"{prefix}_{_encode(int(when.timestamp() * 1000) << 80)}"


def _encode(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
