"""RenderThreads: what one tenant may hold of an engine's heavy-render threads."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import pytest

from ipaas.engine.steps import RendersBusy, RenderThreads


async def test_a_tenant_whose_renders_are_long_has_its_next_ones_lined_up_at_once() -> None:
    """Once its renders are timed long (here 0.3 s, past SHORT_WAIT), a tenant's next ones
    are refused at once, lined up one render's time apart, while another tenant renders."""
    threads = RenderThreads("test-render", threads=2, queued=2)
    gate = threading.Event()
    try:
        await threads.run(time.sleep, 0.3, tenant="tn_a")
        first = asyncio.ensure_future(threads.run(gate.wait, 5, tenant="tn_a"))
        await asyncio.sleep(0)
        waits = []
        for _ in range(3):
            asked = time.monotonic()
            with pytest.raises(RendersBusy) as busy:
                await threads.run(lambda: None, tenant="tn_a")
            assert time.monotonic() - asked < 0.05, "a long wait is not waited for in process"
            waits.append(busy.value.wait)
        # One render's time apart, so a backlog comes back about once each.
        assert 0.29 < waits[0] < 0.4 and [round(w / waits[0]) for w in waits] == [1, 2, 3], waits
        assert await threads.run(lambda: "b", tenant="tn_b") == "b", "another tenant is not held up"
        gate.set()
        assert await first is True
        await asyncio.sleep(0.01)  # the release comes from the thread, through the loop
        assert await threads.run(lambda: "a", tenant="tn_a") == "a"
    finally:
        gate.set()
        threads.close()


def _spans() -> tuple[list[tuple[float, float]], Callable[[float], None]]:
    spans: list[tuple[float, float]] = []

    def render(seconds: float) -> None:
        started = time.monotonic()
        time.sleep(seconds)
        spans.append((started, time.monotonic()))

    return spans, render


async def test_a_tenants_moderate_renders_wait_their_turn_in_process_one_at_a_time() -> None:
    """Eight ~10 ms heavy renders of one tenant at once: before, one rendered and seven were
    refused (deferred 0.5 to 3.5 s each). Now all render, one after the other, in about
    their own time: first before any was timed, then again once they were."""
    threads = RenderThreads("test-render")
    spans, render = _spans()
    try:
        for _ in range(2):
            started = time.monotonic()
            await asyncio.gather(*(threads.run(render, 0.01, tenant="tn_a") for _ in range(8)))
            took = time.monotonic() - started
            assert took < 0.5, f"eight 10 ms renders took {took:.2f} s"
        spans.sort()
        assert len(spans) == 16 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two renders of one tenant overlapped: {spans}"
        assert threads._under_way == 0 and not threads._waiting and not threads._tenants
    finally:
        threads.close()


async def test_renders_wait_in_process_for_a_free_thread_when_the_pool_is_busy() -> None:
    threads = RenderThreads("test-render", threads=1, queued=1)
    spans, render = _spans()
    try:
        await asyncio.gather(*(threads.run(render, 0.01, tenant=t) for t in ("tn_a", "tn_b", "tn_c", "tn_d", "tn_a")))
        assert len(spans) == 5
    finally:
        threads.close()


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    """Cancelled while it waits, or just after its turn was granted (before it resumed),
    a render leaves its turn to the next one and holds nothing."""
    threads = RenderThreads("test-render")
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(threads.run(gate.wait, 5, tenant="tn_a"))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(threads.run(lambda n=n: n, tenant="tn_a")) for n in range(3)]
        await asyncio.sleep(0.01)
        waiting[0].cancel()  # while it waits
        wake = getattr(threads, "_wake", lambda: None)

        def wake_then_cancel() -> None:  # granted its turn, then cancelled before it resumes
            wake()
            if not waiting[1].done():
                waiting[1].cancel()

        threads._wake = wake_then_cancel  # type: ignore[attr-defined]
        gate.set()
        assert await first is True
        assert await waiting[2] == 2
        assert waiting[0].cancelled() and waiting[1].cancelled()
        await asyncio.sleep(0.01)
        assert threads._under_way == 0 and not threads._waiting and not threads._tenants
        assert await threads.run(lambda: "a", tenant="tn_a") == "a"
    finally:
        gate.set()
        threads.close()


async def test_a_wait_longer_than_expected_ends_in_a_refusal_and_few_wait() -> None:
    """A tenant not timed yet whose render turns out long: its next renders wait at most
    LONGEST_WAIT (0.3 s), then are refused (and deferred); beyond MOST_WAITING (8) at
    once, refused at once."""
    threads = RenderThreads("test-render")
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(threads.run(gate.wait, 5, tenant="tn_a"))
        await asyncio.sleep(0)
        started = time.monotonic()
        waiting = [asyncio.ensure_future(threads.run(lambda: None, tenant="tn_a")) for _ in range(8)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting), "refused at once"
        with pytest.raises(RendersBusy):
            await threads.run(lambda: None, tenant="tn_a")  # a ninth: refused at once
        for waiter in waiting:
            with pytest.raises(RendersBusy):
                await waiter
        assert 0.25 < time.monotonic() - started < 0.7
        assert not threads._waiting
        gate.set()
        assert await first is True
    finally:
        gate.set()
        threads.close()


async def test_renders_beyond_the_threads_and_their_queue_are_refused() -> None:
    threads = RenderThreads("test-render", threads=1, queued=1)
    gate = threading.Event()
    try:
        held = [asyncio.ensure_future(threads.run(gate.wait, 5, tenant=t)) for t in ("tn_a", "tn_b")]
        await asyncio.sleep(0)
        with pytest.raises(RendersBusy):
            await threads.run(lambda: None, tenant="tn_c")
        gate.set()
        assert await asyncio.gather(*held) == [True, True]
    finally:
        gate.set()
        threads.close()


async def test_a_render_whose_caller_stopped_waiting_holds_its_tenants_turn_until_it_ends() -> None:
    """A cancelled execution's render goes on in its thread: the tenant may not start
    another meanwhile."""
    threads = RenderThreads("test-render")
    gate = threading.Event()
    try:
        waiting = asyncio.ensure_future(threads.run(gate.wait, 5, tenant="tn_a"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0.01)
        with pytest.raises(RendersBusy):
            await threads.run(lambda: None, tenant="tn_a")
        gate.set()
        await asyncio.sleep(0.05)
        assert await threads.run(lambda: 1, tenant="tn_a") == 1
    finally:
        gate.set()
        threads.close()


async def test_a_closed_pool_refuses_renders_as_busy() -> None:
    """The engine is stopping: the execution goes back to the queue (RendersBusy), not
    failed by a RuntimeError from a shut-down pool."""
    threads = RenderThreads("test-render")
    threads.close()
    with pytest.raises(RendersBusy):
        await threads.run(lambda: None, tenant="tn_a")


async def test_the_gil_changes_hands_more_often_only_while_a_heavy_render_runs() -> None:
    """The event loop waited up to CPython's 5 ms for the GIL each time it woke while a
    render thread held it: another tenant's deliveries took 0.8 s instead of 0.07 s."""
    import sys

    from ipaas.engine import steps

    threads = RenderThreads("test-switch")
    before = sys.getswitchinterval()
    seen: list[float] = []
    release = threading.Event()

    def render() -> str:
        seen.append(sys.getswitchinterval())
        release.wait(5)
        return "done"

    try:
        first = asyncio.ensure_future(threads.run(render, tenant="tn_a"))
        second = asyncio.ensure_future(threads.run(render, tenant="tn_b"))
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        release.set()
        assert await first == await second == "done"
    finally:
        threads.close()
    assert seen == pytest.approx([steps.RENDER_SWITCH_INTERVAL] * 2, rel=0.01)
    assert sys.getswitchinterval() == before, "restored once no render runs"
