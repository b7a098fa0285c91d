"""Starting and stopping a server process (core or gateway): waiting for a database that is
not up yet, the drain before a stop, time limits on each step of a stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from ipaas.settings import seconds

log = logging.getLogger("ipaas.lifecycle")

DRAIN_SECONDS = 5.0  # IPAAS_SHUTDOWN_DRAIN_SECONDS
DB_WAIT_SECONDS = 60.0  # IPAAS_STARTUP_DB_WAIT_SECONDS
_ATTEMPT_TIMEOUT = 5  # seconds one connection attempt may take (a partitioned server never answers)
_MAX_BACKOFF = 5.0


class CannotListen(Exception):
    """A server could not take its listen address; the message names the setting, in one line."""


def cannot_listen(address: str, setting: str, reason: str) -> CannotListen:
    return CannotListen(f"cannot listen on {address} ({setting}): {reason}; stop what holds it or set {setting}")


# One stop request often arrives twice at once: Ctrl-C reaches the whole process group and
# `ipaas serve` passes it on to its children, and systemd signals every process of a unit.
# Only a signal this long after the first means "stop now".
REPEATED_WITHIN = 2.0


def insists(first_signal_at: float | None, now: float) -> bool:
    """Whether a signal at `now` asks for an immediate stop: one came before, not just now."""
    return first_signal_at is not None and now - first_signal_at >= REPEATED_WITHIN


def drain_seconds(env: Mapping[str, str]) -> float:
    """How long a server keeps serving after SIGTERM while it reports itself not ready."""
    return seconds(env, "IPAAS_SHUTDOWN_DRAIN_SECONDS", DRAIN_SECONDS, allow_zero=True)


def database_wait_seconds(env: Mapping[str, str]) -> float:
    """How long a server starting up retries a database that does not answer yet."""
    return seconds(env, "IPAAS_STARTUP_DB_WAIT_SECONDS", DB_WAIT_SECONDS, allow_zero=True)


def _worth_retrying(exc: BaseException) -> bool:
    # No SQLSTATE: the server was not reached (refused, unresolvable, timed out). 08: a
    # connection exception; 57P03: the server is starting up. Anything else (a wrong
    # password, a database that does not exist) will not pass by waiting.
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def wait_for_database(url: str, wait: float, *, stopping: Callable[[], bool] = lambda: False) -> None:
    """Return once a PostgreSQL server at `url` accepts a connection, retrying with backoff
    for up to `wait` seconds (one log line per failed attempt); then raise the last error.
    SQLite is a file and is not waited for. `stopping` ends the wait early (a stop signal)."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    deadline = time.monotonic() + wait
    delay, attempt = 0.25, 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=max(2, min(_ATTEMPT_TIMEOUT, int(left) + 1)))
        except psycopg.OperationalError as exc:
            left = deadline - time.monotonic()
            if not _worth_retrying(exc) or left <= 0 or stopping():
                raise
            delay = min(delay * 2, _MAX_BACKOFF, left)
            log.warning("database.unavailable", extra={"attempt": attempt, "error": _one_line(exc), "retry_in": round(delay, 2), "gives_up_in": round(left, 1)})
            until = time.monotonic() + delay
            while time.monotonic() < until and not stopping():
                await asyncio.sleep(min(0.1, until - time.monotonic()))
            if stopping():
                raise
            continue
        await conn.close()
        if attempt > 1:
            log.info("database.available", extra={"attempt": attempt})
        return


async def bounded(step: str, work: Awaitable[object], limit: float) -> None:
    """Await one step of a stop for at most `limit` seconds: past it, or if it fails, log and
    go on with the next step, so a dead database cannot hold the stop forever."""
    try:
        await asyncio.wait_for(work, limit)
    except TimeoutError:
        log.warning("stop.step_timed_out", extra={"step": step, "limit_seconds": limit})
    except Exception as exc:
        log.warning("stop.step_failed", extra={"step": step, "error": _one_line(exc)})


def innermost_frames(frame: object, limit: int) -> str:
    """A thread's stack, as `function (file:line) > ...`, its `limit` innermost frames."""
    import traceback

    return " > ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})" for f in traceback.extract_stack(frame)[-limit:])  # type: ignore[arg-type]


def stuck_report(loop: asyncio.AbstractEventLoop | None, frames: int = 6) -> dict[str, list[str]]:
    """What a stop that overran its watchdog is waiting for: each thread's innermost frames
    and what each unfinished task of the loop awaits (outer > inner). Read from the watchdog's thread while the loop may
    still be running, so it is best effort (a set changing underneath is skipped)."""
    import sys
    import threading

    names = {t.ident: t.name for t in threading.enumerate()}
    threads = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the watchdog itself
        where = innermost_frames(frame, frames)
        threads.append(f"{names.get(ident, ident)}: {where}")
    waiting: dict[str, int] = {}
    if loop is not None:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        except RuntimeError:
            pending = []
        for task in pending:
            where = " > ".join(f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno})" for f in _awaiting(task.get_coro())[:frames])
            # grpc keeps a task per idle request slot: alike lines are counted, not repeated.
            line = where or repr(task.get_coro())
            if not task.get_name().startswith("Task-"):
                line = f"{task.get_name()}: {line}"
            waiting[line] = waiting.get(line, 0) + 1
    tasks = [f"{n}x {line}" if n > 1 else line for line, n in waiting.items()]
    return {"threads": sorted(threads), "tasks": sorted(tasks)}


def _awaiting(coro: object) -> list:
    """The frames of a suspended coroutine and of what it awaits, outermost first (a
    suspended coroutine's frame has no f_back, so Task.get_stack shows only the outermost)."""
    found = []
    while coro is not None and len(found) < 64:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        found.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
    return found
