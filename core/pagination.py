"""Opaque page tokens over time-ordered ids (newest first) or, for what the core holds in
memory, names in order, each bound to the request that made it (AIP-158): replayed with
other filters, by another list or another caller, a token is refused instead of silently
mixing pages of different listings."""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

from google.protobuf.message import Message

from ipaas.errors import InvalidArgument
from ipaas.wire import ITEM_FRAMING, REPLY_ITEMS_BYTES

T = TypeVar("T")
M = TypeVar("M", bound=Message)
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_VERSION = 2**31 - 1  # versions are int32 in the API
MAX_KEY_LENGTH = 64
# Fields that may change between the pages of one listing; every other field of a List
# request is part of what its tokens are bound to (AIP-158).
PAGING_FIELDS = ("page_size", "page_token")
# 8 bytes tell listings apart: the fingerprint guards against mistakes, not forgery (a
# token only ever moves a cursor within rows the caller may already list).
_SCOPE_BYTES = 8
# Changing the token format changes this, so tokens of an older format are refused as
# belonging to another listing rather than misread.
_SCOPE_PERSON = b"ipaas.page.v1"

_NOT_OURS = "is not a token this API issued"
_OTHER_LISTING = "belongs to another listing: repeat the request that returned it, changing only page_size"


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def scope_of(request: Message, tenant_id: str | None) -> bytes:
    """The fingerprint of a listing: the list method (its request type), the caller's
    tenant, and every request field but page_size and page_token. Taken from the whole
    message, so a filter added to a request later is covered without anyone remembering."""
    filters = type(request)()
    filters.CopyFrom(request)
    for name in PAGING_FIELDS:
        filters.ClearField(name)
    digest = hashlib.blake2b(digest_size=_SCOPE_BYTES, person=_SCOPE_PERSON)
    for part in (request.DESCRIPTOR.full_name.encode(), (tenant_id or "").encode(), filters.SerializeToString(deterministic=True)):
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()


def encode_token(scope: bytes, last_key: str) -> str:
    return base64.urlsafe_b64encode(scope + last_key.encode()).decode().rstrip("=")


def decode_token(scope: bytes, token: str) -> str:
    """The key a token continues after; InvalidArgument on page_token when it is not one
    this API issued, or was issued for another listing."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = raw[_SCOPE_BYTES:].decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument.field("page_token", _NOT_OURS) from None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii():
        raise InvalidArgument.field("page_token", _NOT_OURS)
    if not hmac.compare_digest(raw[:_SCOPE_BYTES], scope):
        raise InvalidArgument.field("page_token", _OTHER_LISTING)
    return key


@dataclass(frozen=True)
class PageRequest:
    """One List call's paging: how many items, the key its page continues after ("" for the
    first page), and the listing its tokens are bound to."""

    size: int
    after: str
    scope: bytes

    @classmethod
    def of(cls, request: Message, tenant_id: str | None) -> "PageRequest":
        """From a List request with page_size and page_token fields, made by tenant_id
        (None for the admin)."""
        scope = scope_of(request, tenant_id)
        size = page_size(request.page_size)  # type: ignore[attr-defined]
        token = request.page_token  # type: ignore[attr-defined]
        return cls(size, decode_token(scope, token) if token else "", scope)

    def token_after(self, key: str) -> str:
        return encode_token(self.scope, key)

    def version_after(self) -> int | None:
        """Version lists page by version number: the key must be one a version can have."""
        if not self.after:
            return None
        if not self.after.isdigit() or not 0 < int(self.after) <= MAX_VERSION:
            raise InvalidArgument.field("page_token", _NOT_OURS)
        return int(self.after)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str
    request: PageRequest

    @classmethod
    def of(cls, rows: list[T], request: PageRequest, key: Callable[[T], str]) -> "Page[T]":
        """rows were fetched with request.size + 1, so a surplus row means there is another page."""
        if len(rows) > request.size:
            rows = rows[: request.size]
            return cls(rows, request.token_after(key(rows[-1])), request)
        return cls(rows, "", request)


def page_in_memory(items: Sequence[T], request: PageRequest, key: Callable[[T], str]) -> Page[T]:
    """A page of a listing the core holds in memory (connectors, breakers), sorted by key with
    no two items alike. It continues after the last key shown, not at an offset: an item that
    comes or goes between two calls neither repeats nor hides a neighbour."""
    start = bisect.bisect_right(items, request.after, key=key) if request.after else 0
    return Page.of(list(items[start : start + request.size + 1]), request, key)


def within_bytes(messages: list[M], page: Page[T], key: Callable[[T], str], budget: int = REPLY_ITEMS_BYTES) -> tuple[list[M], str]:
    """A page's messages (one per item) cut to fit one reply. page_size is a maximum, so a
    page of large items (executions with big payloads) ends early, and its token continues
    after the last item kept, instead of the whole call failing."""
    size = 0
    for i, message in enumerate(messages):
        size += message.ByteSize() + ITEM_FRAMING
        if i and size > budget:
            return messages[:i], page.request.token_after(key(page.items[i - 1]))
    return messages, page.next_token
