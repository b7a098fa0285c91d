"""Run the gateway with uvicorn: `python -m ipaas.gateway` or `ipaas gateway`."""

from __future__ import annotations

import os

import uvicorn

from ipaas.settings import Settings


def run(settings: Settings) -> int:
    from ipaas.gateway.app import create_app
    from ipaas.logs import configure_logging

    configure_logging(settings.log_level)
    host, _, port = settings.http_listen.rpartition(":")
    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run(Settings.from_env(os.environ)))
