"""Telling a database outage from a bug.

A database that is down, unreachable, full or read-only fails every statement until it
comes back: each caller should get UNAVAILABLE (503, Retry-After) and retry, not INTERNAL,
and the log should say so once a minute, not with a traceback per request and per poll
(an 8 s PostgreSQL outage logged 77 tracebacks)."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from sqlalchemy import exc as sa

from ipaas.throttled_log import ThrottledWarning


def _driver_errors() -> tuple[type[BaseException], ...]:
    # Raised by the drivers themselves where SQLAlchemy does not wrap them (the outbox's
    # LISTEN connection is psycopg's own).
    found: list[type[BaseException]] = [sqlite3.OperationalError]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        found += [psycopg.OperationalError, psycopg.InterfaceError]
    return tuple(found)


_OUTAGES = (sa.OperationalError, sa.InterfaceError, sa.TimeoutError, *_driver_errors())


def is_outage(error: BaseException) -> bool:
    """Refused or lost connections, a pool that cannot connect, a full disk or a read-only
    file (SQLite), serialization failures and deadlocks: the DB-API's OperationalError
    family, which a retry can outlive."""
    return isinstance(error, _OUTAGES) or (isinstance(error, sa.DBAPIError) and error.connection_invalidated)


class OutageLog:
    """`log(error)` is True when the error is an outage, then warned about at most once a
    minute (the error's type only: a driver's message can carry a host or a statement)."""

    def __init__(self, logger: logging.Logger, event: str) -> None:
        self._warn = ThrottledWarning(logger, event)

    def __call__(self, error: BaseException, **fields: Any) -> bool:
        if not is_outage(error):
            return False
        self._warn(error, **fields)
        return True
