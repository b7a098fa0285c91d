"""Shared fixtures: real databases (SQLite always; PostgreSQL when IPAAS_TEST_POSTGRES_URL is
set) and a real grpc.aio core on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc
import pytest

from ipaas.settings import Settings
from ipaas.storage import migrate
from ipaas.storage.db import Database
from ipaas.v1 import tenants_pb2, tenants_pb2_grpc

POSTGRES_URL = os.environ.get("IPAAS_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("IPAAS_TEST_REDIS_URL")
ADMIN_KEY = "ipk_admin_test_" + "x" * 32


def free_port() -> int:
    """A free loopback port, for servers a test starts as separate processes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_service(url: str | None, name: str, variable: str) -> str:
    """Skip where the service is not configured (a laptop); in CI a missing service is an error."""
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"{variable} must be set in CI: {name} tests may not be skipped there")
    pytest.skip(f"{variable} is not set: start {name} and export it to run this test")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(require_service(POSTGRES_URL, "PostgreSQL", "IPAAS_TEST_POSTGRES_URL"))
    name = f"ipaas_test_{uuid.uuid4().hex[:12]}"
    admin_dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    return require_service(REDIS_URL, "Redis", "IPAAS_TEST_REDIS_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ipaas.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database on each backend, for tests of the storage layer itself."""
    migrate.upgrade(database_url)
    database = Database(database_url)
    yield database
    await database.dispose()


def make_settings(tmp_path: Path, database_url: str | None = None, **env: str) -> Settings:
    values = {
        "IPAAS_DATA_DIR": str(tmp_path / "data"),
        "IPAAS_DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'ipaas.db'}",
        "IPAAS_GRPC_LISTEN": "127.0.0.1:0",
        "IPAAS_ADMIN_KEY": ADMIN_KEY,
        "IPAAS_ALLOW_INSECURE_TARGETS": "1",
        # In process, so tests can look at the dispatcher and breakers; engine processes
        # have tests of their own (test_engine_processes.py).
        "IPAAS_ENGINE_PROCESSES": "0",
        # The core limits tenants' calls by tier (free: 10 per 2 s), which most tests spend
        # in their set-up; tests of the limit turn it on (test_tenant_limits.py). A gateway
        # from gateway_for has its own settings, and limits as it always did.
        "IPAAS_RATE_LIMITS_OFF": "1",
        **env,
    }
    return Settings.from_env(values)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class TenantHandle:
    tenant_id: str
    key: str
    key_id: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.key)


@dataclass
class RunningCore:
    server: object
    target: str
    channel: grpc.aio.Channel

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return bearer(ADMIN_KEY)

    async def new_tenant(self, tier: str = "free", name: str = "acme") -> TenantHandle:
        stub = tenants_pb2_grpc.TenantServiceStub(self.channel)
        tenant = (await stub.CreateTenant(tenants_pb2.CreateTenantRequest(name=name, tier=tier), metadata=self.admin)).tenant
        key = await stub.CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant_id=tenant.id, name="test"), metadata=self.admin)
        return TenantHandle(tenant.id, key.secret, key.api_key.id)


async def start_core(settings: Settings) -> AsyncIterator[RunningCore]:
    from ipaas.service.server import CoreServer

    server = CoreServer(settings)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield RunningCore(server=server, target=target, channel=channel)
    finally:
        await channel.close()
        await server.stop(grace=1)


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[RunningCore]:
    """A real core on SQLite."""
    async for running in start_core(make_settings(tmp_path)):
        yield running


@pytest.fixture
async def any_core(tmp_path: Path, database_url: str) -> AsyncIterator[RunningCore]:
    """A real core on each backend (SQLite, and PostgreSQL when configured)."""
    async for running in start_core(make_settings(tmp_path, database_url)):
        yield running


@contextlib.asynccontextmanager
async def core_with(tmp_path: Path, database_url: str | None = None, **env: str) -> AsyncIterator[RunningCore]:
    """A real core with extra IPAAS_* settings, e.g. fast retries for engine tests."""
    async for running in start_core(make_settings(tmp_path, database_url, **env)):
        yield running


@contextlib.asynccontextmanager
async def gateway_for(core_target: str, tmp_path: Path, **env: str) -> AsyncIterator[str]:
    """A real gateway (uvicorn on a free loopback port) in front of a core; yields its URL."""
    import asyncio

    import uvicorn

    from ipaas.gateway.app import create_app
    from ipaas.gateway.server import uvicorn_config

    settings = Settings.from_env(
        {
            "IPAAS_DATA_DIR": str(tmp_path / "gw"),
            "IPAAS_DATABASE_URL": env.pop("IPAAS_DATABASE_URL", f"sqlite:///{tmp_path / 'gateway.db'}"),
            "IPAAS_CORE_TARGET": core_target,
            **env,
        }
    )
    server = uvicorn.Server(uvicorn_config(settings, create_app(settings), "127.0.0.1", 0))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
