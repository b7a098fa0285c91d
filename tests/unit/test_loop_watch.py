"""A blocked event loop is reported once, naming where it is stuck and, when a connector's
action blocks it, which connector and whose execution."""

from __future__ import annotations

import asyncio
import logging
import time
import types

import pytest

from ipaas.loop_watch import LoopWatch
from ipaas.plugin_host import load_registry
from ipaas.sdk import Action, ActionResult, Connector, hookimpl


def blocking_connector() -> types.SimpleNamespace:
    async def send_with_requests(ctx):  # type: ignore[no-untyped-def]
        time.sleep(0.8)  # what an action calling a synchronous HTTP client does
        return ActionResult(message="sent")

    @hookimpl
    def ipaas_register_connectors(register):  # type: ignore[no-untyped-def]
        register(Connector(name="legacy", version="1.0", description="d", actions=[Action("send", "Send.", send_with_requests, {"type": "object"})]))

    return types.SimpleNamespace(ipaas_register_connectors=ipaas_register_connectors)


async def test_a_blocking_action_is_reported_with_its_place_connector_and_execution(caplog: pytest.LogCaptureFixture) -> None:
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-legacy", blocking_connector())])
    ctx = registry.context("legacy", {}, {}, 5, tenant_id="tn_1", execution_id="ex_1", step_id="notify")
    watch = LoopWatch(asyncio.get_running_loop(), blocked_after=0.3, beat=0.05)
    watch.start()
    try:
        with caplog.at_level(logging.WARNING, logger="ipaas.loop"):
            await asyncio.create_task(registry.invoke("legacy", "send", ctx), name="step")
            await asyncio.sleep(0.3)
    finally:
        watch.stop()
        await registry.aclose()
    (record,) = [r for r in caplog.records if r.getMessage() == "loop.blocked"]
    fields = record.__dict__
    assert fields["seconds"] >= 0.3
    assert fields["where"].split(" > ")[-1].startswith("send_with_requests ("), fields["where"]
    assert {k: fields[k] for k in ("connector", "action", "tenant_id", "execution_id", "step_id", "task")} == {
        "connector": "legacy",
        "action": "send",
        "tenant_id": "tn_1",
        "execution_id": "ex_1",
        "step_id": "notify",
        "task": "step",
    }


async def test_a_loop_that_keeps_turning_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(asyncio.get_running_loop(), blocked_after=0.3, beat=0.05)
    watch.start()
    try:
        with caplog.at_level(logging.WARNING, logger="ipaas.loop"):
            for _ in range(10):
                await asyncio.sleep(0.05)
    finally:
        watch.stop()
    assert not [r for r in caplog.records if r.getMessage() == "loop.blocked"]
