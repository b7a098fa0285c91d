"""Load generators: wrk for saturation (when installed), and an open-loop asyncio generator
for latency at a fixed rate (it does not slow down when the server does, so queueing shows
up in the percentiles). gRPC load for the direct-to-core comparison."""

from __future__ import annotations

import asyncio
import gc
import re
import shutil
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import aiohttp

WRK = shutil.which("wrk")


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def wrk(url: str, duration: int, connections: int = 64, threads: int = 2, script: str | None = None, args: Sequence[str] = ()) -> dict[str, float]:
    cmd = [WRK or "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    if args:
        cmd += ["--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "requests": total, "errors": int(non2xx.group(1)) if non2xx else 0}


async def python_saturation(make_request: Callable[[aiohttp.ClientSession, int], Any], duration: float, connections: int = 64) -> dict[str, float]:
    """Closed loop: `connections` workers send back to back (used where wrk is missing)."""
    done = errors = 0
    deadline = time.perf_counter() + duration
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            status = await make_request(session, next(counter))
            done += 1
            errors += status >= 300

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return {"rps": done / elapsed, "requests": done, "errors": errors}


async def fixed_rate(make_request: Callable[[aiohttp.ClientSession, int], Any], rate: float, duration: float, connections: int = 128, warmup: float = 1.0) -> dict[str, float]:
    """Open loop at `rate` req/s; latency measured from the scheduled send time.

    The first `warmup` seconds are sent at the same rate but not counted (their requests
    get negative numbers, so a sender can mark them): at the start every request opens a
    new connection, and that ramp of the load generator's pool is not the platform's
    latency (wrk2 leaves out its first 10 s for the same reason)."""
    latencies: list[float] = []
    errors = warmup_errors = 0
    skip = int(rate * warmup)
    total = int(rate * duration)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def one(i: int) -> None:
            nonlocal errors, warmup_errors
            scheduled = start + (i + skip) / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            status = await make_request(session, i)
            if i < 0:
                warmup_errors += status >= 300
                return
            latencies.append(time.perf_counter() - scheduled)
            errors += status >= 300

        requests = [one(i) for i in range(-skip, total)]
        # The generator's own full collections (walking every request's coroutine, made up
        # front) would delay sends and count as the platform's latency.
        gc.collect()
        gc.freeze()
        start = time.perf_counter()  # read by each request when it first runs, below
        try:
            await asyncio.gather(*requests)
        finally:
            gc.unfreeze()
    return {
        "rate": rate,
        "requests": total,
        "warmup_requests": skip,
        "warmup_errors": warmup_errors,
        "errors": errors,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }
