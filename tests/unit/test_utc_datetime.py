"""UTC datetimes bind on SQLite exactly as SQLAlchemy's own DATETIME chain binds them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from ipaas.storage.tables import UTCDateTime

SAMPLES = [
    datetime(2026, 11, 30, 15, 28, 28, 123456, tzinfo=timezone.utc),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),  # no microseconds: still written
    datetime(2026, 6, 30, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7))),  # crosses midnight in UTC
    datetime(999, 1, 1, tzinfo=timezone.utc),
    None,
]


def test_the_fused_sqlite_binder_matches_the_standard_chain() -> None:
    dialect = sqlite.dialect()
    fused = UTCDateTime().bind_processor(dialect)
    sqlite_datetime = sqlite.DATETIME().bind_processor(dialect)
    assert fused is not None and sqlite_datetime is not None

    def standard(value):  # type: ignore[no-untyped-def]
        return sqlite_datetime(UTCDateTime().process_bind_param(value, dialect))

    assert [fused(v) for v in SAMPLES] == [standard(v) for v in SAMPLES]
    # And the processor SQLAlchemy resolves for a table's column is the fused one.
    from ipaas.storage.tables import Execution

    assert Execution.__table__.c.created_at.type._cached_bind_processor(dialect).__qualname__ == "UTCDateTime.bind_processor.<locals>.process"
    assert fused(SAMPLES[2]) == "2026-07-01 06:59:59.999999"
    with pytest.raises(ValueError, match="naive"):
        fused(datetime(2026, 1, 1))


def test_other_dialects_keep_the_standard_chain() -> None:
    binder = UTCDateTime().bind_processor(postgresql.dialect())
    value = SAMPLES[2]
    assert (binder(value) if binder else UTCDateTime().process_bind_param(value, postgresql.dialect())) == value
