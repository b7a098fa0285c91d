"""One tenant's near-budget templates against another tenant's cheap deliveries, in one
engine: `python -m bench.heavy_renders`.

Measures (a) how long one near-budget render holds the event loop, rendered as the
executor renders it, and (b) the latency (run -> succeeded) of another tenant's cheap
executions, one after the other, alone and while the heavy tenant runs 5 executions a
second (the free tier's rate), plus the longest the loop went without a turn meanwhile.
A real core with its dispatcher in process, on SQLite, a fake Slack on loopback.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ipaas import templates
from tests.conftest import make_settings, start_core
from tests.fakes.slack import FakeSlack
from tests.integration.helpers import Api, slack_step

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}
HEAVY_TEXT = "{{$..zz}}" * 18 + "!"  # allowed at save time; ~180,000 of the 200,000 work budget


def heavy_payload() -> dict[str, Any]:
    return {"items": [{"id": i, "tags": ["a", "b", "c"]} for i in range(2000)]}  # 78 KB


class LoopLag:
    """The longest the loop went without a turn: a 5 ms timer's overshoot."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - started - 0.005)

    def __enter__(self) -> "LoopLag":
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def cheap_latencies(api: Api, workflow_id: str, count: int) -> list[float]:
    out = []
    for n in range(count):
        started = time.perf_counter()
        ex = await api.wait((await api.run(workflow_id, {"order": {"id": n}, "user": {"name": "Ann"}})).execution.id, timeout=60)
        assert ex.status == "succeeded", ex
        out.append(time.perf_counter() - started)
    return out


async def one_render_on_the_loop(server: Any) -> tuple[float, int]:
    """Seconds the executor's render entry held the loop for one heavy render, and the work
    it spent (measured again outside)."""
    executor = server.dispatcher.executor
    step = {"id": "s", "connector": "slack", "action": "send_message", "config": {"text": HEAVY_TEXT}}
    ctx = templates.RenderContext(trigger=heavy_payload())
    budget = templates._Budget(templates.MAX_RENDERED_CHARS)
    templates._render_nested(step["config"], ctx, [], 0, budget)
    threads = getattr(executor, "renders", None)
    blocked = []
    for _ in range(3):
        with LoopLag() as lag:
            await asyncio.sleep(0.02)
            if threads is None:  # the code before the fix: the render runs on the loop
                started = time.perf_counter()
                executor.steps.render(step, ctx)
                blocked.append(time.perf_counter() - started)
            else:
                await executor.steps.render_fairly(step, ctx, threads, "tn_bench")
                await asyncio.sleep(0.02)
                blocked.append(lag.worst)
    return statistics.median(blocked), templates.MAX_TEMPLATE_WORK - budget.work


def summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"median {statistics.median(ms):.0f} ms, p90 {ms[int(len(ms) * 0.9)]:.0f} ms, max {ms[-1]:.0f} ms (n={len(ms)})"


async def main() -> None:
    await scenario(HEAVY_TEXT, "heavy templates")
    await scenario("{{$.items[0].id}}", "the same payloads, a cheap template (the API's share)")


async def scenario(heavy_text: str, title: str) -> None:
    print(f"-- {title}")
    with tempfile.TemporaryDirectory() as tmp:
        async with FakeSlack() as slack:
            async for core in start_core(make_settings(Path(tmp), **FAST)):
                heavy = Api(core.channel, (await core.new_tenant(name="heavy")).md)
                other = Api(core.channel, (await core.new_tenant(name="other")).md)
                hcred = await heavy.credential("slack", {"webhook_url": slack.url})
                ocred = await other.credential("slack", {"webhook_url": slack.url})
                hwf = (await heavy.create({"name": "h", "trigger": {"type": "manual"}, "options": {"max_attempts": 1}, "steps": [slack_step(hcred, heavy_text)]})).workflow
                owf = (await other.create({"name": "o", "trigger": {"type": "manual"}, "steps": [slack_step(ocred)]})).workflow
                if heavy_text == HEAVY_TEXT:
                    blocked, work = await one_render_on_the_loop(core.server)
                    print(f"(a) one render ({work} of {templates.MAX_TEMPLATE_WORK} work): the loop held {blocked * 1000:.0f} ms")
                alone = await cheap_latencies(other, owf.id, 20)
                print(f"(b) other tenant alone:           {summary(alone)}")
                payload = heavy_payload()
                stop = asyncio.Event()

                async def attack() -> int:
                    sent = 0
                    while not stop.is_set():
                        await heavy.run(hwf.id, payload)
                        sent += 1
                        await asyncio.sleep(0.2)
                    return sent

                attacker = asyncio.ensure_future(attack())
                await asyncio.sleep(1.0)
                with LoopLag() as lag:
                    loaded = await cheap_latencies(other, owf.id, 20)
                stop.set()
                sent = await attacker
                print(f"(b) other tenant, heavy at 5/s:   {summary(loaded)}; loop's longest gap {lag.worst * 1000:.0f} ms; {sent} heavy runs sent")


if __name__ == "__main__":
    asyncio.run(main())
