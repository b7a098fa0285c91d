"""The operator's command line outside `serve`: management commands work on the platform's
existing database and never create one, and what an operator can fix (a wrong directory or
URL, a database down, a port taken) is said in one line, not in a traceback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from ipaas.storage import migrate
from ipaas.storage.db import sync_url
from tests.conftest import free_port


def run_cli(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    # Nothing of the caller's IPAAS_* settings: each test says where the platform is.
    base = {k: v for k, v in os.environ.items() if not k.startswith("IPAAS_")}
    return subprocess.run([sys.executable, "-m", "ipaas", *args], cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def said(stderr: str) -> list[str]:
    """What the command told the operator on stderr, without log lines: ours (JSON) and gRPC
    C-core's own ("E1201 05:02:13.457917 14377 add_port.cc:83] Failed to add port ...")."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{") and not re.match(r"[EWI]\d{4} ", line)]


def told(stderr: str) -> list[str]:
    """Every line on stderr but our JSON log lines: gRPC C-core's count too."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = said(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return lines[0]


MANAGEMENT = (["tenants", "list"], ["tenants", "create", "acme"], ["keys", "create", "tn_nope"], ["keys", "revoke", "key_nope"])


def test_management_commands_never_create_a_database_or_an_admin_key(tmp_path: Path) -> None:
    """Run where the platform is not (another directory, no settings), they used to create a
    fresh database and admin key there and report success with keys the real core rejects."""
    where = tmp_path.resolve()
    for args in MANAGEMENT:
        done = run_cli(*args, cwd=where)
        line = one_error_line(done)
        assert done.returncode == 1 and done.stdout == "", (args, done.stdout)
        assert f"no database at {where / '.ipaas' / 'ipaas.db'}" in line and "IPAAS_DATA_DIR" in line and "IPAAS_DATABASE_URL" in line, line
    assert list(where.iterdir()) == [], "nothing is created"


def test_management_commands_use_the_platforms_database_and_leave_its_admin_key_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_cli("migrate", cwd=tmp_path, IPAAS_DATA_DIR=str(data)).returncode == 0

    created = run_cli("tenants", "create", "acme", "--json", cwd=elsewhere, IPAAS_DATA_DIR=str(data))
    assert created.returncode == 0 and created.stderr == "", created.stderr
    tenant = json.loads(created.stdout)["id"]
    key = run_cli("keys", "create", tenant, "--json", cwd=elsewhere, IPAAS_DATA_DIR=str(data))
    assert key.returncode == 0 and key.stderr == "" and json.loads(key.stdout)["secret"].startswith("ipk_"), key.stderr
    listed = run_cli("tenants", "list", cwd=elsewhere, IPAAS_DATABASE_URL=f"sqlite:///{data / 'ipaas.db'}")
    assert listed.returncode == 0 and "acme" in listed.stdout and listed.stderr == "", listed.stderr
    assert not (data / "admin.key").exists(), "only the core generates the admin key"
    assert list(elsewhere.iterdir()) == []


def test_management_commands_refuse_a_database_without_the_schema(tmp_path: Path) -> None:
    empty = tmp_path / "ipaas.db"
    empty.touch()
    done = run_cli("tenants", "list", cwd=tmp_path, IPAAS_DATA_DIR=str(tmp_path))
    line = one_error_line(done)
    assert done.returncode == 1 and "never migrated" in line and "ipaas migrate" in line, line
    assert empty.stat().st_size == 0, "no migration ran"


def test_management_commands_refuse_a_schema_from_a_newer_release(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ipaas.db'}"
    migrate.upgrade(url)
    with create_engine(sync_url(url)).begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    done = run_cli("tenants", "list", cwd=tmp_path, IPAAS_DATABASE_URL=url)
    line = one_error_line(done)
    assert done.returncode == 1 and "0099_from_the_future" in line and "newer release" in line, line


def test_management_commands_refuse_a_schema_older_than_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release with a new migration, run against a database the old core migrated: the
    command would read or write tables the schema lacks, so it asks for `ipaas migrate`
    (it never migrates itself) and leaves the database as it was."""
    from ipaas import cli
    from ipaas.settings import Settings

    url = f"sqlite:///{tmp_path / 'ipaas.db'}"
    migrate.upgrade(url)
    current = migrate.head_revision()
    monkeypatch.setattr(cli, "_known_revision", lambda revision: revision in (current, "0002_next"))
    monkeypatch.setattr(migrate, "head_revision", lambda: "0002_next")
    with pytest.raises(cli.CliError, match=rf"schema revision {current}, older than this release's 0002_next: run `ipaas migrate`"):
        cli.platform_database(Settings.from_env({"IPAAS_DATABASE_URL": url}))
    assert migrate.current_revision(url) == current


@pytest.mark.postgres
def test_management_commands_refuse_an_unmigrated_postgres_database(postgres_url: str, tmp_path: Path) -> None:
    import psycopg

    done = run_cli("keys", "create", "tn_nope", cwd=tmp_path, IPAAS_DATABASE_URL=postgres_url)
    line = one_error_line(done)
    assert done.returncode == 1 and "never migrated" in line, line
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone()
    assert tables == (0,), "no migration ran"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("IPAAS_DATABASE_URL", "postgresql://nobody@127.0.0.1:{port}/x", "cannot connect to the database postgresql://nobody@127.0.0.1:{port}/x"),
        ("IPAAS_DATABASE_URL", "mysql://x/y", "IPAAS_DATABASE_URL is mysql://x/y: simple-ipaas uses sqlite:///<path> or postgresql://"),
        ("IPAAS_DATA_DIR", "/proc/nope", "/proc/nope"),
    ],
)
@pytest.mark.parametrize("command", [["tenants", "list"], ["migrate"]])
def test_database_problems_are_one_line_errors(tmp_path: Path, command: list[str], setting: str, value: str, expected: str) -> None:
    port = free_port()  # nothing listens there
    env = {setting: value.format(port=port)}
    done = run_cli(*command, cwd=tmp_path, **env)
    line = one_error_line(done)
    assert done.returncode == 1 and expected.format(port=port) in line, line

    debug = run_cli(*command, cwd=tmp_path, IPAAS_LOG_LEVEL="DEBUG", **env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and said(debug.stderr)[-1] == line, "the traceback is there with DEBUG"


@pytest.mark.parametrize(
    ("command", "setting", "value", "expected"),
    [
        ("core", "IPAAS_WORKERS", "-1", "IPAAS_WORKERS must be a whole number from 0 to 10000, got '-1'"),
        ("core", "IPAAS_MAX_QUEUE_DEPTH", "nan", "IPAAS_MAX_QUEUE_DEPTH must be a whole number of 0 or more, got 'nan'"),
        ("core", "IPAAS_MAX_QUEUE_DEPTH", "-1", "IPAAS_MAX_QUEUE_DEPTH must be a whole number of 0 or more"),
        ("core", "IPAAS_MAX_TENANT_QUEUE_DEPTH", "-1", "IPAAS_MAX_TENANT_QUEUE_DEPTH must be a whole number of 0 or more"),
        ("core", "IPAAS_RATE_FREE", "0/10", "IPAAS_RATE_FREE must look like 5/10"),
        ("core", "IPAAS_RATE_LIMITS_OFF", "ture", "IPAAS_RATE_LIMITS_OFF must be 1 or 0"),
        ("core", "IPAAS_POLL_INTERVAL", "0", "IPAAS_POLL_INTERVAL must be more than 0 seconds"),
        ("core", "IPAAS_LEASE_SECONDS", "-60", "IPAAS_LEASE_SECONDS must be more than 0 seconds"),
        ("core", "IPAAS_SCHEDULER_INTERVAL", "-1", "IPAAS_SCHEDULER_INTERVAL must be more than 0 seconds"),
        ("core", "IPAAS_STEP_TIMEOUT", "nan", "IPAAS_STEP_TIMEOUT must be more than 0 seconds"),
        ("core", "IPAAS_EXECUTION_DEADLINE", "0", "IPAAS_EXECUTION_DEADLINE must be more than 0 seconds"),
        ("core", "IPAAS_RETRY_BASE_DELAY", "inf", "IPAAS_RETRY_BASE_DELAY must be more than 0 seconds"),
        ("core", "IPAAS_BREAKER_FAILURES", "0", "IPAAS_BREAKER_FAILURES must be a whole number of 1 or more"),
        ("core", "IPAAS_BREAKER_RECOVERY_SECONDS", "-1", "IPAAS_BREAKER_RECOVERY_SECONDS must be more than 0 seconds"),
        ("core", "IPAAS_ENGINE_PROCESSES", "-2", "IPAAS_ENGINE_PROCESSES must be a whole number from 0 to 64"),
        ("core", "IPAAS_SCHEDULE_CATCH_UP", "colapse", "IPAAS_SCHEDULE_CATCH_UP must be collapse or skip"),
        ("core", "IPAAS_HTTP_TRANSPORT", "httpxx", "IPAAS_HTTP_TRANSPORT must be aiohttp or httpx"),
        ("core", "IPAAS_ENGINE_LOOP", "uvlop", "IPAAS_ENGINE_LOOP must be uvloop or asyncio"),
        ("core", "IPAAS_GRPC_MAX_CONNECTION_AGE", "inf", "IPAAS_GRPC_MAX_CONNECTION_AGE must be 0 (never) or a number of seconds"),
        ("core", "IPAAS_LOG_LEVEL", "VERBOSE", "IPAAS_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL"),
        ("core", "IPAAS_GRPC_LISTEN", "127.0.0.1:99999", "IPAAS_GRPC_LISTEN must be host:port with a port from 0 to 65535"),
        ("core", "IPAAS_ALLOW_INSECURE_TARGETS", "ture", "IPAAS_ALLOW_INSECURE_TARGETS must be 1 or 0"),
        ("engine", "IPAAS_ENGINE_LOOP", "uvlop", "IPAAS_ENGINE_LOOP must be uvloop or asyncio"),
        ("engine", "IPAAS_LOG_LEVEL", "VERBOSE", "IPAAS_LOG_LEVEL must be"),
        ("engine", "IPAAS_STEP_TIMEOUT", "nan", "IPAAS_STEP_TIMEOUT must be more than 0 seconds"),
        ("gateway", "IPAAS_HTTP_LISTEN", "127.0.0.1:notaport", "IPAAS_HTTP_LISTEN must be host:port with a port from 1 to 65535"),
        ("gateway", "IPAAS_HTTP_LISTEN", "127.0.0.1", "IPAAS_HTTP_LISTEN must be host:port"),
        ("gateway", "IPAAS_RATE_FREE", "0/10", "IPAAS_RATE_FREE must look like 5/10: a rate per second above 0, then a burst of 1 or more"),
        ("gateway", "IPAAS_RATE_FREE", "5/0", "IPAAS_RATE_FREE must look like 5/10"),
        ("gateway", "IPAAS_REDIS_URL", "localhost:6379", "IPAAS_REDIS_URL must be a redis://, rediss:// or unix:// URL"),
        ("gateway", "IPAAS_RATE_LIMITS_OFF", "ture", "IPAAS_RATE_LIMITS_OFF must be 1 or 0"),
        ("gateway", "IPAAS_LOG_LEVEL", "VERBOSE", "IPAAS_LOG_LEVEL must be"),
        ("gateway", "IPAAS_CORE_TARGET", "http://127.0.0.1:50051", "IPAAS_CORE_TARGET must be a gRPC target"),
        ("core", "IPAAS_SHUTDOWN_DRAIN_SECONDS", "-1", "IPAAS_SHUTDOWN_DRAIN_SECONDS must be 0 seconds or more"),
        ("core", "IPAAS_EXECUTION_RETENTION_DAYS", "0.5", "IPAAS_EXECUTION_RETENTION_DAYS must be 0 (keep forever) or from 1"),
        ("core", "IPAAS_SECRET_KEYS", "not-a-key", "IPAAS_SECRET_KEYS must hold url-safe base64 Fernet keys"),
        ("gateway", "IPAAS_WORKERS", "-1", "IPAAS_WORKERS must be a whole number from 0 to 10000"),
        ("gateway", "IPAAS_SHUTDOWN_DRAIN_SECONDS", "-1", "IPAAS_SHUTDOWN_DRAIN_SECONDS must be 0 seconds or more"),
        ("gateway", "IPAAS_STARTUP_DB_WAIT_SECONDS", "-1", "IPAAS_STARTUP_DB_WAIT_SECONDS must be 0 seconds or more"),
        ("gateway", "IPAAS_HTTP_BODY_TIMEOUT", "0", "IPAAS_HTTP_BODY_TIMEOUT must be more than 0 seconds"),
        ("gateway", "IPAAS_DATABASE_URL", "mysql://x/y", "IPAAS_DATABASE_URL is mysql://x/y: simple-ipaas uses sqlite:///<path> or postgresql://"),
        ("serve", "IPAAS_LOG_LEVEL", "VERBOSE", "IPAAS_LOG_LEVEL must be"),
        ("serve", "IPAAS_STEP_TIMEOUT", "nan", "IPAAS_STEP_TIMEOUT must be more than 0 seconds"),
    ],
)
def test_a_bad_setting_stops_start_up_in_one_line_naming_it(tmp_path: Path, command: str, setting: str, value: str, expected: str) -> None:
    """Each was taken before (a core that delivered nothing, spun a CPU, answered every
    trigger 429, or used another port), or stopped with a traceback. A core, gateway or
    engine exits 3, the failed start systemd is told not to restart (RestartPreventExitStatus=3):
    settings read first exited 1, and under that unit a typo was restarted for ever. serve
    says a process's failed start with 1, as it says any."""
    env = {"IPAAS_DATA_DIR": str(tmp_path / "data"), "IPAAS_GRPC_LISTEN": f"127.0.0.1:{free_port()}", "IPAAS_HTTP_LISTEN": f"127.0.0.1:{free_port()}", "IPAAS_ENGINE_PROCESSES": "0"}
    done = run_cli(command, cwd=tmp_path, timeout=30, **{**env, setting: value})
    line = one_error_line(done)
    assert line.startswith(f"error: {expected}"), line
    assert done.returncode == {"core": 3, "gateway": 3, "engine": 3}.get(command, 1), (done.returncode, line)


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_core_on_a_busy_port_fails_to_start_in_one_line(tmp_path: Path) -> None:
    with busy_port() as taken:
        listen = "127.0.0.1:%d" % taken.getsockname()[1]
        done = run_cli("core", cwd=tmp_path, IPAAS_DATA_DIR=str(tmp_path / "data"), IPAAS_GRPC_LISTEN=listen, IPAAS_ENGINE_PROCESSES="0")
    assert told(done.stderr) == [f"error: cannot listen on {listen} (IPAAS_GRPC_LISTEN): address already in use; stop what holds it or set IPAAS_GRPC_LISTEN"], done.stderr[-3000:]
    assert done.returncode == 3, done.returncode


def test_gateway_on_a_busy_port_fails_to_start_in_one_line(tmp_path: Path) -> None:
    """It printed uvicorn's "ERROR:    [Errno 98] error while attempting to bind on address ..."."""
    with busy_port() as taken:
        listen = "127.0.0.1:%d" % taken.getsockname()[1]
        done = run_cli("gateway", cwd=tmp_path, IPAAS_DATA_DIR=str(tmp_path / "data"), IPAAS_HTTP_LISTEN=listen)
    assert told(done.stderr) == [f"error: cannot listen on {listen} (IPAAS_HTTP_LISTEN): address already in use; stop what holds it or set IPAAS_HTTP_LISTEN"], done.stderr[-3000:]
    assert done.returncode == 3, done.returncode


@pytest.mark.parametrize("blocked", ["core", "gateway"])
def test_serve_does_not_restart_a_process_that_fails_to_start(tmp_path: Path, blocked: str) -> None:
    """A core (or gateway) that cannot start would fail the same way again: serve stops
    with its one line instead of restarting it five times, a traceback each."""
    with busy_port() as taken:
        ports = {"core": free_port(), "gateway": free_port()}
        ports[blocked] = taken.getsockname()[1]
        done = run_cli(
            "serve",
            cwd=tmp_path,
            timeout=90,
            IPAAS_DATA_DIR=str(tmp_path / "data"),
            IPAAS_GRPC_LISTEN=f"127.0.0.1:{ports['core']}",
            IPAAS_HTTP_LISTEN=f"127.0.0.1:{ports['gateway']}",
            IPAAS_ENGINE_PROCESSES="0",
            IPAAS_ADMIN_KEY="ipk_admin_" + "x" * 32,  # no generated key printed
        )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "restarting" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    if blocked == "core":
        assert told(done.stderr) == [f"error: cannot listen on 127.0.0.1:{ports['core']} (IPAAS_GRPC_LISTEN): address already in use; stop what holds it or set IPAAS_GRPC_LISTEN"], done.stderr[-3000:]
    else:
        assert told(done.stderr) == [f"error: cannot listen on 127.0.0.1:{ports['gateway']} (IPAAS_HTTP_LISTEN): address already in use; stop what holds it or set IPAAS_HTTP_LISTEN"], done.stderr[-3000:]


def test_connectors_list_shows_distributions_and_reports_a_broken_plugin_once(tmp_path: Path) -> None:
    (tmp_path / "ipaas_exploding.py").write_text("raise RuntimeError('plugin bug at import')\n")
    dist = tmp_path / "ipaas_exploding-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ipaas-exploding\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ipaas.connectors]\nexploding = ipaas_exploding\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", ""), str(Path(__file__).resolve().parents[2])])
    done = run_cli("connectors", "list", cwd=tmp_path, PYTHONPATH=path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    slack = next(line for line in lines if line.startswith("slack "))
    assert slack.split()[:3] == ["slack", "0.1.0", "ipaas-slack"], slack
    assert "not loaded: ipaas-exploding:exploding: import failed: RuntimeError: plugin bug at import" in lines
    assert done.stderr == "", "the problem is printed once, as a line of the listing"


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ("", ["CONNECTOR", "discord", "openweather", "slack"]),
        (" ", ["CONNECTOR", "discord", "openweather", "slack"]),
        ("slack", ["CONNECTOR", "slack"]),
        ("nope", ["no connectors loaded: IPAAS_PLUGINS allows only nope", "not loaded: IPAAS_PLUGINS: 'nope' matches no installed plugin (no entry point or connector of that name)"]),
    ],
)
def test_connectors_list_reads_an_empty_allow_list_as_every_installed_connector(tmp_path: Path, allowed: str, expected: list[str]) -> None:
    """IPAAS_PLUGINS= listed "no connectors installed" with three installed, as the core
    loaded none of them."""
    done = run_cli("connectors", "list", cwd=tmp_path, IPAAS_PLUGINS=allowed)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line if line.startswith(("no ", "not ")) else line.split()[0] for line in lines] == expected, done.stdout


def start_core_process(cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ipaas core` in the background, returned once it listens."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("IPAAS_")}
    proc = subprocess.Popen([sys.executable, "-m", "ipaas", "core"], cwd=cwd, env={**base, **env, "IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}"}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the core did not start (exit {proc.poll()})")
        time.sleep(0.1)


def test_a_second_core_on_the_same_sqlite_database_is_refused_in_one_line(tmp_path: Path) -> None:
    """SQLite takes one core per database (its start-up, scheduler and retention assume no
    other); a second one exits at start, and once the first has stopped a new one starts."""
    env = {"IPAAS_DATA_DIR": str(tmp_path / "data"), "IPAAS_ENGINE_PROCESSES": "0", "IPAAS_ADMIN_KEY": "ipk_admin_" + "x" * 32}
    first = start_core_process(tmp_path, env)
    try:
        second = run_cli("core", cwd=tmp_path, **env, IPAAS_GRPC_LISTEN=f"127.0.0.1:{free_port()}")
        line = one_error_line(second)
        assert second.returncode == 3, second.returncode
        assert f"another core (pid {first.pid}) is running on {tmp_path / 'data' / 'ipaas.db'}" in line, line
        assert "PostgreSQL" in line
    finally:
        first.terminate()
        first.wait(timeout=30)
    again = start_core_process(tmp_path, env)  # the first stopped: the database is free again
    again.terminate()
    again.wait(timeout=30)


def test_the_platforms_files_are_for_its_own_user_only(tmp_path: Path) -> None:
    """With the usual umask 022 the SQLite database (payloads, step outputs, key hashes) and
    its -wal and -shm were readable by every local user."""
    data = tmp_path / "data"
    core = start_core_process(tmp_path, {"IPAAS_DATA_DIR": str(data), "IPAAS_ENGINE_PROCESSES": "0"})
    try:  # looked at while it runs: SQLite removes -wal and -shm when the last connection closes
        modes = {p.name: p.stat().st_mode & 0o777 for p in [data, *data.iterdir()]}
    finally:
        core.terminate()
        core.wait(timeout=30)
    assert {"ipaas.db", "ipaas.db-wal", "ipaas.db-shm", "admin.key", "secret.key"} <= set(modes), modes
    shared = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert shared == {}, shared
