"""Assembles the core: storage, plugins, servicers, health and reflection on one grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ipaas import auth, crypto
from ipaas.lifecycle import bounded, cannot_listen, database_wait_seconds, wait_for_database
from ipaas.ratelimit import RateLimiter, parse_tiers
from ipaas.settings import HTTP_TRANSPORTS, Settings, boolean, choice, flag, seconds, whole_number
from ipaas.storage import migrate
from ipaas.storage.core_lock import CoreLock
from ipaas.storage.db import Database, ensure_sqlite_dir
from ipaas.tenants import TenantStore
from ipaas.v1 import (
    breakers_pb2,
    breakers_pb2_grpc,
    connectors_pb2,
    connectors_pb2_grpc,
    credentials_pb2,
    credentials_pb2_grpc,
    executions_pb2,
    executions_pb2_grpc,
    tenants_pb2,
    tenants_pb2_grpc,
    workflows_pb2,
    workflows_pb2_grpc,
)
from ipaas.service.interceptors import CoreInterceptor
from ipaas.service.tenants import TenantServicer
from ipaas.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("ipaas.core")

# Seconds each step of a stop may take beyond the grace period it is given (a step with
# none: stopping the scheduler, closing the database's connections).
STOP_STEP_SECONDS = 3.0


def stop_seconds(grace: float) -> float:
    """The most CoreServer.stop(grace) takes, every step together (a step that runs out of
    it still gets half a second)."""
    return grace + 2 * STOP_STEP_SECONDS

SERVICES = [
    tenants_pb2.DESCRIPTOR.services_by_name["TenantService"],
    workflows_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    executions_pb2.DESCRIPTOR.services_by_name["ExecutionService"],
    connectors_pb2.DESCRIPTOR.services_by_name["ConnectorService"],
    credentials_pb2.DESCRIPTOR.services_by_name["CredentialService"],
    breakers_pb2.DESCRIPTOR.services_by_name["BreakerService"],
]

# A client holds one HTTP/2 connection for as long as it can, so a gateway that resolved
# the core's name (a headless service) when it started would never call a replica added
# later. Closing each connection gracefully at this age makes clients connect again, and
# resolve again; calls in flight get the grace, longer than the gateway's 30 s timeout.
DEFAULT_MAX_CONNECTION_AGE = 300.0
CONNECTION_AGE_GRACE_MS = 35_000


# gRPC takes the age as a C int of milliseconds; inf stopped start-up with an OverflowError.
MAX_CONNECTION_AGE = (2**31 - 1) // 1000


def connection_age_options(value: str | None) -> list[tuple[str, int]]:
    """gRPC server options for IPAAS_GRPC_MAX_CONNECTION_AGE (seconds; 0: never)."""
    try:
        seconds = DEFAULT_MAX_CONNECTION_AGE if value is None or not value.strip() else float(value)
    except ValueError:
        raise SystemExit(f"IPAAS_GRPC_MAX_CONNECTION_AGE must be a number of seconds, got {value!r}") from None
    if not 0 <= seconds <= MAX_CONNECTION_AGE:  # also false for nan
        raise SystemExit(f"IPAAS_GRPC_MAX_CONNECTION_AGE must be 0 (never) or a number of seconds up to {MAX_CONNECTION_AGE}, got {value!r}")
    if seconds == 0:
        return []
    return [("grpc.max_connection_age_ms", max(1, int(seconds * 1000))), ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS)]


def add_port(server: grpc.aio.Server, address: str) -> int:
    """server.add_insecure_port, a failure raised as CannotListen. gRPC's C core writes its
    own line about a failed bind straight to stderr before it raises; the operator was
    promised one `error:` line. So the address is first bound by a plain socket, as gRPC
    binds it (SO_REUSEADDR, no SO_REUSEPORT: see the server's options): a taken or foreign
    address is refused before gRPC tries it. (Pointing fd 2 elsewhere while gRPC bound lost
    what other threads wrote meanwhile.)"""
    if (problem := _cannot_bind(address)) is not None:
        raise cannot_listen(address, "IPAAS_GRPC_LISTEN", problem)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address": the reason is in its log line
        port = 0
    if not port:
        raise cannot_listen(address, "IPAAS_GRPC_LISTEN", "the address is in use or not available here")
    return port


def _cannot_bind(address: str) -> str | None:
    """Why a listener cannot bind `address` (host:port, [v6]:port), or None when it can or
    this cannot tell (a port gRPC picks, a name that does not resolve: gRPC says why)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                return (exc.strerror or str(exc)).lower()  # as the gateway's line says it: "address already in use"
    return None


@dataclass(frozen=True)
class EngineSettings:
    """Engine knobs read from IPAAS_* variables (see README)."""

    workers: int
    max_queue_depth: int
    max_tenant_queue_depth: int
    step_timeout: float
    execution_deadline: float
    base_delay: float
    poll_interval: float
    scheduler_interval: float
    catch_up: str
    breaker_failures: int
    breaker_recovery: float
    breaker_successes: int
    lease_seconds: float
    processes: int
    nice: int
    sched_batch: bool
    loop: str = "uvloop"
    http_transport: str = "aiohttp"

    @classmethod
    def from_settings(cls, settings: Settings) -> "EngineSettings":
        """Every engine setting, each checked: a value out of range stops start-up with one
        line rather than running a broken platform (workers below 0 never claimed a task, a
        poll interval of 0 spun a CPU, a queue depth below 0 refused every trigger)."""
        env = settings.extra
        # Read here though CoreServer.start reads it too, so a typo stops start-up with the rest.
        boolean(env, "IPAAS_DISABLE_ENGINE", False)
        max_depth = whole_number(env, "IPAAS_MAX_QUEUE_DEPTH", 100_000)
        return cls(
            workers=settings.workers,
            # 0 refuses every trigger (429), as a full queue does.
            max_queue_depth=max_depth,
            # Half by default: one tenant can never fill the queue, so the others always
            # have half of it. A single-tenant install sets it to IPAAS_MAX_QUEUE_DEPTH (at
            # or above which there is no share).
            max_tenant_queue_depth=whole_number(env, "IPAAS_MAX_TENANT_QUEUE_DEPTH", (max_depth + 1) // 2),
            step_timeout=seconds(env, "IPAAS_STEP_TIMEOUT", 30),
            execution_deadline=seconds(env, "IPAAS_EXECUTION_DEADLINE", 900),
            base_delay=seconds(env, "IPAAS_RETRY_BASE_DELAY", 1.0),
            poll_interval=seconds(env, "IPAAS_POLL_INTERVAL", 1.0),
            scheduler_interval=seconds(env, "IPAAS_SCHEDULER_INTERVAL", 1.0),
            catch_up=choice(env, "IPAAS_SCHEDULE_CATCH_UP", ("collapse", "skip"), "collapse"),
            breaker_failures=whole_number(env, "IPAAS_BREAKER_FAILURES", 5, minimum=1),
            breaker_recovery=seconds(env, "IPAAS_BREAKER_RECOVERY_SECONDS", 60),
            breaker_successes=whole_number(env, "IPAAS_BREAKER_SUCCESSES", 3, minimum=1),
            lease_seconds=seconds(env, "IPAAS_LEASE_SECONDS", 60),
            processes=whole_number(env, "IPAAS_ENGINE_PROCESSES", default_engine_processes(), maximum=MAX_ENGINE_PROCESSES),
            nice=whole_number(env, "IPAAS_ENGINE_NICE", DEFAULT_ENGINE_NICE, maximum=19),
            sched_batch=boolean(env, "IPAAS_ENGINE_SCHED_BATCH", True),
            loop=choice(env, "IPAAS_ENGINE_LOOP", ("uvloop", "asyncio"), "uvloop"),
            http_transport=choice(env, "IPAAS_HTTP_TRANSPORT", HTTP_TRANSPORTS, "aiohttp"),
        )


# Past this many engine processes a value is a typo: each is a Python process with its own
# database connections, and more than 4 writers to one SQLite file mostly wait anyway.
MAX_ENGINE_PROCESSES = 64


# Engine processes yield the CPU to the core and gateway when they all want it, so accepting
# a webhook (a durable commit, then 202) is not queued behind deliveries, which catch up from
# the outbox. How far they yield is a trade: bench, 2 cores, platforms started alternately,
# webhooks at a steady 1,000/s and wrk at saturation (2026-11-30):
#   nice 10:          end-to-end p99 98-258 ms, ingest p99 28-35 ms, saturation 3,300-3,770/s
#   nice 5 + batch:   end-to-end p99 39-82 ms,  ingest p99 21-31 ms, saturation 2,770-3,290/s
#   nice 0 + batch:   end-to-end p99 28-46 ms,  ingest p99 21-33 ms, saturation 2,200-2,760/s
# The default keeps ~0.9 of the accepting capacity under a burst and cuts the delivery tail
# of a steady load 3-4x (a slower full-suite run: p99 647 -> 147 ms; nice 0: 54 ms).
# SCHED_BATCH (Linux) stops an engine that wakes from preempting the API's processes,
# without starving it as a higher nice does.
DEFAULT_ENGINE_NICE = 5


def default_engine_processes() -> int:
    # One process runs Python on one core at a time: with deliveries in children the API and
    # the deliveries use the other cores (bench: ~1.5x end to end on 2 cores with 2).
    # More than 4 writers to one SQLite file mostly wait for each other.
    cpus = os.cpu_count() or 1
    return 0 if cpus < 2 or os.name != "posix" else min(cpus, 4)


def rate_limiter(settings: Settings, key_prefix: str = "ipaas-rl-core") -> RateLimiter | None:
    """The tier rate limits of tenants' gRPC calls (docs/operating.md), with the gateway's
    settings; in Redis under a prefix of their own, apart from the gateway's budget. The
    scheduler's fires get one of their own too (SCHEDULE_BUDGET)."""
    env = settings.extra
    tiers = parse_tiers(env)  # read even when off, so a typo stops start-up
    if boolean(env, "IPAAS_RATE_LIMITS_OFF", False):
        return None
    unlimited = frozenset(t.strip() for t in env.get("IPAAS_RATE_UNLIMITED_TENANTS", "").split(",") if t.strip())
    return RateLimiter(tiers, settings.redis_url, unlimited, key_prefix=key_prefix)


# Scheduled fires are charged at the tenant's tier rate in a budget apart from its API calls':
# a tenant's schedules cannot get its calls refused, nor its calls its schedules, and each
# entry point is held to the tier rate (the gateway's, the core's and this one).
SCHEDULE_BUDGET = "ipaas-rl-sched"


@dataclass
class EngineParts:
    registry: Any
    credentials: Any
    workflows: Any
    breakers: Any
    steps: Any
    dispatcher: Any


def build_engine(settings: Settings, engine: EngineSettings, db: Database, box: crypto.SecretBox, recover_leases: bool = True) -> EngineParts:
    """What executes workflows: plugins, stores, breakers, executor and dispatcher (the core
    and each engine process build the same)."""
    from ipaas.credentials import CredentialStore
    from ipaas.engine.breakers import BreakerPolicy, BreakerRegistry
    from ipaas.engine.dispatcher import Dispatcher
    from ipaas.engine.executor import EngineLimits, Executor
    from ipaas.engine.steps import StepRunner
    from ipaas.plugin_host import load_registry
    from ipaas.workflow_store import WorkflowStore

    registry = load_registry(settings)
    credentials = CredentialStore(db, box, registry.validate_credentials)
    workflows = WorkflowStore(db, box, registry, credentials)
    breakers = BreakerRegistry(BreakerPolicy(engine.breaker_failures, engine.breaker_recovery, engine.breaker_successes))
    steps = StepRunner(registry, credentials)
    limits = EngineLimits(step_timeout=engine.step_timeout, execution_deadline=engine.execution_deadline, base_delay=engine.base_delay)
    executor = Executor(db, workflows, credentials, steps, breakers, limits)
    dispatcher = Dispatcher(
        db, executor, workers=engine.workers, poll_interval=engine.poll_interval, lease=timedelta(seconds=engine.lease_seconds), recover_leases=recover_leases
    )
    return EngineParts(registry, credentials, workflows, breakers, steps, dispatcher)


@dataclass
class CoreServer:
    settings: Settings
    port: int = 0
    admin_key: str = ""
    admin_key_generated: bool = False
    db: Database | None = None
    registry: Any = None
    breakers: Any = None
    dispatcher: Any = None
    scheduler: Any = None
    enqueuer: Any = None
    retention: Any = None
    core_lock: Any = None
    processes: Any = None
    executions: Any = None
    metrics: Any = None  # the opt-in Prometheus listener (ipaas.metrics)
    _server: grpc.aio.Server | None = None
    _health: HealthServicer | None = None

    async def start(self) -> None:
        self.core_lock = CoreLock(self.settings.database_url)
        ensure_sqlite_dir(self.settings.database_url)
        self.core_lock.acquire()
        try:
            await self._start()
        except BaseException:
            self.core_lock.release()  # a failed start must not keep the next one out
            raise

    async def _start(self) -> None:
        from ipaas.dryrun import DryRunner
        from ipaas.engine.enqueuer import Enqueuer
        from ipaas.engine.processes import EngineProcesses
        from ipaas.engine.retention import Retention, retention_window
        from ipaas.engine.scheduler import Scheduler
        from ipaas.execution_store import ExecutionStore
        from ipaas.service.connectors import BreakerServicer, ConnectorServicer
        from ipaas.service.credentials import CredentialServicer
        from ipaas.service.executions import ExecutionServicer
        from ipaas.service.workflows import WorkflowServicer
        from ipaas.triggers import TriggerService

        from ipaas import metrics

        s = self.settings
        engine = EngineSettings.from_settings(s)
        metrics_listen = metrics.listen(s.extra)
        keep = retention_window(s.extra)
        limiter = rate_limiter(s)  # before the database: a bad setting stops start-up at once
        schedule_limiter = rate_limiter(s, SCHEDULE_BUDGET)
        # A database still starting (the machine booting) is waited for, not a failure.
        await wait_for_database(s.database_url, database_wait_seconds(s.extra))
        await asyncio.to_thread(migrate.upgrade, s.database_url)
        self.db = db = Database(s.database_url)
        # Before the admin key: a core refused for want of the encryption key leaves no
        # generated key file behind.
        box = await crypto.load_box(s, db)
        self.admin_key, self.admin_key_generated = auth.load_admin_key(s.admin_key, s.data_dir)
        tenants = TenantStore(db, self.admin_key)
        parts = build_engine(s, engine, db, box)
        self.registry, self.breakers, self.dispatcher = parts.registry, parts.breakers, parts.dispatcher
        credentials, workflows, steps = parts.credentials, parts.workflows, parts.steps
        engine_on = not flag(s.extra.get("IPAAS_DISABLE_ENGINE"))
        if engine_on and engine.processes > 0:
            # Deliveries run in child processes; this one keeps the API and the scheduler.
            self.processes = EngineProcesses(s, db, engine.processes, workers_each=self.dispatcher.workers)
            credentials.on_deleted = self.processes.forget_credential
        work = self.processes or self.dispatcher
        self.enqueuer = Enqueuer(db, on_enqueued=work.notify, max_depth=engine.max_queue_depth, max_tenant_depth=engine.max_tenant_queue_depth)
        self.scheduler = Scheduler(db, self.enqueuer, interval=engine.scheduler_interval, catch_up=engine.catch_up, limiter=schedule_limiter)
        executions = ExecutionStore(db, on_enqueued=work.notify)
        if keep is not None:
            self.retention = Retention(db, keep)

        server = grpc.aio.server(
            interceptors=[CoreInterceptor(tenants, limiter)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                *connection_age_options(s.extra.get("IPAAS_GRPC_MAX_CONNECTION_AGE")),
            ],
        )
        tenants_pb2_grpc.add_TenantServiceServicer_to_server(TenantServicer(tenants), server)
        workflows_pb2_grpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(workflows), server)
        self.executions = ExecutionServicer(TriggerService(workflows, self.enqueuer), executions, DryRunner(workflows, steps), work)
        executions_pb2_grpc.add_ExecutionServiceServicer_to_server(self.executions, server)
        connectors_pb2_grpc.add_ConnectorServiceServicer_to_server(ConnectorServicer(self.registry), server)
        credentials_pb2_grpc.add_CredentialServiceServicer_to_server(CredentialServicer(credentials), server)
        breakers_pb2_grpc.add_BreakerServiceServicer_to_server(BreakerServicer(self.processes or self.breakers), server)

        self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [svc.full_name for svc in SERVICES]
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], server)

        self.port = add_port(server, s.grpc_listen)
        if metrics_listen:
            self.metrics = metrics.MetricsListener(self, metrics_listen)
            await self.metrics.start()
        await server.start()
        self._server = server
        if self.processes is not None:
            await self.processes.start()
        elif engine_on:
            self.dispatcher.start()
        if engine_on:
            self.scheduler.start()
            if self.retention is not None:
                self.retention.start()
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("core.started", extra={"listen": s.grpc_listen, "port": self.port, "database": db.dialect, "workers": work.workers, "engine_processes": engine.processes})

    async def drain(self, seconds: float) -> None:
        """Report NOT_SERVING and keep serving for `seconds`, so health checks and load
        balancers see it before the listener closes."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        log.info("core.draining", extra={"drain_seconds": seconds})
        await asyncio.sleep(seconds)

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: report NOT_SERVING, stop taking RPCs and claiming work, let
        in-flight executions finish within the grace period, release the rest's leases.
        Each step has a time limit, and all of them together `stop_seconds(grace)`, past
        which the stop goes on with the next step: a database that does not answer cannot
        hold the stop."""
        deadline = time.monotonic() + stop_seconds(grace)

        def within(limit: float) -> float:
            return max(min(limit, deadline - time.monotonic()), 0.5)

        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.scheduler is not None:
            await bounded("scheduler", self.scheduler.stop(), within(STOP_STEP_SECONDS))
        if self.retention is not None:
            await bounded("retention", self.retention.stop(), within(STOP_STEP_SECONDS))
        if self._server is not None:
            await bounded("grpc_server", self._server.stop(grace), within(grace + STOP_STEP_SECONDS))
        if self.processes is not None:
            await bounded("engine_processes", self.processes.stop(deadline=grace), within(grace + STOP_STEP_SECONDS))
        elif self.dispatcher is not None:
            await bounded("dispatcher", self.dispatcher.stop(deadline=grace), within(grace + STOP_STEP_SECONDS))
        if self.dispatcher is not None:  # built (for its parts) even where engine processes run
            self.dispatcher.executor.close()
        if self.executions is not None:  # after the server: no DryRun is still being answered
            self.executions.dry_runner.close()
        if self.enqueuer is not None:
            await bounded("enqueuer", self.enqueuer.close(), within(STOP_STEP_SECONDS))
        if self.metrics is not None:  # served while draining, as the probes are
            await bounded("metrics", self.metrics.stop(), within(STOP_STEP_SECONDS))
        if self.registry is not None:
            await bounded("connectors", self.registry.aclose(), within(STOP_STEP_SECONDS))
        if self.db is not None:
            await bounded("database", self.db.dispose(), within(STOP_STEP_SECONDS))
        if self.core_lock is not None:
            self.core_lock.release()
        log.info("core.stopped")

