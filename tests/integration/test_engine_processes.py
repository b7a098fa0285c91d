"""Deliveries in engine processes (IPAAS_ENGINE_PROCESSES): real children of a real core,
on SQLite and PostgreSQL. The children share the outbox through leases, are woken through a
pipe rather than polling, report breakers and load to the core, are restarted when they die
and do not outlive the core."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from ipaas.v1 import breakers_pb2, breakers_pb2_grpc, credentials_pb2, executions_pb2, tenants_pb2, tenants_pb2_grpc
from tests.conftest import ADMIN_KEY, bearer, core_with, free_port
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step
from tests.integration.test_crash_and_scale import start_core, wait_serving

CHILDREN = 2
WORKERS = 4
SETTINGS = {
    "IPAAS_ENGINE_PROCESSES": str(CHILDREN),
    "IPAAS_WORKERS": str(WORKERS),
    # A poll interval far longer than the test: work is found because the core wakes them.
    "IPAAS_POLL_INTERVAL": "30",
    "IPAAS_RETRY_BASE_DELAY": "0.05",
    "IPAAS_BREAKER_FAILURES": "2",
    "IPAAS_BREAKER_RECOVERY_SECONDS": "60",
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def env(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    async with FakeSlack(delay=0.005) as slack, core_with(tmp_path, url, **SETTINGS) as core:
        tenant = await core.new_tenant()
        api = Api(core.channel, tenant.md)
        await until(lambda: len(core.server.processes.pids()) == CHILDREN and all(c.status for c in core.server.processes._children.values()), "children report")
        yield core, api, slack


async def until(check, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def test_children_share_the_work_exactly_once(env) -> None:
    core, api, slack = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "p", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "job {{n}}")]})).workflow
    total = 120
    await asyncio.gather(*(api.run(wf.id, {"n": n}) for n in range(total)))
    await until(lambda: len(slack.received) >= total, f"{total} deliveries (woken without polling)", timeout=20)
    await asyncio.sleep(0.3)
    counts = collections.Counter(m["text"] for m in slack.received)
    assert len(counts) == total and set(counts.values()) == {1}, "every execution delivered exactly once"

    processes = core.server.processes
    await until(lambda: processes.processed == total, "children report what they processed")
    per_child = [int(c.status["processed"]) for c in processes._children.values()]
    assert all(n > 0 for n in per_child), f"both children did work: {per_child}"
    stats = await api.executions.GetQueueStats(executions_pb2.GetQueueStatsRequest(), metadata=api.md)
    assert (stats.workers, stats.depth) == (CHILDREN * WORKERS, 0)


async def test_children_run_below_their_core_priority(env) -> None:
    """Deliveries yield the CPU to the API: each child is IPAAS_ENGINE_NICE (5) nicer and,
    on Linux, scheduled as batch work, which does not preempt the API when it wakes."""
    core, api, slack = env
    own = os.getpriority(os.PRIO_PROCESS, 0)
    pids = core.server.processes.pids()
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [min(own + 5, 19)] * CHILDREN
    if hasattr(os, "SCHED_BATCH"):
        assert [os.sched_getscheduler(pid) for pid in pids] == [os.SCHED_BATCH] * CHILDREN
        # Threads started once work arrives (the SQLite writer, the database driver's)
        # inherit both: give both children work, then look at every thread.
        cred = await api.credential("slack", {"webhook_url": slack.url})
        wf = (await api.create({"name": "t", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "x")]})).workflow
        children = core.server.processes._children.values()
        for _ in range(20):
            if all(int(c.status.get("processed", 0)) for c in children):
                break
            await asyncio.gather(*(api.run(wf.id) for _ in range(10)))
            await asyncio.sleep(1.2)  # a status line a second
        for pid in pids:
            threads = os.listdir(f"/proc/{pid}/task")
            assert len(threads) > 1, f"{pid} has started its threads"
            for tid in threads:
                assert os.sched_getscheduler(int(tid)) == os.SCHED_BATCH, f"thread {tid} of {pid}"
                assert os.getpriority(os.PRIO_PROCESS, int(tid)) == min(own + 5, 19)


async def test_a_breaker_opened_in_a_child_is_listed_by_the_core(env) -> None:
    core, api, slack = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "b", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, "x")]})).workflow
    # Four failures over two children: one of them has seen at least two (the threshold).
    slack.fail_next(500, times=4)
    for _ in range(4):  # each fails, or is deferred once its child's breaker is open
        await api.run(wf.id)
    stub = breakers_pb2_grpc.BreakerServiceStub(core.channel)
    states: list[str] = []
    for _ in range(60):
        states = [b.state for b in (await stub.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=api.md)).breakers]
        if states == ["open"]:
            break
        await asyncio.sleep(0.1)
    assert states == ["open"]
    other = await core.new_tenant(name="other")
    assert not (await stub.ListBreakers(breakers_pb2.ListBreakersRequest(), metadata=other.md)).breakers, "another tenant sees none of it"


async def test_a_deleted_credential_stops_being_used_in_the_children_at_once(env) -> None:
    core, api, slack = env
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "c", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(cred, "x")]})).workflow
    # Both children run it, so both hold the row in their cache.
    runs = await asyncio.gather(*(api.run(wf.id) for _ in range(8)))
    await asyncio.gather(*(api.wait(r.execution.id) for r in runs))
    children = core.server.processes._children.values()
    await until(lambda: all(int(c.status.get("processed", 0)) > 0 for c in children), "both children ran it")
    sent = len(slack.received)
    await api.credentials.DeleteCredential(credentials_pb2.DeleteCredentialRequest(id=cred), metadata=api.md)
    done = [await api.wait((await api.run(wf.id)).execution.id) for _ in range(4)]
    assert {d.status for d in done} == {"failed"} and all("no longer exists" in d.error for d in done)
    assert len(slack.received) == sent


async def test_a_killed_child_is_restarted_and_its_work_is_done(env) -> None:
    core, api, slack = env
    slack.delay = 0.3
    cred = await api.credential("slack", {"webhook_url": slack.url})
    wf = (await api.create({"name": "k", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "job {{n}}")]})).workflow
    total = 30
    await asyncio.gather(*(api.run(wf.id, {"n": n}) for n in range(total)))
    processes = core.server.processes
    await until(lambda: processes.inflight > 0, "work in flight")
    victim = processes.pids()[0]
    os.kill(victim, signal.SIGKILL)
    await until(lambda: victim not in processes.pids() and len(processes.pids()) == CHILDREN, "a new child", timeout=20)
    slack.delay = 0.0
    # The dead child's leases are released at once, not after IPAAS_LEASE_SECONDS (60 s).
    await until(lambda: {m["text"] for m in slack.received} >= {f"job {n}" for n in range(total)}, "every job delivered", timeout=20)


async def test_children_do_not_outlive_the_core(tmp_path: Path) -> None:
    port = free_port()
    proc = start_core(tmp_path, port, engine_processes=CHILDREN)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_serving(channel)
        children: list[int] = []
        for _ in range(100):
            out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
            children = [int(p) for p in out.split()]
            if len(children) == CHILDREN:
                break
            await asyncio.sleep(0.1)
        assert len(children) == CHILDREN
        proc.send_signal(signal.SIGKILL)  # the core alone
        proc.wait(timeout=10)
        await until(lambda: not any(_alive(pid) for pid in children), "children exit once the core is gone", timeout=20)
    finally:
        await channel.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def test_a_core_restarted_beside_its_orphaned_child_runs_nothing_twice(tmp_path: Path) -> None:
    """SQLite: the core alone dies (the OOM killer) and is restarted at once, while its engine
    child still finishes what it holds: the new core must leave that child's leases alone."""
    ports = free_port(), free_port()
    cores: list[subprocess.Popen[bytes]] = []
    async with FakeSlack(delay=5) as slack:
        try:
            cores.append(start_core(tmp_path, ports[0], engine_processes=1))
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
            await wait_serving(channel)
            admin = tenants_pb2_grpc.TenantServiceStub(channel)
            tenant = (await admin.CreateTenant(tenants_pb2.CreateTenantRequest(name="orphan"), metadata=bearer(ADMIN_KEY))).tenant
            key = (await admin.CreateApiKey(tenants_pb2.CreateApiKeyRequest(tenant_id=tenant.id), metadata=bearer(ADMIN_KEY))).secret
            api = Api(channel, bearer(key))
            cred = await api.credential("slack", {"webhook_url": slack.url})
            wf = (await api.create({"name": "o", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "job {{n}}")]})).workflow
            for n in range(4):
                await api.run(wf.id, {"n": n})
            await until(lambda: slack.requests >= 4, "all four in flight in the child")
            orphan = _children(cores[0].pid)[0]
            cores[0].send_signal(signal.SIGKILL)  # the core alone: its child finishes its work
            cores[0].wait(timeout=10)
            await channel.close()
            slack.delay = 0.1

            cores.append(start_core(tmp_path, ports[1], engine_processes=1))
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}")
            await wait_serving(channel)
            # The core spawns its child after its start-up lease recovery.
            await until(lambda: bool(_children(cores[1].pid)), "the new core's child")
            assert _alive(orphan), "the new core started while the orphan still held its work"
            api = Api(channel, bearer(key))
            await api.run(wf.id, {"n": "after"})  # the new core delivers meanwhile
            await until(lambda: not _alive(orphan), "the orphan exits once its work is done", timeout=20)
            await until(lambda: {m["text"] for m in slack.received} >= {"job 0", "job 1", "job 2", "job 3", "job after"}, "every job delivered")
            counts = collections.Counter(m["text"] for m in slack.received)
            assert set(counts.values()) == {1}, f"delivered twice: {sorted(t for t, c in counts.items() if c > 1)}"
        finally:
            await channel.close()
            for proc in cores:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its session: the core and its children
                proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_an_over_long_status_line_is_skipped_and_the_next_one_read(tmp_path) -> None:
    # A line over MAX_STATUS_LINE ended the core's reader for good: the child's load and
    # breakers stayed as last read for the child's life (an open breaker that had closed
    # still listed open) and the child's next report met a closed pipe.
    import orjson

    from ipaas.engine.processes import MAX_STATUS_LINE, EngineProcesses, _Child
    from ipaas.settings import Settings

    class _Proc:
        pid = 4242

    processes = EngineProcesses(Settings(), db=None, count=1, workers_each=1)  # type: ignore[arg-type]
    child = _Child(_Proc(), -1)  # type: ignore[arg-type]
    read_fd, write_fd = os.pipe()
    reader = asyncio.create_task(processes._read_status(child, read_fd))
    loop = asyncio.get_running_loop()
    writer = os.fdopen(write_fd, "wb", 0)
    try:
        opened = {"owner": "A", "inflight": 7, "breakers": [["tn_x", "slack", "open", 5, 0, None, None]]}
        await loop.run_in_executor(None, writer.write, orjson.dumps(opened) + b"\n")
        await until(lambda: child.status == opened, "the first report")
        huge = orjson.dumps({"owner": "A", "pad": "x" * (MAX_STATUS_LINE + 1024)}) + b"\n"
        closed = {"owner": "A", "inflight": 0, "breakers": []}
        await asyncio.wait_for(loop.run_in_executor(None, writer.write, huge + orjson.dumps(closed) + b"\n"), 10)
        await until(lambda: child.status == closed, "the report after the over-long line", timeout=5)
        assert not reader.done()
    finally:
        writer.close()
        await asyncio.wait_for(reader, 5)
