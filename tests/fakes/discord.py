"""A fake Discord channel webhook: 204 (200 with ?wait=true), JSON errors, 429 with
`retry_after` seconds and X-RateLimit-* headers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, serve_forever

WEBHOOK_ID, TOKEN = "123456789012345678", "aBcD_eFgH-ijkl.mnop"


class FakeDiscord(FakeServer):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.threads: list[str | None] = []

    @property
    def url(self) -> str:
        return f"{self.base_url}/api/webhooks/{WEBHOOK_ID}/{TOKEN}"

    def failure(self, status: int, retry_after: float | None, body: Any, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        if status == 429:
            wait = retry_after if retry_after is not None else 1.0
            body = body or {"message": "You are being rate limited.", "retry_after": wait, "global": False}
            headers.update({"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": str(wait), "X-RateLimit-Bucket": "abcd"})
            return super().failure(status, None, body, headers)
        defaults = {400: {"message": "Cannot send an empty message", "code": 50006}, 404: {"message": "Unknown Webhook", "code": 10015}}
        return super().failure(status, retry_after, body or defaults.get(status, {"message": "error", "code": 0}), headers)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/webhooks/{id}/{token}", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        if (failure := await self.before()) is not None:
            return failure
        if request.match_info["id"] != WEBHOOK_ID or request.match_info["token"] != TOKEN:
            return web.json_response({"message": "Unknown Webhook", "code": 10015}, status=404)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"message": "Cannot send an empty message", "code": 50006}, status=400)
        if not isinstance(body, dict) or not (body.get("content") or body.get("embeds")):
            return web.json_response({"message": "Cannot send an empty message", "code": 50006}, status=400)
        self.received.append(body)
        self.threads.append(request.query.get("thread_id"))  # a thread of the channel, or None
        headers = {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset-After": "1"}
        if request.query.get("wait") == "true":
            return web.json_response({"id": str(1000 + len(self.received)), "channel_id": "555", "content": body.get("content", "")}, headers=headers)
        return web.Response(status=204, headers=headers)


if __name__ == "__main__":
    serve_forever(FakeDiscord())
