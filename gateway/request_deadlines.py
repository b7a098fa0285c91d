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


def head_timeout(env: Mapping[str, str]) -> float:
    return seconds(env, "IPAAS_HTTP_HEAD_TIMEOUT", HEAD_TIMEOUT)


def body_timeout(env: Mapping[str, str]) -> float:
    return seconds(env, "IPAAS_HTTP_BODY_TIMEOUT", BODY_TIMEOUT)


def protocol(timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing a connection whose request head is overdue."""

    class HeadDeadline(HttpToolsProtocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

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
