"""The core's Prometheus metrics: an opt-in HTTP listener (IPAAS_CORE_METRICS_LISTEN) serving
GET /metrics beside the gRPC API, which has no HTTP of its own.

Off unless an address is given, and it listens only there: the figures are the platform's
own, and an operator decides who may read them. Values are read from the parts that keep
them when Prometheus scrapes (a collector, not counters incremented twice), so the hot path
keeps the plain integer additions it had. Labels carry statuses, connector names (the
installed plugins) and breaker states, never a tenant, workflow or execution id.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ipaas.settings import listen_address

if TYPE_CHECKING:
    from aiohttp import web

    from ipaas.service.server import CoreServer

log = logging.getLogger("ipaas.metrics")

# A scrape must not wait on a database that stopped answering: past this the backlog is the
# last one counted.
BACKLOG_TIMEOUT = 2.0
BREAKER_STATES = ("open", "half_open")


def listen(env: Mapping[str, str]) -> str:
    """IPAAS_CORE_METRICS_LISTEN: host:port, or "" (the default) for no listener. Port 0
    takes any free port (logged as core.metrics_listening, which tests read)."""
    return listen_address(env, "IPAAS_CORE_METRICS_LISTEN", "", any_port=True)


class CoreCollector(Collector):
    def __init__(self, core: CoreServer) -> None:
        self.core = core
        self.backlog = 0  # outbox tasks, counted just before each scrape

    def collect(self) -> Iterator[Any]:
        core = self.core
        finished = CounterMetricFamily("ipaas_core_executions_finished", "Executions that ended, by final status and the connector of the step they ended on (none: before any step ran).", labels=("status", "connector"))
        counts = core.processes.finished if core.processes is not None else core.dispatcher.executor.finished
        for (status, connector), count in sorted(counts.items()):
            finished.add_metric((status, connector), count)
        yield finished
        yield CounterMetricFamily("ipaas_core_webhooks_accepted", "Webhooks accepted (202), repeats of an accepted delivery included.", value=core.executions.webhooks_accepted)
        yield CounterMetricFamily("ipaas_core_schedules_fired", "Executions created by schedule fires.", value=core.scheduler.fired_total)
        yield CounterMetricFamily("ipaas_core_schedules_rate_limited", "Schedule fires held back for being over their tenant's tier rate (they keep their plans and wait for a later tick), counted once per tick that holds each back.", value=core.scheduler.rate_limited_total)
        yield GaugeMetricFamily("ipaas_core_outbox_tasks", "Outbox tasks not yet done (waiting, deferred or running), in the whole database.", value=self.backlog)
        yield GaugeMetricFamily("ipaas_core_outbox_max_tasks", "IPAAS_MAX_QUEUE_DEPTH: past this, new triggers are refused (429).", value=core.enqueuer.max_depth)
        breakers = GaugeMetricFamily("ipaas_core_breakers", "Circuit breakers (one per tenant and connector) in a state other than closed, by state and connector.", labels=("state", "connector"))
        if core.processes is not None:
            troubled = core.processes.troubled_breakers()
        else:
            troubled = [(tenant, s.connector, s.state) for tenant, s in core.breakers.report(10_000)]
        by_state = collections.Counter((state, connector) for _tenant, connector, state in troubled if state in BREAKER_STATES)
        for (state, connector), count in sorted(by_state.items()):
            breakers.add_metric((state, connector), count)
        yield breakers
        processes = core.processes
        yield GaugeMetricFamily("ipaas_core_engine_processes", "Engine processes running (0 with IPAAS_ENGINE_PROCESSES=0: deliveries run in the core).", value=processes.alive() if processes is not None else 0)
        yield GaugeMetricFamily("ipaas_core_engine_processes_wanted", "Engine processes the core keeps running (IPAAS_ENGINE_PROCESSES).", value=processes.count if processes is not None else 0)


class MetricsListener:
    def __init__(self, core: CoreServer, address: str) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.collector = CoreCollector(core)
        self.registry.register(self.collector)
        self.core = core
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)  # HEAD too; other methods 405
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        try:
            sock = socket.create_server((host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError:
            await self._runner.cleanup()
            # Worded as the gRPC listener's: create_server's own text repeats the address.
            raise SystemExit(f"cannot listen on {self.address} (IPAAS_CORE_METRICS_LISTEN): the address is in use or not available here; stop what holds it or set IPAAS_CORE_METRICS_LISTEN") from None
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        log.info("core.metrics_listening", extra={"listen": self.address, "port": self.port})

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web

        enqueuer = self.core.enqueuer
        try:
            async with asyncio.timeout(BACKLOG_TIMEOUT):
                # COUNT over the outbox, bounded by IPAAS_MAX_QUEUE_DEPTH plus the work in
                # flight (never over executions); the enqueuer runs the same once a second
                # under load.
                self.collector.backlog = await enqueuer.refresh_depth()
        except Exception as exc:  # a database outage: the last count, and the scrape still answers
            log.warning("metrics.backlog_unavailable", extra={"error": type(exc).__name__})
            self.collector.backlog = enqueuer.depth
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encode(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
