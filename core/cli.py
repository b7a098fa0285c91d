"""The `ipaas` command line: run the platform, migrate, manage tenants, keys and stored secrets, check workflows, list connectors."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from ipaas.settings import Settings


EXIT_ERROR = 1
# A server (core or gateway) that stops before it ever served: the same settings would fail
# the same way again, so `serve` does not restart it (nor should systemd:
# RestartPreventExitStatus=3). It is also what uvicorn returns when the gateway cannot start.
EXIT_START_FAILED = 3

EXIT_CODES = """exit codes:
  0  done (a server: stopped cleanly)
  1  error, said in one line on stderr (a traceback too with IPAAS_LOG_LEVEL=DEBUG);
     serve: a process failed to start, or kept exiting
  2  bad command line
  3  core, gateway or engine: failed to start (a bad setting, port in use, database unreachable, ...)"""


class CliError(Exception):
    """A problem the operator can fix, said in one line."""


class StartupFailed(Exception):
    """A server stopped before it ever served; the cause is the reason."""


def _print(data: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n".join(lines))


def database_label(url: str) -> str:
    """The database a URL names, for the operator: a SQLite file's absolute path, a server's
    URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return "(IPAAS_DATABASE_URL, unparsable)"
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return str(Path(parsed.database).resolve())
    return parsed.render_as_string(hide_password=True)


def check_database_url(url: str) -> None:
    from sqlalchemy.engine import make_url

    expected = "simple-ipaas uses sqlite:///<path> or postgresql://user@host/db"
    try:
        backend = make_url(url).get_backend_name()
    except Exception:
        raise CliError(f"IPAAS_DATABASE_URL is not a database URL: {expected}") from None
    if backend not in ("sqlite", "postgresql"):
        raise CliError(f"IPAAS_DATABASE_URL is {database_label(url)}: {expected}")


_WHERE = "run this from the directory the platform runs in, or set IPAAS_DATA_DIR (or IPAAS_DATABASE_URL) to the platform's"


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from ipaas.storage import migrate

    try:
        return ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_revision(revision) is not None
    except CommandError:
        return False


def platform_database(settings: Settings) -> str:
    """The URL of the platform's database, checked to exist and to have this release's schema.

    Management commands work on the database the core uses. They never create it (run from
    another directory, that made a second platform whose keys the real core rejects) and
    never migrate it (that is `ipaas migrate`'s and the core's start-up's job, under its lock).
    """
    from sqlalchemy.engine import make_url

    from ipaas.storage import migrate

    url = settings.database_url
    check_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise CliError(f"IPAAS_DATABASE_URL names an in-memory SQLite database, which holds no platform: {_WHERE}")
        if not Path(parsed.database).is_file():
            raise CliError(f"no database at {database_label(url)}: {_WHERE}")
    revision, head = migrate.current_revision(url), migrate.head_revision()
    if revision is None:
        raise CliError(f"the database {database_label(url)} has no simple-ipaas schema (never migrated): {_WHERE}; a new platform is set up by `ipaas migrate` or by starting it")
    if revision != head:
        if _known_revision(revision):
            # This release's code would read and write tables the old schema lacks.
            raise CliError(f"the database {database_label(url)} is at schema revision {revision}, older than this release's {head}: run `ipaas migrate` (or start this release's core, which migrates) first; this command does not change the schema")
        raise CliError(f"the database {database_label(url)} is at schema revision {revision}, which this release does not know: it was migrated by a newer release; use that release's ipaas")
    return url


def _run_database(settings: Settings, action) -> Any:  # type: ignore[no-untyped-def]
    url = platform_database(settings)

    async def main() -> Any:
        from ipaas.storage.db import Database

        db = Database(url)
        try:
            return await action(db)
        finally:
            await db.dispose()

    return asyncio.run(main())


def _run_store(settings: Settings, action) -> Any:  # type: ignore[no-untyped-def]
    from ipaas.tenants import TenantStore

    # The store only uses the admin key to recognise admin callers, and these commands
    # authenticate nobody: a throwaway value spares reading (or creating) the real one.
    return _run_database(settings, lambda db: action(TenantStore(db, secrets.token_urlsafe(32))))


def _one_line(text: str) -> str:
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def explain(exc: BaseException, settings: Settings) -> str | None:
    """One line for a failure the operator can fix; None for anything else (a bug keeps its
    traceback)."""
    from psycopg import OperationalError as DriverOperationalError
    from sqlalchemy.exc import InterfaceError, OperationalError

    from ipaas.errors import IpaasError
    from ipaas.lifecycle import CannotListen

    if isinstance(exc, (CliError, IpaasError, CannotListen)):
        return str(exc)
    if isinstance(exc, SystemExit):
        # Settings and migrations stop with a message already meant for the operator.
        return exc.code.removeprefix("error: ") if isinstance(exc.code, str) else None
    if isinstance(exc, (OperationalError, InterfaceError, DriverOperationalError)):
        # The driver's own error: from waiting for the database at start-up (ipaas.lifecycle).
        where, reason = database_label(settings.database_url), _one_line(str(getattr(exc, "orig", None) or exc))
        if settings.database_url.startswith("sqlite"):
            return f"cannot open the database {where}: {reason}; check IPAAS_DATA_DIR (or IPAAS_DATABASE_URL) and the file's permissions"
        return f"cannot connect to the database {where}: {reason}; check IPAAS_DATABASE_URL and that the server is up"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot use {exc.filename}: {exc.strerror or exc}; check IPAAS_DATA_DIR (now {settings.data_dir.resolve()}) names a directory this user can create and write"
    return None


@contextlib.contextmanager
def _starting(what: str) -> Iterator[None]:
    """A server's settings read before it serves: a bad one is a failed start (exit 3)."""
    try:
        yield
    except (Exception, SystemExit) as exc:
        raise StartupFailed(what) from exc


def _report(exc: BaseException, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr, flush=True)


# The SQLite writer thread holds the database's one write lock across statements; each
# statement gives up the GIL and must win it back from the event loop's thread, which keeps
# it up to the switch interval (5 ms by default) while every other writer waits. A shorter
# interval shortens those holds. Bench, alternating: 0.5 ms in the core and its engine
# processes, ingest 902-1152 -> 1111-1217 req/s, end to end 503-593 -> 553-624 msg/s (3
# pairs); in engine processes alone 1018-1047 -> 1112-1154 and 545-576 -> 580-619.
GIL_SWITCH_INTERVAL = 0.0005

STOP_GRACE = 10  # seconds a stopping core gives RPCs and executions in flight


def cmd_core(settings: Settings, _args: argparse.Namespace) -> int:
    from ipaas import heap
    from ipaas.lifecycle import drain_seconds, insists, stuck_report
    from ipaas.loop_watch import LoopWatch
    from ipaas.logs import configure_logging
    from ipaas.service.server import CoreServer, stop_seconds

    configure_logging(settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)

    with _starting("the core failed to start"):
        drain = drain_seconds(settings.extra)

    def give_up(reason: str) -> None:
        print(f"error: {reason}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)

    def stuck(loop: asyncio.AbstractEventLoop, reason: str) -> None:
        # Whatever held the stop past every step's limit is named in the log, so the next
        # overrun can be fixed rather than only cut short.
        with contextlib.suppress(Exception):
            logging.getLogger("ipaas.lifecycle").error("stop.stuck", extra=stuck_report(loop))
        give_up(reason)

    async def start(server: CoreServer) -> None:
        try:
            check_database_url(settings.database_url)
            await server.start()
        except (Exception, SystemExit) as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.stop(grace=0), 10)
            raise StartupFailed("the core failed to start") from exc

    async def main() -> None:
        server = CoreServer(settings)
        stop = asyncio.Event()

        first_signal_at: float | None = None

        def on_signal(sig: signal.Signals) -> None:
            nonlocal first_signal_at
            if insists(first_signal_at, time.monotonic()):
                # A second signal: whoever sent it will not wait for the graceful stop.
                give_up(f"{sig.name} again while stopping: stopped at once")
            if stop.is_set():
                return  # the same stop request, delivered twice
            first_signal_at = time.monotonic()
            stop.set()
            # Every step of the stop has a time limit; this is for whatever hangs outside
            # them (a thread the event loop waits for at exit), so the stop always ends.
            limit = drain + stop_seconds(STOP_GRACE) + 10
            watchdog = threading.Timer(limit, stuck, [loop, f"still stopping {limit:.0f} s after {sig.name}: stopped at once"])
            watchdog.daemon = True
            watchdog.start()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        starting, stopped = asyncio.create_task(start(server)), asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # Stopped while starting (waiting for its database): nothing served yet.
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            await server.stop(grace=0)
            return
        stopped.cancel()
        starting.result()
        heap.after_startup()
        LoopWatch(loop).start()  # dry runs, and the engine when it runs here, call plugins
        if server.admin_key_generated:
            print(f"admin key (shown once, saved in {settings.data_dir}/admin.key): {server.admin_key}", file=sys.stderr, flush=True)
        await stop.wait()
        await server.drain(drain)
        await server.stop(grace=STOP_GRACE)

    asyncio.run(main())
    return 0


def cmd_engine(settings: Settings, _args: argparse.Namespace) -> int:
    from ipaas.engine.processes import run_engine
    from ipaas.logs import configure_logging
    from ipaas.service.server import EngineSettings

    configure_logging(settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # An engine process runs no gRPC server (grpc.aio does not support uvloop), only asyncio
    # HTTP clients and database drivers: uvloop's loop costs ~9 % less CPU per delivery (bench).
    loop_factory = None
    with _starting("the engine failed to start"):
        engine = EngineSettings.from_settings(settings)
    if engine.loop == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run_engine(settings))
    return 0


def cmd_gateway(settings: Settings, _args: argparse.Namespace) -> int:
    from ipaas.gateway.__main__ import StartFailed, run

    if settings.redis_url is None:
        with _starting("the gateway failed to start"):
            # Its idempotency store is then in the database; another URL was a driver's traceback.
            check_database_url(settings.database_url)
    try:
        return run(settings)
    except StartFailed as exc:
        raise StartupFailed(str(exc)) from exc.__cause__


def cmd_serve(settings: Settings, _args: argparse.Namespace) -> int:
    """Core and gateway as two supervised processes: if one dies it is restarted (at most
    five times a minute); SIGTERM/SIGINT stops both cleanly."""
    from ipaas.lifecycle import drain_seconds

    commands = {name: [sys.executable, "-m", "ipaas", name] for name in ("core", "gateway")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    restarts: dict[str, list[float]] = {name: [] for name in commands}
    stopping = False

    def stop(_sig: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs["core"] = subprocess.Popen(commands["core"])
    time.sleep(0.5)  # let the core create the data dir and admin key before the gateway starts
    if procs["core"].poll() != EXIT_START_FAILED:
        procs["gateway"] = subprocess.Popen(commands["gateway"])
    relaunched: set[str] = set()
    code = 0
    while not stopping:
        time.sleep(0.2)
        for name, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            if proc.returncode == EXIT_START_FAILED and name not in relaunched:
                # It never served and has said why on stderr; started again with the same
                # settings it would fail the same way. (A restart after a crash that cannot
                # start counts against the restart budget below instead: the cause may pass.)
                stopping, code = True, EXIT_ERROR
                break
            recent = [t for t in restarts[name] if time.monotonic() - t < 60]
            if len(recent) >= 5:
                print(f"{name} keeps exiting (code {proc.returncode}); stopping", file=sys.stderr)
                stopping, code = True, 1
                break
            restarts[name] = [*recent, time.monotonic()]
            print(f"{name} exited with code {proc.returncode}; restarting", file=sys.stderr)
            procs[name] = subprocess.Popen(commands[name])
            relaunched.add(name)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=15 + drain_seconds(settings.extra))  # each drains before it stops
        except subprocess.TimeoutExpired:
            proc.kill()
    return code


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from ipaas.storage import migrate

    check_database_url(settings.database_url)
    migrate.upgrade(settings.database_url)
    print(f"database at revision {migrate.current_revision(settings.database_url)}")
    return 0


def cmd_tenants_create(settings: Settings, args: argparse.Namespace) -> int:
    tenant = _run_store(settings, lambda s: s.create_tenant(args.name, args.tier))
    data = {"id": tenant.id, "name": tenant.name, "tier": tenant.tier, "created_at": tenant.created_at.isoformat()}
    _print(data, args.json, [f"created tenant {tenant.id} ({tenant.name}, {tenant.tier})"])
    return 0


def cmd_tenants_list(settings: Settings, args: argparse.Namespace) -> int:
    async def all_tenants(store):  # type: ignore[no-untyped-def]
        from ipaas.pagination import PageRequest
        from ipaas.v1.tenants_pb2 import ListTenantsRequest

        items, token = [], ""
        while True:
            page = await store.list_tenants(PageRequest.of(ListTenantsRequest(page_size=100, page_token=token), None))
            items += page.items
            if not (token := page.next_token):
                return items

    tenants = _run_store(settings, all_tenants)
    data = [{"id": t.id, "name": t.name, "tier": t.tier, "created_at": t.created_at.isoformat()} for t in tenants]
    _print(data, args.json, [f"{t.id}  {t.tier:5}  {t.name}" for t in tenants] or ["no tenants"])
    return 0


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    new = _run_store(settings, lambda s: s.create_key(args.tenant_id, args.name))
    data = {"id": new.key.id, "tenant_id": new.key.tenant_id, "secret": new.secret}
    _print(data, args.json, [f"API key {new.key.id} for {new.key.tenant_id} (shown once):", new.secret])
    return 0


def cmd_keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    key = _run_store(settings, lambda s: s.revoke_key(args.key_id))
    data = {"id": key.id, "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None}
    _print(data, args.json, [f"revoked {key.id}"])
    return 0


KEY_CHECK_LINES = {
    "reencrypted": "re-encrypted with the newest key",
    "current": "already uses the newest key",
    "changed": "rewritten by another run meanwhile; run this again to check it",
    "absent": "none yet: the next core to start records it with its newest key",
}


def cmd_secrets_reencrypt(settings: Settings, args: argparse.Namespace) -> int:
    from ipaas import crypto
    from ipaas.reencrypt import reencrypt_secrets

    key_file = (settings.data_dir / crypto.KEY_FILE).resolve()

    async def reencrypt(db):  # type: ignore[no-untyped-def]
        keys = crypto.existing_keys(settings.secret_keys, settings.data_dir)
        if not keys:
            # Never generate one, as a core would: a new key decrypts nothing stored.
            raise CliError(f"no encryption key in IPAAS_SECRET_KEYS nor in {key_file}: set IPAAS_SECRET_KEYS as the cores have it (newest first), or IPAAS_DATA_DIR to the core's")
        return await reencrypt_secrets(db, crypto.SecretBox(keys), args.batch_size)

    done = _run_database(settings, reencrypt)
    data = {"reencrypted": done.rewritten, "already_newest": done.current, "changed_meanwhile": done.changed, "unreadable": done.unreadable, "key_check": done.key_check}
    lines = [f"re-encrypted {_count(done.rewritten, 'secret')} with the newest key ({done.current} already used it)"]
    if done.changed:
        lines.append(f"{_count(done.changed, 'secret')} changed by a core meanwhile kept the core's value; run this again to check them")
    if done.key_check in KEY_CHECK_LINES:  # unreadable: the error below says it
        # The check is what a core without the newest key is refused by: whether it moved
        # tells the operator whether the old key can go yet.
        lines.append(f"key check: {KEY_CHECK_LINES[done.key_check]}")
    _print(data, args.json, lines)
    if done.unreadable:
        ids = [i for table in done.unreadable.values() for i in table]
        shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
        where = "IPAAS_SECRET_KEYS" if settings.secret_keys else f"the key file {key_file}"
        raise CliError(f"no key in {where} decrypts {_count(len(ids), 'stored secret')} ({shown}), left as stored: add the key that encrypted them to IPAAS_SECRET_KEYS and run this again; without it they cannot be read")
    if done.key_check == "unreadable":
        where = "IPAAS_SECRET_KEYS" if settings.secret_keys else f"the key file {key_file}"
        raise CliError(f"no key in {where} decrypts the database's key check: these are not the keys the database was set up with, and cores with them refuse to start; add that key to IPAAS_SECRET_KEYS and run this again")
    return 0


def cmd_workflows_check(settings: Settings, args: argparse.Namespace) -> int:
    from ipaas.template_check import affected_workflows

    async def check(db):  # type: ignore[no-untyped-def]
        found = []
        async for workflow in affected_workflows(db, args.batch_size):
            found.append(workflow)
            if not args.json:  # as found: a large platform's first lines come at once
                problems = "; ".join(f"step {t.step_id} {t.where}: {t.reason}" for t in workflow.refused)
                print(f"tenant {workflow.tenant_id} workflow {workflow.workflow_id} version {workflow.version}: {problems}", flush=True)
        return found

    found = _run_database(settings, check)
    if args.json:
        print(json.dumps([{"tenant_id": w.tenant_id, "workflow_id": w.workflow_id, "version": w.version, "refused": [vars(t) for t in w.refused]} for w in found], indent=2))
    elif not found:
        print("no workflow's current version holds a template this release refuses")
    if found:
        # Not a failure of the command, but what a deploy script should stop on.
        raise CliError(f"{_count(len(found), 'workflow')} would fail every execution: rewrite the templates named above (docs/operating.md, Upgrading)")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def cmd_connectors_list(settings: Settings, args: argparse.Namespace) -> int:
    from ipaas.plugin_host import load_registry

    if settings.log_level != "DEBUG":
        # Each rejected plugin is printed below as a "not loaded" line; its log record would
        # say it a second time.
        logging.getLogger("ipaas.plugins").setLevel(logging.CRITICAL)
    registry = load_registry(settings)
    data = {"connectors": registry.describe(), "problems": [{"distribution": d, "reason": r} for d, r in registry.problems]}
    rows = [(c["name"], c["version"], c["distribution"], ", ".join(a["name"] for a in c["actions"])) for c in data["connectors"]]
    if rows:
        rows.insert(0, ("CONNECTOR", "VERSION", "DISTRIBUTION", "ACTIONS"))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [" ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " " + row[3] for row in rows]
    elif settings.plugins is None:
        lines = ["no connectors installed"]
    else:
        # Installed ones may be left out by the allow-list, not missing: say which it is.
        lines = [f"no connectors loaded: IPAAS_PLUGINS allows only {', '.join(sorted(settings.plugins))}"]
    lines += [f"not loaded: {p['distribution']}: {p['reason']}" for p in data["problems"]]
    _print(data, args.json, lines)
    return 0


def _database_help(settings: Settings | None) -> str:
    here = database_label(settings.database_url) if settings is not None else "(settings unreadable)"
    return (
        "These commands work on the platform's existing database: IPAAS_DATABASE_URL, else "
        "ipaas.db in IPAAS_DATA_DIR (default ./.ipaas, in the current directory). They never "
        "create it or change its schema; run them from the platform's directory or with its "
        f"settings. With the current settings: {here}"
    )


SERVERS = (cmd_serve, cmd_core, cmd_engine, cmd_gateway)
# Those that exit EXIT_START_FAILED for a bad setting, as for any other failed start: the docs'
# unit files stop restarting on it. (serve says a failed start with 1, as for its processes.)
STARTING = (cmd_core, cmd_engine, cmd_gateway)


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="ipaas", description="simple-ipaas: a small, self-hosted integration platform", epilog=EXIT_CODES, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the whole platform (core and gateway)", epilog="A process that fails to start stops serve (exit 1); one that exits later is restarted, at most five times a minute.").set_defaults(func=cmd_serve)
    sub.add_parser("core", help="run the gRPC core", epilog="Exits 3 if it fails to start (a bad setting, port in use, database unreachable, ...).").set_defaults(func=cmd_core)
    sub.add_parser("engine", help="run only the delivery engine (the core starts these itself with IPAAS_ENGINE_PROCESSES)").set_defaults(func=cmd_engine)
    sub.add_parser("gateway", help="run the REST gateway", epilog="Exits 3 if it fails to start (a bad setting, port in use, ...).").set_defaults(func=cmd_gateway)
    sub.add_parser("migrate", help="apply database migrations (creates the database if needed)").set_defaults(func=cmd_migrate)

    managed = {"epilog": _database_help(settings)}
    tenants = sub.add_parser("tenants", help="manage tenants", **managed).add_subparsers(dest="tenants_command", required=True)
    create = tenants.add_parser("create", help="create a tenant", **managed)
    create.add_argument("name")
    create.add_argument("--tier", choices=["free", "paid"], default="free")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_tenants_create)
    listing = tenants.add_parser("list", help="list tenants", **managed)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_tenants_list)

    keys = sub.add_parser("keys", help="manage API keys", **managed).add_subparsers(dest="keys_command", required=True)
    kcreate = keys.add_parser("create", help="create an API key for a tenant", **managed)
    kcreate.add_argument("tenant_id")
    kcreate.add_argument("--name", default="cli")
    kcreate.add_argument("--json", action="store_true")
    kcreate.set_defaults(func=cmd_keys_create)
    krevoke = keys.add_parser("revoke", help="revoke an API key", **managed)
    krevoke.add_argument("key_id")
    krevoke.add_argument("--json", action="store_true")
    krevoke.set_defaults(func=cmd_keys_revoke)

    secrets_ = sub.add_parser("secrets", help="manage stored secrets", **managed).add_subparsers(dest="secrets_command", required=True)
    reencrypt = secrets_.add_parser(
        "reencrypt",
        help="encrypt every stored credential and webhook secret anew with the newest key (the first of IPAAS_SECRET_KEYS), so older keys can be removed",
        epilog="Safe while cores run: in batches, each its own transaction; a secret a core changes meanwhile keeps the core's value. Exits 1 naming the secrets no key decrypts (the others are re-encrypted). "
        + managed["epilog"],
    )
    reencrypt.add_argument("--batch-size", type=_positive, default=500, help="secrets per transaction (default 500)")
    reencrypt.add_argument("--json", action="store_true")
    reencrypt.set_defaults(func=cmd_secrets_reencrypt)

    workflows = sub.add_parser("workflows", help="check stored workflows", **managed).add_subparsers(dest="workflows_command", required=True)
    wcheck = workflows.add_parser(
        "check",
        help="name every live workflow whose current version holds a template this release refuses (one line each), so it can be rewritten before its executions fail",
        epilog="Only reads, in batches; safe while cores run. Exits 1 when it names any. " + managed["epilog"],
    )
    wcheck.add_argument("--batch-size", type=_positive, default=200, help="workflows read at a time (default 200)")
    wcheck.add_argument("--json", action="store_true")
    wcheck.set_defaults(func=cmd_workflows_check)

    connectors = sub.add_parser("connectors", help="installed connectors").add_subparsers(dest="connectors_command", required=True)
    clist = connectors.add_parser("list", help="list installed connectors, with the distribution providing each, and plugins that failed to load")
    clist.add_argument("--json", action="store_true")
    clist.set_defaults(func=cmd_connectors_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings: Settings | None = Settings.from_env(os.environ)
        unreadable = None
    except SystemExit as exc:
        settings, unreadable = None, exc
    args = build_parser(settings).parse_args(argv)
    if settings is None:
        print(f"error: {unreadable.code if unreadable else 'unreadable settings'}", file=sys.stderr)
        return EXIT_START_FAILED if args.func in STARTING else EXIT_ERROR
    debug = settings.log_level == "DEBUG"
    # Everything the platform writes (the SQLite files with payloads, step outputs and key
    # hashes, their -wal and -shm, key files, lock files) is for its own user only: with the
    # usual umask 022 the databases were readable by every local user.
    os.umask(0o077)
    if args.func not in SERVERS:
        from ipaas.logs import configure_logging

        # A command that prints its result logs only what went wrong (everything with DEBUG).
        configure_logging("DEBUG" if debug else "WARNING")
    try:
        return int(args.func(settings, args) or 0)
    except StartupFailed as exc:
        cause = exc.__cause__ or exc
        message = explain(cause, settings)
        if message is None:
            traceback.print_exception(cause)
            message = f"{exc}: {type(cause).__name__}: {cause}"
        _report(cause, message, debug)
        return EXIT_START_FAILED
    except (Exception, SystemExit) as exc:
        message = explain(exc, settings)
        if message is None:
            raise
        _report(exc, message, debug)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
