"""Concurrent cache misses share one load; a caller that gives up does not cancel it."""

from __future__ import annotations

import asyncio

import pytest

from ipaas.singleflight import SingleFlight


async def test_concurrent_callers_share_one_load() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    loads = 0
    gate = asyncio.Event()

    async def load() -> int:
        nonlocal loads
        loads += 1
        await gate.wait()
        return 42

    waiting = [asyncio.create_task(flights.do("k", load)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == [42] * 50
    assert loads == 1
    assert await flights.do("k", load) == 42 and loads == 2, "a finished load is not reused: caching is the caller's"


async def test_a_cancelled_caller_leaves_the_load_to_the_others() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    gate = asyncio.Event()

    async def load() -> str:
        await gate.wait()
        return "done"

    quitter = asyncio.create_task(flights.do("k", load))
    stayer = asyncio.create_task(flights.do("k", load))
    await asyncio.sleep(0)
    quitter.cancel()
    gate.set()
    assert await stayer == "done"
    with pytest.raises(asyncio.CancelledError):
        await quitter


async def test_a_failed_load_reaches_every_caller() -> None:
    flights: SingleFlight[str, int] = SingleFlight()

    async def load() -> int:
        await asyncio.sleep(0)
        raise RuntimeError("database down")

    results = await asyncio.gather(*(flights.do("k", load) for _ in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError] * 3
