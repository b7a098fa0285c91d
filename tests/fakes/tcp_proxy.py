"""A TCP proxy in front of a real server (PostgreSQL), to play its outages without
stopping it: not up yet (nothing listens on the port), and a network partition (every
connection stays open and nothing passes)."""

from __future__ import annotations

import asyncio
import contextlib
import socket


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = _free_port()
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> "TcpProxy":
        """Listen (again): the server is up."""
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    def partition(self) -> None:
        """Forward nothing more, and hold new connections open unanswered."""
        self.frozen = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.frozen:
            return  # held open: a partitioned server never answers
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                while self.frozen:
                    await asyncio.sleep(0.1)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()
