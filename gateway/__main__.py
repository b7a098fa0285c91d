"""Run the gateway with uvicorn: `python -m ipaas.gateway` or `ipaas gateway`."""

from __future__ import annotations

import logging

from ipaas.settings import Settings


class StartFailed(Exception):
    """The gateway stopped before it served; the cause is the reason."""


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT: 0 once stopped (after the drain), 3 if it could not
    start (port in use: uvicorn has said why); StartFailed for a bad setting or from the
    application's start."""
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
    # Why the start failed is said in one `error:` line (ipaas.cli); uvicorn's own line
    # after it would say less, and make two.
    logging.getLogger("uvicorn.error").addFilter(lambda record: app.startup_error is None or record.getMessage() != "Application startup failed. Exiting.")
    try:
        server.run()
    except SystemExit:
        if server.should_exit:
            return 0  # stopped while starting (waiting for its database)
        if app.startup_error is not None:
            raise StartFailed("the gateway failed to start") from app.startup_error
        raise
    return 0 if server.started else 3  # uvicorn.run's exit code when start-up fails


if __name__ == "__main__":
    from ipaas.cli import main

    raise SystemExit(main(["gateway"]))  # its exit codes and one-line errors
