"""A fake Slack incoming webhook: 200 "ok", or Slack's error codes as plain text."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, serve_forever

SLACK_ERRORS = {400: "invalid_payload", 403: "action_prohibited", 404: "no_service", 410: "channel_is_archived", 429: "rate_limited", 500: "internal_error", 503: "service_unavailable"}
PATH = "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"


class FakeSlack(FakeServer):
    def __init__(self, delay: float = 0.0, token: str = PATH.rsplit("/", 1)[1]) -> None:
        super().__init__(delay)
        self.token = token

    @property
    def url(self) -> str:
        return f"{self.base_url}/services/T00000000/B00000000/{self.token}"

    def failure(self, status: int, retry_after: float | None, body: Any, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        return super().failure(status, retry_after, body if body is not None else SLACK_ERRORS.get(status, "error"), headers)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/services/{team}/{bot}/{token}", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        if (failure := await self.before()) is not None:
            return failure
        if request.match_info["token"] != self.token:
            return web.Response(status=404, text="no_service")
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400, text="invalid_payload")
        if not isinstance(body, dict) or not (body.get("text") or body.get("blocks")):
            return web.Response(status=400, text="no_text")
        self.received.append(body)
        return web.Response(status=200, text="ok", content_type="text/html")


if __name__ == "__main__":
    serve_forever(FakeSlack())
