"""How the core reads its engine processes' reports: settings handed down, breakers merged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipaas.engine.processes import EngineProcesses, _Child, child_env
from ipaas.settings import Settings


class _Proc:
    pid = 1


def _with_reports(*reports: dict[str, Any]) -> EngineProcesses:
    processes = EngineProcesses(Settings(), db=None, count=len(reports), workers_each=4)  # type: ignore[arg-type]
    for i, report in enumerate(reports):
        child = _Child(_Proc(), -1)  # type: ignore[arg-type]
        child.status = report
        processes._children[i] = child
    return processes


def test_the_most_open_state_wins_and_tenants_stay_apart() -> None:
    opened = "2026-01-01T00:00:00+00:00"
    processes = _with_reports(
        {"inflight": 2, "processed": 10, "breakers": [["t1", "slack", "closed", 1, 0, None, None], ["t2", "slack", "open", 5, 0, opened, opened]]},
        {"inflight": 1, "processed": 7, "breakers": [["t1", "slack", "open", 5, 0, opened, opened], ["t1", "discord", "closed", 0, 0, None, None]]},
    )
    states = processes.snapshot("t1")
    assert [(s.connector, s.state, s.failure_count) for s in states] == [("discord", "closed", 0), ("slack", "open", 5)]
    assert states[1].opened_at is not None and states[1].opened_at.year == 2026
    assert [s.state for s in processes.snapshot("t3")] == []
    assert (processes.inflight, processes.processed, processes.workers) == (3, 17, 8)


def test_a_child_gets_settings_built_in_code(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/x.db", secret_keys=("k1", "k2"), plugins=frozenset({"slack"}), workers=3, allow_insecure_targets=True, extra={"IPAAS_STEP_TIMEOUT": "5"})
    env = child_env(settings)
    back = Settings.from_env(env)
    assert (back.data_dir, back.database_url, back.secret_keys, back.plugins, back.workers, back.allow_insecure_targets) == (tmp_path, settings.database_url, ("k1", "k2"), frozenset({"slack"}), 3, True)
    assert env["IPAAS_STEP_TIMEOUT"] == "5"


def test_engine_nice_is_a_whole_number_from_0_to_19() -> None:
    from ipaas.service.server import EngineSettings

    assert EngineSettings.from_settings(Settings()).nice == 5
    assert EngineSettings.from_settings(Settings(extra={"IPAAS_ENGINE_NICE": "0"})).nice == 0
    for bad in ("-1", "20", "2.5", "high"):
        with pytest.raises(SystemExit, match="IPAAS_ENGINE_NICE"):
            EngineSettings.from_settings(Settings(extra={"IPAAS_ENGINE_NICE": bad}))


def test_engine_batch_scheduling_is_on_unless_turned_off() -> None:
    from ipaas.service.server import EngineSettings

    assert EngineSettings.from_settings(Settings()).sched_batch is True
    assert EngineSettings.from_settings(Settings(extra={"IPAAS_ENGINE_SCHED_BATCH": "0"})).sched_batch is False
    assert EngineSettings.from_settings(Settings(extra={"IPAAS_ENGINE_SCHED_BATCH": "off"})).sched_batch is False
    with pytest.raises(SystemExit, match="IPAAS_ENGINE_SCHED_BATCH"):
        EngineSettings.from_settings(Settings(extra={"IPAAS_ENGINE_SCHED_BATCH": "maybe"}))


def test_the_breaker_report_skips_clean_breakers_and_is_bounded() -> None:
    # The report walked every breaker each second (230 ms for 100,000 clean ones, on the
    # engine's event loop), and past ~65,000 with a failure its line outgrew what the core
    # reads (4 MiB).
    import orjson

    from ipaas.engine.breakers import BreakerRegistry
    from ipaas.engine.processes import MAX_REPORTED_BREAKERS, MAX_STATUS_LINE, _breakers

    registry = BreakerRegistry()
    for i in range(100_000):
        registry.get(f"tn_{i:026d}", "slack")
    best = min(_timed(lambda: _breakers(registry)) for _ in range(3))
    assert best < 0.005, f"{best * 1000:.1f} ms for 100,000 clean breakers"
    assert _breakers(registry) == []
    for i in range(MAX_REPORTED_BREAKERS + 500):
        registry.get(f"tn_f{i:025d}", "discord").record_failure()
    for tenant in ("tn_open_1", "tn_open_2"):
        for _ in range(5):
            registry.get(tenant, "slack").record_failure()
    report = _breakers(registry)
    assert len(report) == MAX_REPORTED_BREAKERS
    assert {row[0] for row in report[:2]} == {"tn_open_1", "tn_open_2"}, "the most open first"
    assert all(row[2] == "open" or row[3] > 0 for row in report), "only breakers that say something"
    assert len(orjson.dumps({"breakers": report})) < MAX_STATUS_LINE // 16


def _timed(work) -> float:  # type: ignore[no-untyped-def]
    import time

    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def test_finished_counts_add_up_and_malformed_rows_are_skipped() -> None:
    """A child's line carries what it finished since its last line; the core adds them up.
    A row it cannot read is skipped, the rest of the line still counts."""
    processes = _with_reports({})
    processes._count_finished([["succeeded", "slack", 3], ["dead", "slack", 1]])
    processes._count_finished([["succeeded", "slack", 2], ["succeeded", "slack"], ["x", 1, 1], ["failed", "discord", -4], "junk", ["failed", "discord", "2"]])
    processes._count_finished({"not": "a list"})
    assert dict(processes.finished) == {("succeeded", "slack"): 5, ("dead", "slack"): 1}


def test_troubled_breakers_merge_children_per_tenant_and_connector() -> None:
    processes = _with_reports(
        {"breakers": [["t1", "slack", "half_open", 0, 1, None, None], ["t2", "slack", "closed", 2, 0, None, None]]},
        {"breakers": [["t1", "slack", "open", 5, 0, None, None], ["t2", "discord", "half_open", 0, 0, None, None]]},
    )
    assert sorted(processes.troubled_breakers()) == [("t1", "slack", "open"), ("t2", "discord", "half_open"), ("t2", "slack", "closed")]
