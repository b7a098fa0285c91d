"""The ceilings, on the same server stack as the gateway (uvicorn): a bare ASGI app that
answers 202, and a bare relay that posts to the fake Slack with aiohttp and answers, with
no durability at all."""

from __future__ import annotations

import os

import aiohttp

SLACK_URL = os.environ.get("BENCH_SLACK_URL", "")


async def bare_202(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"success":true}'})


class Relay:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.session.close()  # type: ignore[union-attr]
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        async with self.session.post(SLACK_URL, data=body, headers={"content-type": "application/json"}) as response:  # type: ignore[union-attr]
            await response.read()
        await send({"type": "http.response.start", "status": 202, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"success":true}'})


relay = Relay()
