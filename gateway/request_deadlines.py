"""Deadlines for reading a request.

uvicorn closes only idle keep-alive connections. A client that connects and never finishes
its request head, or sends its body a byte at a time, holds a connection (and the body read
so far) for as long as it likes, and enough of them take all the gateway's connections
(slowloris). The head must arrive within IPAAS_HTTP_HEAD_TIMEOUT seconds of the connection
opening or the previous response ending (else the connection is closed), the body within
IPAAS_HTTP_BODY_TIMEOUT seconds of the head (else 408, see Gateway._read_body).
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ipaas.settings import seconds

HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
# How long a connection being closed keeps reading, and dropping, what the client still
# sends (see LingeringClose).
LINGER = 2.0


def head_timeout(env: Mapping[str, str]) -> float:
    return seconds(env, "IPAAS_HTTP_HEAD_TIMEOUT", HEAD_TIMEOUT)


def body_timeout(env: Mapping[str, str]) -> float:
    return seconds(env, "IPAAS_HTTP_BODY_TIMEOUT", BODY_TIMEOUT)


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


def protocol(timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing a connection whose request head is overdue, and
    closing every connection in stages (LingeringClose)."""

    class HeadDeadline(HttpToolsProtocol):
        _head_deadline: asyncio.TimerHandle | None = None
        lingering = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.transport = LingeringClose(transport, self)  # type: ignore[assignment]
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self.lingering:  # once closing, the rest of the request is dropped
                super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            # A pipelined request already queued has its head; otherwise the next is awaited.
            awaiting_head = not self.pipeline
            super().on_response_complete()
            if awaiting_head and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
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
