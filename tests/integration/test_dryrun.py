"""DryRun's own checks of what it is asked to try, through a real core."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from ipaas.v1 import executions_pb2 as pb
from ipaas.v1 import workflows_pb2
from tests.conftest import make_settings, start_core
from tests.integration.helpers import Api, slack_step, value, workflow


async def test_a_dry_run_of_a_negative_version_is_bad_input(core) -> None:
    """Before, NOT_FOUND, as if the workflow did not exist; GetWorkflowVersion already said this."""
    api = Api(core.channel, (await core.new_tenant()).md)
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    wf = (await api.create({"name": "man", "trigger": {"type": "manual"}, "steps": [slack_step(cred)]})).workflow
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.executions.DryRun(pb.DryRunRequest(workflow_id=wf.id, version=-1), metadata=api.md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "version: must be 1 or more, or 0 for the current version"
    current = await api.executions.DryRun(pb.DryRunRequest(workflow_id=wf.id, version=0, payload=value({"order": {"id": 1}})), metadata=api.md)
    assert current.ok, current


def _items(n: int) -> dict:
    return {"items": [{"a": i} for i in range(n)]}


async def test_a_dry_run_with_a_query_per_item_in_a_filter_is_refused_at_once(core) -> None:
    """The audit's preview: this template and a 26 KB payload held the core's event loop for
    30 s and more, every tenant's calls timing out meanwhile."""
    api = Api(core.channel, (await core.new_tenant()).md)
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    definition = {"name": "dos", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "{{$..[?count($..*) > 0]}}")]}
    request = pb.DryRunRequest(workflow=workflow(definition), payload=value(_items(2500)), mode="preview")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(api.executions.DryRun(request, metadata=api.md), 5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a filter may only read the item it tests" in caught.value.details()
    assert (await api.executions.DryRun(pb.DryRunRequest(workflow=workflow({**definition, "steps": [slack_step(cred)]})), metadata=api.md)).ok


async def test_a_dry_run_past_the_template_work_budget_fails_its_step_quickly(core) -> None:
    """Linear paths, but many: 200 `{{$..zz}}` over 2,500 items rendered for seconds."""
    api = Api(core.channel, (await core.new_tenant()).md)
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    definition = {"name": "wide", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "{{$..zz}}" * 200)]}
    request = pb.DryRunRequest(workflow=workflow(definition), payload=value(_items(2500)), mode="preview")
    answer = await asyncio.wait_for(api.executions.DryRun(request, metadata=api.md), 5)
    assert (answer.ok, answer.steps[0].status) == (False, "failed")
    assert "templates visit too much of the payload" in answer.steps[0].message


async def test_a_long_preview_render_leaves_the_core_serving_other_calls(core, monkeypatch: pytest.MonkeyPatch) -> None:
    """A render runs off the core's event loop: another tenant's call is answered while it
    goes on (before, it waited for the render to end)."""
    monkeypatch.setattr("ipaas.templates.MAX_TEMPLATE_WORK", 10**9)  # a render of seconds, allowed
    attacker = Api(core.channel, (await core.new_tenant(name="a")).md)
    other = Api(core.channel, (await core.new_tenant(name="b")).md)
    cred = await attacker.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
    definition = {"name": "slow", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "{{$..zz}}" * 100 + "done")]}
    preview = asyncio.ensure_future(
        attacker.executions.DryRun(pb.DryRunRequest(workflow=workflow(definition), payload=value(_items(5000))), metadata=attacker.md)
    )
    await asyncio.sleep(0.3)  # the render has started
    assert not preview.done()
    await other.workflows.ListWorkflows(workflows_pb2.ListWorkflowsRequest(), metadata=other.md)
    assert not preview.done(), "the other call waited for the preview to render"
    answer = await asyncio.wait_for(preview, 60)
    assert answer.ok and answer.steps[0].rendered_config["text"] == "done"


def _render_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ipaas-dryrun-render")]


async def test_a_stopped_core_leaves_no_dry_run_render_threads(tmp_path) -> None:
    """Before, the render pool outlived the core: its idle threads stayed (one set per core
    started in a process) and the interpreter waited for them at exit."""
    async for running in start_core(make_settings(tmp_path)):
        api = Api(running.channel, (await running.new_tenant()).md)
        cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})
        # Past the work a render may do on the loop (a cheap one never reaches the threads).
        definition = {"name": "man", "trigger": {"type": "manual"}, "steps": [slack_step(cred, "{{$..zz}} done")]}
        request = pb.DryRunRequest(workflow=workflow(definition), payload=value(_items(1000)))
        await asyncio.gather(*(api.executions.DryRun(request, metadata=api.md) for _ in range(4)))
        pool = running.server.executions.dry_runner._renders._pool
        ours = [t for t in _render_threads() if t in pool._threads]
        assert ours, "the previews rendered on the pool's threads"
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in ours) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(t.is_alive() for t in ours), "the render threads stopped with the core"
