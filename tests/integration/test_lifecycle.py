"""Starting and stopping `ipaas core` and `ipaas gateway` as an orchestrator does: SIGTERM
drains (not ready, still serving) and exits 0; a second signal stops at once; a database
that is down (not up yet, partitioned) neither holds a stop nor fails a start at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from ipaas.v1 import tenants_pb2, tenants_pb2_grpc
from tests.conftest import free_port
from ipaas.lifecycle import REPEATED_WITHIN
from tests.fakes.tcp_proxy import TcpProxy


class Platform:
    """`ipaas core` and `ipaas gateway` as processes of their own, on free ports."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IPAAS_")}
        self.env.update(
            IPAAS_DATA_DIR=str(tmp_path / "data"),
            IPAAS_GRPC_LISTEN=f"127.0.0.1:{self.grpc_port}",
            IPAAS_CORE_TARGET=f"127.0.0.1:{self.grpc_port}",
            IPAAS_HTTP_LISTEN=f"127.0.0.1:{self.http_port}",
            IPAAS_ENGINE_PROCESSES="0",
            IPAAS_ADMIN_KEY="ipk_admin_" + "x" * 32,
            **env,
        )
        self.logs = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, command: str, own_group: bool = False, **env: str) -> subprocess.Popen[bytes]:
        """own_group: in a process group of its own, which a test may signal as a terminal's
        Ctrl-C or systemd's stop signals every process of a unit."""
        out = open(self.logs / f"{command}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "ipaas", command], env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=own_group)
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.logs / f"{proc.args[-1]}-{self.procs.index(proc)}.log").read_text()

    async def health(self) -> int | str:
        """The core's gRPC health: SERVING / NOT_SERVING, or the status code of the failed call."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError as err:
                return err.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def ready(self) -> int | str:
        async with httpx.AsyncClient(timeout=2) as http:
            try:
                return (await http.get(self.url + "/health/ready")).status_code
            except httpx.HTTPError as err:
                return type(err).__name__

    async def wait_for(self, probe, want, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while (got := await probe()) != want:
            assert time.monotonic() < deadline, f"{probe.__name__} is {got}, not {want}"
            await asyncio.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The process's exit code, or None if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


async def watch(probe, seconds: float) -> list[int | str]:  # type: ignore[no-untyped-def]
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(await probe())
        await asyncio.sleep(0.1)
    return seen


@pytest.fixture
def platform(tmp_path: Path):  # type: ignore[no-untyped-def]
    running = Platform(tmp_path)
    try:
        yield running
    finally:
        running.close()


async def test_gateway_on_sigterm_answers_not_ready_while_draining_then_exits_0(platform: Platform) -> None:
    platform.spawn("core", IPAAS_SHUTDOWN_DRAIN_SECONDS="0")
    gateway = platform.spawn("gateway", IPAAS_SHUTDOWN_DRAIN_SECONDS="2")
    await platform.wait_for(platform.ready, 200)

    gateway.send_signal(signal.SIGTERM)
    during = await watch(platform.ready, 1.5)
    assert set(during) == {503}, f"/health/ready during the drain: {during}"

    assert await exit_code(gateway, 20) == 0, platform.output(gateway)[-2000:]
    assert await platform.ready() == "ConnectError"


@pytest.mark.parametrize("name", ["core", "gateway"])
async def test_a_stop_signal_delivered_twice_at_once_still_drains(platform: Platform, name: str) -> None:
    """Ctrl-C reaches `ipaas serve` and its children alike, and serve passes it on; systemd
    signals every process of the unit: the child got two signals at once and stopped at once
    (exit 1, nothing drained). Signals within REPEATED_WITHIN are one stop request."""
    if name == "gateway":
        platform.spawn("core", IPAAS_SHUTDOWN_DRAIN_SECONDS="0")
    proc = platform.spawn(name, IPAAS_SHUTDOWN_DRAIN_SECONDS="2")
    await platform.wait_for(platform.ready if name == "gateway" else platform.health, 200 if name == "gateway" else "SERVING")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    during = await watch(platform.ready if name == "gateway" else platform.health, 1.0)
    assert set(during) == ({503} if name == "gateway" else {"NOT_SERVING"}), during
    assert await exit_code(proc, 20) == 0, platform.output(proc)[-2000:]
    assert "stopped at once" not in platform.output(proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_whole_group_stops_engine_processes_with_their_core(platform: Platform, sig: signal.Signals) -> None:
    """Ctrl-C reaches every process of the terminal's group, and systemd's default stop every
    process of the unit. The engine processes stopped at once while their core drained; the
    core logged each as exited (an error) and started them again, to stop them a second time.
    A core's engines stop when their core stops them."""
    core = platform.spawn("core", own_group=True, IPAAS_ENGINE_PROCESSES="2", IPAAS_SHUTDOWN_DRAIN_SECONDS="2")
    await platform.wait_for(platform.health, "SERVING")
    for _ in range(100):
        if platform.output(core).count('"event":"engine.started"') == 2:
            break
        await asyncio.sleep(0.1)
    os.killpg(core.pid, sig)
    assert await exit_code(core, 30) == 0, platform.output(core)[-3000:]
    output = platform.output(core)
    assert '"event":"engine.process_exited"' not in output, output[-3000:]
    assert output.count('"event":"engine.process_started"') == 2, "no engine was started again"
    assert output.count('"event":"dispatcher.stopped"') == 2, "each engine stopped once, with its core"


async def test_core_on_sigterm_reports_not_serving_while_draining_then_exits_0(platform: Platform) -> None:
    core = platform.spawn("core", IPAAS_SHUTDOWN_DRAIN_SECONDS="2")
    await platform.wait_for(platform.health, "SERVING")

    core.send_signal(signal.SIGTERM)
    during = await watch(platform.health, 1.5)
    assert set(during) == {"NOT_SERVING"}, f"gRPC health during the drain: {during}"

    assert await exit_code(core, 20) == 0, platform.output(core)[-2000:]
    assert await platform.health() == "UNAVAILABLE"


def said(output: str) -> list[str]:
    """What a server told the operator, without log lines (ours are JSON)."""
    return [line for line in output.splitlines() if line.strip() and not line.startswith("{")]


def through(proxy: TcpProxy, database_url: str) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@pytest.mark.postgres
@pytest.mark.parametrize("server", ["core", "gateway"])
async def test_a_database_not_up_yet_is_waited_for(platform: Platform, postgres_url: str, server: str) -> None:
    proxy = TcpProxy(make_url(postgres_url).port or 5432)  # nothing listens yet: the server is booting
    database = {"IPAAS_DATABASE_URL": through(proxy, postgres_url)}
    if server == "gateway":
        platform.spawn("core", IPAAS_DATABASE_URL=postgres_url)
    proc = platform.spawn(server, **database)
    await asyncio.sleep(3)
    assert proc.poll() is None, platform.output(proc)[-2000:]
    await proxy.start()
    try:
        await platform.wait_for(platform.health if server == "core" else platform.ready, "SERVING" if server == "core" else 200)
        assert '"event":"database.unavailable"' in platform.output(proc)
        assert "Traceback" not in platform.output(proc)
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc, 30) == 0, platform.output(proc)[-2000:]
    finally:
        await proxy.close()


@pytest.mark.postgres
@pytest.mark.parametrize("server", ["core", "gateway"])
async def test_a_database_that_stays_down_fails_the_start_in_one_line(platform: Platform, postgres_url: str, server: str) -> None:
    down = make_url(postgres_url).set(host="127.0.0.1", port=free_port()).render_as_string(hide_password=False)
    proc = platform.spawn(server, IPAAS_DATABASE_URL=down, IPAAS_STARTUP_DB_WAIT_SECONDS="2")
    assert await exit_code(proc, 30) == 3, platform.output(proc)[-2000:]
    (line,) = said(platform.output(proc))
    assert line.startswith("error: cannot connect to the database") and "IPAAS_DATABASE_URL" in line, line
    assert platform.output(proc).count('"event":"database.unavailable"') >= 2


@contextlib.asynccontextmanager
async def partitioned_while_busy(platform: Platform, postgres_url: str, **env: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A core whose database stops answering (a dropped network, not a refused connection)
    while a call that reads it is in flight."""
    proxy = await TcpProxy(make_url(postgres_url).port or 5432).start()
    core = platform.spawn("core", IPAAS_DATABASE_URL=through(proxy, postgres_url), IPAAS_SHUTDOWN_DRAIN_SECONDS="0", **env)
    try:
        await platform.wait_for(platform.health, "SERVING")
        proxy.partition()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
            stub = tenants_pb2_grpc.TenantServiceStub(channel)
            call = asyncio.ensure_future(stub.ListTenants(tenants_pb2.ListTenantsRequest(), metadata=[("authorization", "Bearer " + platform.env["IPAAS_ADMIN_KEY"])]))
            await asyncio.sleep(1)
            assert not call.done()
            yield core
            call.cancel()
    finally:
        await proxy.close()


@pytest.mark.postgres
async def test_sigterm_stops_a_core_whose_database_is_partitioned(platform: Platform, postgres_url: str) -> None:
    """Each step of the stop has a time limit, so a dead database cannot hold it for ever."""
    async with partitioned_while_busy(platform, postgres_url, IPAAS_ENGINE_PROCESSES="1") as core:
        core.send_signal(signal.SIGTERM)
        # The stop's steps take at most grace + 6 s (16 s); the watchdog ends the process at
        # 26 s if something outside them still holds it (exit 1, "still stopping"), which on a
        # loaded machine it sometimes had to: what held it is not known yet. Before the
        # limits, the audit killed a core still running 68 s after SIGTERM.
        assert await exit_code(core, 45) in (0, 1), "still running 45 s after SIGTERM"


@pytest.mark.postgres
async def test_a_second_signal_stops_the_core_at_once(platform: Platform, postgres_url: str) -> None:
    async with partitioned_while_busy(platform, postgres_url) as core:
        core.send_signal(signal.SIGTERM)
        await asyncio.sleep(REPEATED_WITHIN + 0.5)  # sooner, it would be the same request twice
        core.send_signal(signal.SIGINT)
        assert await exit_code(core, 3) == 1, platform.output(core)[-2000:]
    assert said(platform.output(core)) == ["error: SIGINT again while stopping: stopped at once"]
