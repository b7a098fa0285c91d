"""Migrations run up on SQLite and PostgreSQL, and the models match them exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from ipaas.storage import migrate
from ipaas.storage.db import sync_url
from ipaas.storage.tables import Base


def test_migrations_reach_head_and_match_the_models(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
    migrate.upgrade(database_url)  # a second run (another replica starting) is a no-op

    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"tenants", "api_keys", "workflows", "workflow_versions", "executions", "outbox_tasks"} <= tables
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": False}), Base.metadata)
            assert diff == [], f"models and migrations differ: {diff}"
    finally:
        engine.dispose()


def test_a_database_from_a_newer_release_is_refused_in_one_line(tmp_path) -> None:
    """Started on a database a newer release migrated, `ipaas migrate` and `ipaas core` stop
    without changing it and say why in one line, not in Alembic's traceback."""
    import os
    import socket
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'ipaas.db'}"
    migrate.upgrade(url)
    with create_engine(sync_url(url)).begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "IPAAS_DATABASE_URL": url, "IPAAS_DATA_DIR": str(tmp_path), "IPAAS_GRPC_LISTEN": f"127.0.0.1:{port}", "IPAAS_ENGINE_PROCESSES": "0"}
    for command in ("migrate", "core"):
        done = subprocess.run([sys.executable, "-m", "ipaas", command], env=env, capture_output=True, text=True, timeout=60)
        said = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("{")]  # JSON lines are logs
        failed = 3 if command == "core" else 1  # a server that fails to start exits 3 (see ipaas --help)
        assert done.returncode == failed and len(said) == 1 and "newer release" in said[0], (command, done.returncode, done.stderr[-2000:])
    with create_engine(sync_url(url)).begin() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0099_from_the_future"


def test_migrations_go_down_to_the_first_revision_and_up_again(database_url: str) -> None:
    from alembic import command

    migrate.upgrade(database_url)
    command.downgrade(migrate.alembic_config(database_url), "0001")
    assert migrate.current_revision(database_url) == "0001"
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
