"""The REST gateway's ASGI application (health probes for now; transcoding lands with issue 6)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ipaas.settings import Settings


async def live(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "alive"})


def create_app(settings: Settings) -> Starlette:
    return Starlette(routes=[Route("/health/live", live)])
