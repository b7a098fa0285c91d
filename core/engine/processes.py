"""Engine processes: deliveries in child processes, so the platform uses more than one core.

CPython runs Python code on one thread at a time per process, so in one process the gRPC
API and the deliveries share a single core. With IPAAS_ENGINE_PROCESSES=N the core starts N
children (`ipaas engine`) that only claim and execute outbox tasks; the core keeps the API
and the scheduler. The outbox is the only hand-over: children claim with leases exactly as
replicas do, so a child's crash loses nothing (its leases are released and it is restarted).

Two pipes per child:
- core → child: "w" after new work is committed (a wake-up instead of polling), "c <id>"
  after a credential is deleted (the child drops its cached row at once). End of file means
  the core is gone: the child finishes what it holds and exits, so no child outlives it.
- child → core: a JSON status line each second (its lease owner, work in flight, breakers,
  executions it finished since its last line), which the core answers GetQueueStats and
  ListBreakers from and counts in its metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any

import orjson

from ipaas import heap
from ipaas.engine import outbox
from ipaas.engine.breakers import BreakerRegistry, BreakerState
from ipaas.settings import Settings
from ipaas.storage.db import Database

log = logging.getLogger("ipaas.engine.processes")

CHILD_FDS = "IPAAS_ENGINE_CHILD_FDS"
STATUS_INTERVAL = 1.0
STOP_GRACE = 10.0
MAX_STATUS_LINE = 4 * 1024 * 1024
MAX_REPORTED_BREAKERS = 1000
_RANK = {"open": 2, "half_open": 1}
# An engine commits claims, step results and outcomes, never an acknowledged trigger (the
# core commits those with FULL). With NORMAL a power cut (not a crash) can lose its last
# commits, so an execution runs again: at least once, as after any crash mid-step. In WAL
# the core's next FULL commit syncs every earlier frame, so the loss never reaches past it.
# A commit without fsync holds the shared write lock for less time: bench, 4 alternating
# pairs, ingest 866-1006 -> 983-1202 req/s, end to end 428-574 -> 539-626 msg/s.
ENGINE_SQLITE_SYNCHRONOUS = "NORMAL"


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child the same settings as this process (which may
    have been built in code rather than read from the environment)."""
    env = {**os.environ, **settings.extra}
    env.update(
        IPAAS_DATA_DIR=str(settings.data_dir),
        IPAAS_DATABASE_URL=settings.database_url,
        IPAAS_SECRET_KEYS=",".join(settings.secret_keys),
        IPAAS_ALLOW_INSECURE_TARGETS="1" if settings.allow_insecure_targets else "0",
        IPAAS_WORKERS=str(settings.workers),
        IPAAS_LOG_LEVEL=settings.log_level,
    )
    if settings.plugins is not None:
        env["IPAAS_PLUGINS"] = ",".join(sorted(settings.plugins))
    return env


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process, wake_fd: int) -> None:
        self.proc = proc
        self.wake_fd = wake_fd
        self.reader: asyncio.Task[None] | None = None
        self.status: dict[str, Any] = {}

    def send(self, line: bytes) -> None:
        if self.wake_fd < 0:
            return
        try:
            os.write(self.wake_fd, line)
        except BlockingIOError:
            pass  # the pipe is full: the child has wake-ups waiting already
        except OSError:
            pass  # the child is gone; its supervisor restarts it

    def close_pipe(self) -> None:
        if self.wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.wake_fd)
            self.wake_fd = -1


class EngineProcesses:
    """The core's side: starts, wakes, watches and restarts the engine children. It stands in
    for the in-process dispatcher (notify, inflight, workers) and breaker registry (snapshot)."""

    def __init__(self, settings: Settings, db: Database, count: int, workers_each: int) -> None:
        self.settings = settings
        self.db = db
        self.count = count
        self.workers = count * workers_each
        self._children: dict[int, _Child] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        # Executions the children finished, by (status, connector). Children send what they
        # finished since their last line, not their totals: a restarted child starts again
        # from 0, and these stay monotonic across its restarts (a child that dies loses at
        # most its last second's count).
        self.finished: collections.Counter[tuple[str, str]] = collections.Counter()

    @property
    def inflight(self) -> int:
        return sum(int(c.status.get("inflight", 0)) for c in self._children.values())

    @property
    def processed(self) -> int:
        return sum(int(c.status.get("processed", 0)) for c in self._children.values())

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children.values()]

    def alive(self) -> int:
        return sum(1 for c in self._children.values() if c.proc.returncode is None)

    def troubled_breakers(self) -> list[tuple[str, str, str]]:
        """(tenant, connector, state) of every breaker a child reported, the most open
        state where children disagree."""
        merged: dict[tuple[str, str], str] = {}
        for child in self._children.values():
            for tenant, connector, state, *_ in child.status.get("breakers", ()):
                seen = merged.get((tenant, connector))
                if seen is None or _RANK.get(state, 0) > _RANK.get(seen, 0):
                    merged[tenant, connector] = state
        return [(tenant, connector, state) for (tenant, connector), state in merged.items()]

    def _count_finished(self, rows: Any) -> None:
        for row in rows if isinstance(rows, list) else ():
            with contextlib.suppress(ValueError, TypeError):
                status, connector, count = row
                if isinstance(status, str) and isinstance(connector, str) and isinstance(count, int) and count > 0:
                    self.finished[status, connector] += count

    def notify(self) -> None:
        for child in self._children.values():
            child.send(b"w\n")

    def forget_credential(self, credential_id: str) -> None:
        for child in self._children.values():
            child.send(f"c {credential_id}\n".encode())

    def snapshot(self, tenant_id: str) -> list[BreakerState]:
        """The tenant's breakers as the children last reported them; where children disagree,
        the most open one (that is the one deferring work)."""
        merged: dict[str, BreakerState] = {}
        for child in self._children.values():
            for tenant, connector, state, failures, successes, opened, half_open in child.status.get("breakers", ()):
                if tenant != tenant_id:
                    continue
                seen = merged.get(connector)
                if seen is None or (_RANK.get(state, 0), failures) > (_RANK.get(seen.state, 0), seen.failure_count):
                    merged[connector] = BreakerState(connector, state, failures, successes, _when(opened), _when(half_open))
        return [merged[k] for k in sorted(merged)]

    async def start(self) -> None:
        if not self.db.is_postgres:
            # On SQLite the children are the only dispatchers: a lease left is a dead one's, or
            # an orphaned child's that is still finishing it (see release_dead_leases).
            await outbox.release_dead_leases(self.db)
        for index in range(self.count):
            self._children[index] = await self._spawn(index)
            self._supervisors.append(asyncio.create_task(self._supervise(index), name=f"ipaas-engine-{index}"))

    async def _spawn(self, index: int) -> _Child:
        wake_r, wake_w = os.pipe()
        status_r, status_w = os.pipe()
        env = {**child_env(self.settings), CHILD_FDS: f"{wake_r},{status_w}"}
        try:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ipaas", "engine", pass_fds=(wake_r, status_w), env=env)
        except BaseException:
            for fd in (wake_w, status_r):
                os.close(fd)
            raise
        finally:
            os.close(wake_r)
            os.close(status_w)
        os.set_blocking(wake_w, False)
        child = _Child(proc, wake_w)
        child.reader = asyncio.create_task(self._read_status(child, status_r))
        log.info("engine.process_started", extra={"index": index, "pid": proc.pid})
        return child

    async def _read_status(self, child: _Child, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_STATUS_LINE)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    # Over MAX_STATUS_LINE: the reader has dropped it (or what it buffered of
                    # it; the rest then reads as a line that is not JSON). Ending here froze
                    # the child's load and breakers in the core for the child's life, and
                    # its next report met a closed pipe.
                    log.warning("engine.status_unreadable", extra={"pid": child.proc.pid})
                    continue
                if not line:
                    return
                with contextlib.suppress(orjson.JSONDecodeError):
                    status = orjson.loads(line)
                    if isinstance(status, dict):
                        child.status = status
                        self._count_finished(status.pop("finished", None))
        finally:
            transport.close()

    async def _supervise(self, index: int) -> None:
        backoff = 1.0
        while True:
            child = self._children[index]
            started = time.monotonic()
            code = await child.proc.wait()
            child.close_pipe()
            if self._stopping:
                return
            log.error("engine.process_exited", extra={"index": index, "pid": child.proc.pid, "code": code})
            owner = child.status.get("owner")
            child.status = {}  # no longer counted in flight, its breakers no longer listed
            if owner:
                # Its work goes back to the queue now rather than when the leases expire.
                with contextlib.suppress(Exception):
                    released = await outbox.release_leases(self.db, owner)
                    log.warning("engine.released_leases", extra={"pid": child.proc.pid, "tasks": released})
            if time.monotonic() - started > 60:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            if self._stopping:
                return
            self._children[index] = await self._spawn(index)

    async def stop(self, deadline: float = STOP_GRACE) -> None:
        """End of file tells each child to stop claiming and finish within its grace period;
        a child still running after that is killed (its leases expire, nothing is lost)."""
        self._stopping = True
        for child in self._children.values():
            child.close_pipe()
        procs = [c.proc for c in self._children.values()]
        waiting = [asyncio.create_task(p.wait()) for p in procs]
        if waiting:
            _done, pending = await asyncio.wait(waiting, timeout=deadline + 5)
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in [*self._supervisors, *(c.reader for c in self._children.values() if c.reader)]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _breakers(registry: BreakerRegistry) -> list[list[Any]]:
    # The breakers that say something (a clean one is closed with no failure), the most open
    # first, and a bounded number: the line stays far below what the core reads.
    snapshots = registry.report(MAX_REPORTED_BREAKERS)
    return [
        [tenant, s.connector, s.state, s.failure_count, s.success_count, s.opened_at and s.opened_at.isoformat(), s.half_open_at and s.half_open_at.isoformat()]
        for tenant, s in snapshots
    ]


def yield_cpu(nice: int, sched_batch: bool) -> None:
    """Lower this process's CPU priority before it starts any thread: Linux applies both
    settings per thread, and threads inherit them from the thread that starts them."""
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("engine.nice_failed", extra={"nice": nice, "error": str(exc)})
    if sched_batch and hasattr(os, "SCHED_BATCH"):  # Linux only; elsewhere nice alone
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:
            log.warning("engine.sched_batch_failed", extra={"error": str(exc)})


async def run_engine(settings: Settings) -> None:
    """`ipaas engine`: the dispatcher alone. Started by the core with two pipes; on
    PostgreSQL it can also run on its own, woken by LISTEN/NOTIFY and polling."""
    from ipaas.crypto import load_box
    from ipaas.loop_watch import LoopWatch
    from ipaas.service.server import EngineSettings, build_engine

    engine = EngineSettings.from_settings(settings)
    fds = os.environ.get(CHILD_FDS)
    if fds:  # a child of a core: it yields the CPU to its core (see DEFAULT_ENGINE_NICE)
        yield_cpu(engine.nice, engine.sched_batch)
    db = Database(settings.database_url, synchronous=ENGINE_SQLITE_SYNCHRONOUS)
    parts = build_engine(settings, engine, db, await load_box(settings, db), recover_leases=False)
    dispatcher, credentials = parts.dispatcher, parts.credentials
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if fds:
            # A core's engine stops when its core stops it (closes the pipe, as the core's
            # death does too). Ctrl-C reaches every process of the terminal's group, and
            # systemd's default stop every process of the unit: stopped by that, the engines
            # ended while their core drained, and the core started them again.
            loop.add_signal_handler(sig, lambda: None)
        else:
            loop.add_signal_handler(sig, stop.set)
    reporter: asyncio.Task[None] | None = None
    if fds:
        wake_fd, status_fd = (int(fd) for fd in fds.split(","))
        os.set_blocking(wake_fd, False)
        pending = bytearray()

        def on_wake() -> None:
            try:
                data = os.read(wake_fd, 65536)
            except BlockingIOError:
                return
            if not data:  # the core is gone
                loop.remove_reader(wake_fd)
                stop.set()
                return
            pending.extend(data)
            *lines, rest = pending.split(b"\n")
            pending[:] = rest
            for line in lines:
                if line == b"w":
                    dispatcher.notify()
                elif line.startswith(b"c "):
                    credentials.forget(line[2:].decode())

        loop.add_reader(wake_fd, on_wake)
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(status_fd, "wb", 0))

        finished = parts.dispatcher.executor.finished
        sent: collections.Counter[tuple[str, str]] = collections.Counter()

        async def report() -> None:
            while True:
                # Since the last line written: a skipped beat sends its count with the next.
                new = [[status, connector, count - sent[status, connector]] for (status, connector), count in finished.items() if count != sent[status, connector]]
                status = {"owner": dispatcher.owner, "pid": os.getpid(), "inflight": dispatcher.inflight, "workers": dispatcher.workers, "processed": dispatcher.processed, "breakers": _breakers(parts.breakers), "finished": new}
                if transport.get_write_buffer_size() < MAX_STATUS_LINE:  # the core reads slowly: skip a beat
                    transport.write(orjson.dumps(status) + b"\n")
                    sent.update({(row[0], row[1]): row[2] for row in new})
                await asyncio.sleep(STATUS_INTERVAL)

        reporter = asyncio.create_task(report())
    heap.after_startup()
    LoopWatch(loop).start()
    dispatcher.start()
    log.info("engine.started", extra={"pid": os.getpid(), "workers": dispatcher.workers, "database": db.dialect})
    await stop.wait()
    await dispatcher.stop(deadline=STOP_GRACE)
    dispatcher.executor.close()
    if reporter is not None:
        reporter.cancel()
    await parts.registry.aclose()
    await db.dispose()
