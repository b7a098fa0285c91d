"""Opaque page tokens over time-ordered ids (newest first)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from google.protobuf.message import Message

from ipaas.errors import InvalidArgument
from ipaas.wire import ITEM_FRAMING, REPLY_ITEMS_BYTES

T = TypeVar("T")
M = TypeVar("M", bound=Message)
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_VERSION = 2**31 - 1  # versions are int32 in the API


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.field("page_token", "is not a token this API issued") from None
    if not value or len(value) > 64 or not value.isascii():
        raise InvalidArgument.field("page_token", "is not a token this API issued")
    return value


def decode_version_token(token: str) -> int:
    """Version lists page by version number: the token must hold one a version can have."""
    value = decode_token(token)
    if not value.isdigit() or not 0 < int(value) <= MAX_VERSION:
        raise InvalidArgument.field("page_token", "is not a token this API issued")
    return int(value)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str

    @classmethod
    def of(cls, rows: list[T], limit: int, key: Callable[[T], str]) -> "Page[T]":
        """rows were fetched with limit + 1, so a surplus row means there is another page."""
        if len(rows) > limit:
            rows = rows[:limit]
            return cls(rows, encode_token(key(rows[-1])))
        return cls(rows, "")


def within_bytes(messages: list[M], rows: list[T], next_token: str, key: Callable[[T], str], budget: int = REPLY_ITEMS_BYTES) -> tuple[list[M], str]:
    """A page's messages (one per row) cut to fit one reply. page_size is a maximum, so a
    page of large items (executions with big payloads) ends early, and its token continues
    after the last item kept, instead of the whole call failing."""
    size = 0
    for i, message in enumerate(messages):
        size += message.ByteSize() + ITEM_FRAMING
        if i and size > budget:
            return messages[:i], encode_token(key(rows[i - 1]))
    return messages, next_token
