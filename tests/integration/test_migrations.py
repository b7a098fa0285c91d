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
