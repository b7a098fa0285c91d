"""Shared machinery for the fake upstreams: a real aiohttp server on a free loopback port,
with queued failures and latency that tests control."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Failure:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class FakeServer:
    """Subclasses add routes in `routes()`; `received` records every accepted request body."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received: list[Any] = []
        self.requests = 0
        self._failures: list[Failure] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def fail_next(self, status: int, times: int = 1, retry_after: float | None = None, body: Any = None, headers: dict[str, str] | None = None) -> None:
        for _ in range(times):
            self._failures.append(self.failure(status, retry_after, body, dict(headers or {})))

    def failure(self, status: int, retry_after: float | None, body: Any, headers: dict[str, str]) -> Failure:
        if retry_after is not None:
            headers.setdefault("Retry-After", str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after))
        return Failure(status, body if body is not None else "error", headers)

    async def before(self) -> web.Response | None:
        """Applies latency, then the next queued failure, if any."""
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._failures:
            f = self._failures.pop(0)
            if isinstance(f.body, (dict, list)):
                return web.json_response(f.body, status=f.status, headers=f.headers)
            return web.Response(status=f.status, text=str(f.body), headers=f.headers)
        return None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> "FakeServer":
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "FakeServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def serve_forever(fake: FakeServer) -> None:
    """`python -m tests.fakes.<name> --port N`: run standalone (crash tests, benchmarks)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    fake.delay = args.delay

    async def main() -> None:
        await fake.start(args.port)
        print(fake.port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
