"""Run the gateway with uvicorn: `python -m ipaas.gateway` or `ipaas gateway`."""

from __future__ import annotations

import logging
import os

from ipaas.settings import Settings


class StartFailed(Exception):
    """The gateway stopped before it served; the cause is the reason."""


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT: 0 once stopped (after the drain); StartFailed if it
    could not start (a bad setting, its address taken, the application's start failing)."""
    from ipaas import lifecycle
    from ipaas.gateway.app import create_app
    from ipaas.gateway.server import GatewayServer, uvicorn_config
    from ipaas.logs import configure_logging

    configure_logging(settings.log_level)
    host, _, port = settings.http_listen.rpartition(":")
    try:
        app = create_app(settings, freeze_heap=True)
        server = GatewayServer(uvicorn_config(settings, app, host.strip("[]") or "127.0.0.1", int(port)), app, lifecycle.drain_seconds(settings.extra))
        # Read again in the application's start, inside uvicorn's lifespan, where a bad value
        # came out as uvicorn's traceback; read here it is one line like every other setting.
        lifecycle.database_wait_seconds(settings.extra)
    except (Exception, SystemExit) as exc:
        raise StartFailed("the gateway failed to start") from exc
    bind_error: list[OSError] = []

    def said_by_us(record: logging.LogRecord) -> bool:
        # Why the start failed is said in one `error:` line (ipaas.cli); uvicorn's own line
        # (its bind error, its "Application startup failed") would make two, and say less.
        if not server.started and isinstance(record.msg, OSError):
            bind_error.append(record.msg)
            return False
        return app.startup_error is None or record.getMessage() != "Application startup failed. Exiting."

    logging.getLogger("uvicorn.error").addFilter(said_by_us)
    try:
        server.run()
    except SystemExit:
        if server.should_exit:
            return 0  # stopped while starting (waiting for its database)
        if app.startup_error is not None:
            raise StartFailed("the gateway failed to start") from app.startup_error
        if bind_error:
            # asyncio's strerror repeats the address; the errno's own words do not.
            reason = os.strerror(bind_error[0].errno).lower() if bind_error[0].errno else str(bind_error[0])
            raise StartFailed("the gateway failed to start") from lifecycle.cannot_listen(settings.http_listen, "IPAAS_HTTP_LISTEN", reason)
        raise
    return 0 if server.started else 3  # uvicorn.run's exit code when start-up fails


if __name__ == "__main__":
    from ipaas.cli import main

    raise SystemExit(main(["gateway"]))  # its exit codes and one-line errors
