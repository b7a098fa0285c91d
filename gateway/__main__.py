"""Run the gateway with uvicorn: `python -m ipaas.gateway` or `ipaas gateway`."""

from __future__ import annotations

import os

import uvicorn

from ipaas.settings import Settings


def run(settings: Settings) -> int:
    from ipaas.gateway.app import create_app
    from ipaas.gateway.server import uvicorn_config
    from ipaas.logs import configure_logging

    configure_logging(settings.log_level)
    host, _, port = settings.http_listen.rpartition(":")
    server = uvicorn.Server(uvicorn_config(settings, create_app(settings, freeze_heap=True), host.strip("[]") or "127.0.0.1", int(port)))
    server.run()
    return 0 if server.started else 3  # uvicorn.run's exit code when start-up fails


if __name__ == "__main__":
    raise SystemExit(run(Settings.from_env(os.environ)))
