"""Deadlines for reading a request.

uvicorn closes only idle keep-alive connections. A client that connects and never finishes
its request head, or sends its body a byte at a time, holds a connection (and the body read
so far) for as long as it likes, and enough of them take all the gateway's connections
(slowloris). The head must arrive within IPAAS_HTTP_HEAD_TIMEOUT seconds of the connection
opening or the previous response ending (else the connection is closed), the body within
IPAAS_HTTP_BODY_TIMEOUT seconds of the head (else 408, see Gateway._read_body).

A deadline bounds a head's time, not its size: on a fast link a head of gigabytes arrives
well within it, and uvicorn's httptools parser keeps it all (no header limit of its own).
So a head still unfinished past max_head bytes is answered 431 and its connection closed;
and past IPAAS_HTTP_MAX_CONNECTIONS connections with a request in progress (its head being
read, its body, or its answer not yet sent), requests are answered 503. Idle connections
(kept alive between requests, or opened with nothing sent yet) hold no head or body and are
not counted: counted, a client holding idle sockets had every other request answered 503.
They last until the head deadline at most.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Mapping

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ipaas import reasons
from ipaas.gateway import envelope
from ipaas.settings import seconds, whole_number

HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
# How long a connection being closed keeps reading, and dropping, what the client still
# sends (see LingeringClose).
LINGER = 2.0
# Room for the request line (method, path and query) beside the headers' own limit.
REQUEST_LINE_BYTES = 16 * 1024
# Each request in progress may hold a head (~80 KiB) and a webhook's body (1 MiB) in memory:
# 1,000 bounds that near 1 GiB, as nginx's and gunicorn's ~1,000 connections per worker do.
MAX_CONNECTIONS = 1000
# Set in a request's scope["extensions"] when it arrived past the limit of requests in progress.
OVER_CAPACITY = "ipaas.over_capacity"


def head_timeout(env: Mapping[str, str]) -> float:
    return seconds(env, "IPAAS_HTTP_HEAD_TIMEOUT", HEAD_TIMEOUT)


def body_timeout(env: Mapping[str, str]) -> float:
    return seconds(env, "IPAAS_HTTP_BODY_TIMEOUT", BODY_TIMEOUT)


def max_connections(env: Mapping[str, str]) -> int:
    return whole_number(env, "IPAAS_HTTP_MAX_CONNECTIONS", MAX_CONNECTIONS, minimum=1)


def _head_too_large(max_head: int) -> bytes:
    """The 431 for a head cut off while it was read: the envelope, as the app answers."""
    rid = os.urandom(16).hex()
    error = envelope.HttpError(431, f"the request head (request line and headers) exceeds {max_head} bytes", reason=reasons.HEADERS_TOO_LARGE)
    content = envelope.error_body(error, {"request_id": rid})
    head = f"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: {len(content)}\r\nx-request-id: {rid}\r\nconnection: close\r\n\r\n"
    return head.encode() + content


class LingeringClose:
    """The connection's transport as uvicorn sees it, whose close() is staged (RFC 9112
    section 9.6): the answer and a FIN go out first, then what the client still sends is read
    and dropped until it closes too, for up to LINGER seconds.

    Closed at once, a socket with unread input answers the client's next bytes with a reset,
    and a reset can destroy the answer before the client reads it: a client still sending a
    body (the 408 of a body past its deadline, a 413, a 431) got "connection reset" instead
    of the answer that said why."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._closing or self._transport.is_closing():
            return
        self._closing = True
        self._protocol.lingering = True
        try:
            self._transport.resume_reading()  # flow control may have paused it mid-body
            self._transport.write_eof()  # after what is buffered: the answer
        except (OSError, RuntimeError, NotImplementedError):
            self._transport.close()
            return
        self._timer = asyncio.get_running_loop().call_later(LINGER, self._transport.close)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol(timeout: float, max_head: int, connections: int = MAX_CONNECTIONS) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing a connection whose request head is overdue or
    past max_head bytes, marking requests past `connections` connections with a request in
    progress, and closing every connection in stages (LingeringClose)."""
    # This server's connections with a request begun and not yet answered.
    busy: set[HttpToolsProtocol] = set()

    class HeadDeadline(HttpToolsProtocol):
        _head_deadline: asyncio.TimerHandle | None = None
        lingering = False
        # Bytes of the request head being read, counted per head (a kept-alive or pipelined
        # connection starts again at each), and how many heads have completed.
        _head_open = True
        _head_bytes = 0
        _heads = 0
        _unanswered = 0  # requests begun (their first byte parsed) and not yet answered

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.transport = LingeringClose(transport, self)  # type: ignore[assignment]
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.lingering:  # once closing, the rest of the request is dropped
                return
            open_before, heads_before = self._head_open, self._heads
            super().data_received(data)
            # Only data that is all head is counted: a head that began inside this data,
            # after a previous request, is counted from the next data on (at most one read
            # more is let in, never a legitimate head refused for its neighbour's bytes).
            if self._head_open and open_before and self._heads == heads_before:
                self._head_bytes += len(data)
                if self._head_bytes > max_head and not self.transport.is_closing():
                    self.transport.write(_head_too_large(max_head))
                    self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._unanswered += 1
            busy.add(self)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._head_open = False
            self._heads += 1
            super().on_headers_complete()
            # After uvicorn's own bookkeeping: this request and its task are counted.
            if len(busy) > connections or len(self.tasks) > connections:
                self.scope.setdefault("extensions", {})[OVER_CAPACITY] = True  # type: ignore[typeddict-item]

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head_open, self._head_bytes = True, 0

        def on_response_complete(self) -> None:
            # A pipelined request already queued has its head; otherwise the next is awaited.
            awaiting_head = not self.pipeline
            self._unanswered = max(0, self._unanswered - 1)
            if not self._unanswered:
                busy.discard(self)
            super().on_response_complete()
            if awaiting_head and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            busy.discard(self)
            self.transport.lost()  # type: ignore[attr-defined]
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(timeout, self._overdue)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _overdue(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline
