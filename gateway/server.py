"""The gateway's HTTP server: uvicorn, configured once for `ipaas gateway` and for tests."""

from __future__ import annotations

from typing import Any

import uvicorn

from ipaas.gateway import request_deadlines
from ipaas.settings import Settings


def uvicorn_config(settings: Settings, app: Any, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=request_deadlines.protocol(request_deadlines.head_timeout(settings.extra)),
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
