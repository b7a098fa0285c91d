"""Breaker transitions with a fake clock: the seeds' policy exactly."""

from __future__ import annotations

import pytest

from ipaas.engine.breakers import BreakerPolicy, BreakerRegistry, Trial


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    clock = Clock()
    changes: list[tuple[tuple[str, str], str, str]] = []
    registry = BreakerRegistry(clock=clock, on_change=lambda key, old, new: changes.append((key, old, new)))
    return clock, registry, changes


def fail(breaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow() is None
        breaker.record_failure()


def test_opens_after_exactly_five_consecutive_failures(setup) -> None:
    _clock, registry, changes = setup
    b = registry.get("tn_a", "slack")
    fail(b, 4)
    assert b.state == "closed"
    b.record_success()  # a success resets the count
    fail(b, 4)
    assert b.state == "closed"
    fail(b, 1)
    assert b.state == "open"
    assert changes == [(("tn_a", "slack"), "closed", "open")]


def test_open_refuses_until_sixty_seconds_then_half_opens(setup) -> None:
    clock, registry, changes = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    assert b.allow() == pytest.approx(60.0)
    clock.now += 59.5
    assert b.allow() == pytest.approx(0.5)
    clock.now += 0.5
    assert b.allow() is None
    assert b.state == "half_open"
    assert changes[-1] == (("tn_a", "slack"), "open", "half_open")


def test_three_successes_close_a_half_open_breaker(setup) -> None:
    clock, registry, changes = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    clock.now += 60
    for i in range(3):
        assert b.allow() is None
        assert b.state == "half_open"
        b.record_success()
    assert b.state == "closed"
    assert [c[1:] for c in changes] == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_half_open_allows_only_a_few_trials_at_once(setup) -> None:
    clock, registry, _ = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    clock.now += 60
    assert [b.allow() for _ in range(3)] == [None, None, None]
    assert b.allow() is not None, "a fourth concurrent trial waits"


def test_any_failure_in_half_open_reopens_for_a_fresh_minute(setup) -> None:
    clock, registry, changes = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    clock.now += 60
    assert b.allow() is None
    b.record_success()
    assert b.allow() is None
    b.record_failure()
    assert b.state == "open"
    assert b.allow() == pytest.approx(60.0)
    assert changes[-1][1:] == ("half_open", "open")


def test_tenants_are_isolated(setup) -> None:
    _clock, registry, _ = setup
    fail(registry.get("tn_a", "slack"), 5)
    assert registry.get("tn_a", "slack").state == "open"
    assert registry.get("tn_b", "slack").state == "closed"
    assert registry.get("tn_b", "slack").allow() is None
    assert [s.connector for s in registry.snapshot("tn_b")] == ["slack"]
    (state,) = registry.snapshot("tn_a")
    assert (state.state, state.failure_count) == ("open", 5) and state.opened_at is not None


def test_thresholds_are_configurable() -> None:
    clock = Clock()
    registry = BreakerRegistry(BreakerPolicy(failure_threshold=2, recovery_timeout=5, success_threshold=1), clock=clock)
    b = registry.get("t", "c")
    fail(b, 2)
    assert b.state == "open"
    clock.now += 5
    assert b.allow() is None
    b.record_success()
    assert b.state == "closed"


def test_a_trial_given_back_without_an_outcome_frees_its_slot(setup) -> None:
    # A trial that ends in neither success nor failure (a permanent error, a template error,
    # the deadline, a cancellation) used to keep its slot: after three, half-open refused
    # every call for good and the upstream was never tried again.
    clock, registry, _ = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    clock.now += 60
    for _ in range(10):
        assert b.allow() is None, "a released slot can be taken again"
        b.release_trial()
    assert b.state == "half_open" and b.snapshot().success_count == 0
    for _ in range(3):
        assert b.allow() is None
        b.record_success()
    assert b.state == "closed"


def test_a_trial_settles_exactly_once(setup) -> None:
    clock, registry, _ = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    clock.now += 60
    trials = []
    for _ in range(3):
        assert b.allow() is None
        trials.append(Trial(b))
    assert b.allow() is not None, "a fourth concurrent trial waits"
    trials[0].success()
    trials[0].release()  # the executor's finally after an outcome: nothing more to give back
    trials[1].release()
    trials[1].release()
    assert [b.allow() for _ in range(3)] == [None, None, pytest.approx(60.0)], "two slots came back, once each"
    trials[2].failure()
    assert b.state == "open"


def test_releasing_outside_half_open_changes_nothing(setup) -> None:
    clock, registry, _ = setup
    b = registry.get("tn_a", "slack")
    fail(b, 4)
    b.release_trial()
    assert b.state == "closed" and b.snapshot().failure_count == 4
    fail(b, 1)
    b.release_trial()
    assert b.state == "open" and b.allow() == pytest.approx(60.0)


def test_half_open_with_every_slot_taken_defers_until_the_trials_must_have_settled(setup) -> None:
    # A call that found the trial slots taken was told to come back in a second: every
    # queued task of the tenant and connector was claimed and requeued each second until
    # the trials settled, up to the step timeout.
    clock, registry, _ = setup
    b = registry.get("tn_a", "slack")
    fail(b, 5)
    clock.now += 60
    assert [b.allow(30.0) for _ in range(3)] == [None, None, None]
    assert b.allow(30.0) == pytest.approx(30.0), "until the last trial's call has timed out"
    clock.now += 12
    assert b.allow(30.0) == pytest.approx(18.0)
    clock.now += 30
    assert b.allow(30.0) == pytest.approx(1.0), "trials past their timeout are being recorded: ask again soon"
    b.release_trial()
    assert b.allow(30.0) is None, "a slot given back is taken at once"


def test_deferrals_are_spread_out_never_earlier() -> None:
    # The whole backlog deferred to the instant a breaker half-opens came due at once.
    from ipaas.engine.breakers import spread

    waits = [spread(60.0) for _ in range(2000)]
    assert min(waits) >= 60.0, "sooner than the breaker asked, a task would only be deferred again"
    assert max(waits) <= 75.0
    assert len({round(w) for w in waits}) >= 10, "spread over the window, not at one instant"


def test_clean_breakers_are_forgotten_and_the_others_kept() -> None:
    # The registry kept every (tenant, connector) it ever saw, ~900 bytes each, for good.
    import tracemalloc

    clock = Clock()
    registry = BreakerRegistry(clock=clock)
    failing = registry.get("tn_failing", "slack")
    fail(failing, 4)
    busy = registry.get("tn_busy", "slack")
    assert busy.allow() is None  # a call in flight across every sweep below
    tracemalloc.start()
    try:
        for i in range(100_000):
            b = registry.get(f"tn_{i:026d}", "slack")
            assert b.allow() is None
            Trial(b).success()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(registry) < 1000, len(registry)
    assert held < 1_000_000, f"{held} bytes held after 100,000 clean breakers"
    assert registry.get("tn_failing", "slack") is failing and failing.snapshot().failure_count == 4
    fail(failing, 1)
    assert failing.state == "open", "the failures counted before survive: the fifth opens it"
    assert registry.get("tn_busy", "slack") is busy, "the call in flight settles on the breaker later calls ask"
    busy.record_failure()
    assert registry.get("tn_busy", "slack").snapshot().failure_count == 1
