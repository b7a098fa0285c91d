"""Micro-benchmarks of hot-path pieces, in µs per operation."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ipaas.logs import JsonFormatter
from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import Action, ActionResult, Connector
from ipaas.templates import RenderContext, render_config


def per_op(fn: Callable[[], object], n: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def run_all() -> dict[str, float]:
    ctx = RenderContext(trigger={"user": {"name": "Alex"}, "order": {"id": "12345", "items": [{"name": "Book"}]}}, steps={"weather": {"temperature": 21.5}})
    config = {"text": "Hello {{user.name}}, order {{order.id}} ({{order.items.#}} items), {{steps.weather.temperature}}°C", "username": "bot"}
    results = {"template render (cached, 4 paths)": per_op(lambda: render_config(config, ctx), 20000)}

    async def echo(c):  # type: ignore[no-untyped-def]
        return ActionResult(output={"ok": True})

    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(Connector(name="echo", version="1", description="d", actions=[Action("echo", "e", echo)]), "bench")

    async def dispatch(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            c = registry.context("echo", {"a": 1}, {"token": "secret-value-123"}, 5.0)
            await registry.invoke("echo", "echo", c)
        return (time.perf_counter() - started) / n * 1e6

    results["plugin dispatch (context + invoke)"] = asyncio.run(dispatch(5000))
    results["step render (StepRunner.render_fairly, cheap: on the loop)"] = asyncio.run(step_render(registry, config, ctx, 20000))
    record = logging.LogRecord("ipaas.engine", logging.INFO, __file__, 1, "execution.finished", None, None)
    record.__dict__.update({"execution_id": "ex_01jd3k4m5n6p7q8r9s0t1v2w3x", "workflow_id": "wf_01jd3k4m5n6p7q8r9s0t1v2w3x", "status": "succeeded", "duration_ms": 123, "config": {"webhook_url": "https://hooks.slack.com/services/T0/B0/XYZ", "text": "Order 42 for alex@example.com"}})
    formatter = JsonFormatter()
    results["masked JSON log record"] = per_op(lambda: formatter.format(record), 20000)
    results["rate limit check (memory, moving window, ~500 in window)"] = asyncio.run(limiter_check(5000))
    results["gateway metrics per request (route, count, duration)"] = gateway_metrics(100_000)
    return results


async def step_render(registry: ConnectorRegistry, config: dict, ctx: RenderContext, n: int) -> float:
    """What the executor does to render a cheap step: within INLINE_TEMPLATE_WORK it stays on
    the loop (no thread hop), so it should cost what render_config does plus the schema."""
    from ipaas.engine.steps import RenderThreads, StepRunner

    steps, threads = StepRunner(registry, None), RenderThreads("ipaas-bench-render")  # type: ignore[arg-type]
    step = {"id": "s", "connector": "echo", "action": "echo", "config": config}
    await steps.render_fairly(step, ctx, threads, "tn_bench")
    started = time.perf_counter()
    for _ in range(n):
        await steps.render_fairly(step, ctx, threads, "tn_bench")
    threads.close()
    return (time.perf_counter() - started) / n * 1e6


def gateway_metrics(n: int) -> float:
    """What the gateway's instrumentation adds to one request: the route noted in the scope,
    two clock reads, a counter and a histogram (metrics on), less the same path with
    IPAAS_METRICS=0."""
    from ipaas.gateway import metrics
    from ipaas.gateway.routes import Router

    templates = [r.template for r in Router().routes]
    on = metrics.GatewayMetrics(templates, ["/health", "/metrics"], ["free", "paid", "anonymous"], ["UNAVAILABLE"])
    off = metrics.NoMetrics()
    clock = time.perf_counter

    def request(m: metrics.GatewayMetrics | metrics.NoMetrics) -> Callable[[], None]:
        scope = {"type": "http", "method": "GET", "path": "/api/workflows/wf_01jd3k4m5n6p7q8r9s0t1v2w3x"}

        def one() -> None:
            started = clock()
            scope[metrics.ROUTE] = "/api/workflows/{id}"
            m.observe(scope, 200, clock() - started)

        return one

    return max(per_op(request(on), n) - per_op(request(off), n), 0.0)


async def limiter_check(n: int) -> float:
    """One tenant at ~500 req/s (the window holds that many hits), as under the ingest bench."""
    from ipaas.gateway.ratelimit import RateLimiter, Tier

    limiter = RateLimiter({"paid": Tier("paid", 1_000_000.0, 1_000_000)})
    for _ in range(500):
        await limiter.check("tn_bench", "paid")
    started = time.perf_counter()
    for _ in range(n):
        await limiter.check("tn_bench", "paid")
    return (time.perf_counter() - started) / n * 1e6
