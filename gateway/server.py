"""The gateway's HTTP server: uvicorn, configured once for `ipaas gateway` and for tests."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from ipaas.gateway import request_deadlines
from ipaas.gateway.app import MAX_HEADER_BYTES
from ipaas.lifecycle import insists
from ipaas.settings import Settings

log = logging.getLogger("ipaas.gateway")


def uvicorn_config(settings: Settings, app: Any, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=request_deadlines.protocol(
            request_deadlines.head_timeout(settings.extra),
            max_head=MAX_HEADER_BYTES + request_deadlines.REQUEST_LINE_BYTES,
            connections=request_deadlines.max_connections(settings.extra),
        ),
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


class GatewayServer(uvicorn.Server):
    """uvicorn with a drain before it stops. On SIGTERM (or SIGINT) the gateway reports
    itself not ready (/health/ready 503) and keeps serving for `drain` seconds, so a load
    balancer takes it out before its listener closes; then uvicorn's graceful shutdown. A
    second signal ends the drain and stops without waiting for open connections. The
    signal is handled, not raised again when uvicorn returns (as uvicorn does), so a stop
    asked for exits 0."""

    def __init__(self, config: uvicorn.Config, gateway: Any, drain: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain = drain
        self.drain_until: float | None = None
        self.first_signal_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.drain_until is not None and not insists(self.first_signal_at, now):
            return  # the same stop request, delivered twice
        if self.drain_until is not None or not self.started:
            # A second signal, or one before the gateway served: stop now.
            self.force_exit = self.drain_until is not None
            self.should_exit = True
            self.gateway.stop_requested()
            return
        self.first_signal_at = now
        self.drain_until = now + self.drain
        self.gateway.stop_requested()
        log.info("gateway.draining", extra={"signal": signal.Signals(sig).name, "drain_seconds": self.drain})

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            self.should_exit = True
        return await super().on_tick(counter)
