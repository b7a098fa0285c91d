"""RenderThreads: what one tenant may hold of an engine's heavy-render threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ipaas.engine.steps import FIRST_HEAVY_SECONDS, RendersBusy, RenderThreads


async def test_a_tenant_has_one_heavy_render_at_a_time_and_its_next_ones_are_lined_up() -> None:
    threads = RenderThreads("test-render", threads=2, queued=2)
    gate = threading.Event()
    try:
        first = asyncio.ensure_future(threads.run(gate.wait, 5, tenant="tn_a"))
        await asyncio.sleep(0)
        waits = []
        for _ in range(3):
            with pytest.raises(RendersBusy) as busy:
                await threads.run(lambda: None, tenant="tn_a")
            waits.append(busy.value.wait)
        # One render's time apart, so a backlog comes back about once each.
        assert [round(w / FIRST_HEAVY_SECONDS) for w in waits] == [1, 2, 3], waits
        assert await threads.run(lambda: "b", tenant="tn_b") == "b", "another tenant is not held up"
        gate.set()
        assert await first is True
        await asyncio.sleep(0.01)  # the release comes from the thread, through the loop
        assert await threads.run(lambda: "a", tenant="tn_a") == "a"
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
