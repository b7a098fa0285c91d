"""Apply and inspect Alembic migrations (used by `ipaas migrate` and at start-up)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from ipaas.storage.db import ensure_sqlite_dir, install_sqlite_pragmas, sync_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url(url).render_as_string(hide_password=False))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to `revision`. Safe to run concurrently from several replicas on
    PostgreSQL: Alembic's version table update conflicts rather than applying twice."""
    ensure_sqlite_dir(url)
    engine = create_engine(sync_url(url))
    if engine.dialect.name == "sqlite":
        install_sqlite_pragmas(engine)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Serialise concurrent start-ups of several replicas.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724011)")
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, revision)
            except CommandError as exc:
                if "Can't locate revision" not in str(exc):
                    raise
                # The database was migrated by a newer release: nothing is changed, and the
                # operator gets one line saying so instead of Alembic's traceback.
                raise SystemExit(f"the database is at a schema revision this version of simple-ipaas does not know ({exc}): it was migrated by a newer release; run that release, or restore a backup taken before the upgrade") from None
    finally:
        engine.dispose()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() or ""


def current_revision(url: str) -> str | None:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
