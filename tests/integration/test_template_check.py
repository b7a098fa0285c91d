"""Workflows an older release saved with templates this one refuses: `ipaas workflows check`
names each, and a dry run of one says why its step fails, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import insert, update

from ipaas.storage.db import Database
from ipaas.storage.tables import Workflow, WorkflowVersion, utcnow
from ipaas.v1 import executions_pb2 as pb
from ipaas.v1 import workflows_pb2
from tests.integration.helpers import Api, slack_step, value
from tests.integration.test_cli import run_cli

REFUSED = "{{$.items[?@.price > $.min].sku}}"  # the review's: a filter reading the root


async def _store_as_an_old_release(database_url: str, workflow_id: str, tenant_id: str, definition: dict) -> int:
    """A new current version written straight to the database, unvalidated, as a release
    that accepted the template would have saved it."""
    db = Database(database_url)
    try:

        def write(conn) -> int:  # type: ignore[no-untyped-def]
            version = conn.execute(update(Workflow).where(Workflow.id == workflow_id).values(current_version=Workflow.current_version + 1).returning(Workflow.current_version)).scalar_one()
            conn.execute(insert(WorkflowVersion).values(workflow_id=workflow_id, version=version, tenant_id=tenant_id, definition=definition, created_at=utcnow()))
            return version

        return await db.transaction(write)
    finally:
        await db.dispose()


async def test_workflows_check_names_each_workflow_stored_with_a_refused_template(any_core, database_url: str, tmp_path: Path) -> None:
    tenant = await any_core.new_tenant()
    api = Api(any_core.channel, tenant.md)
    cred = await api.credential("slack", {"webhook_url": "http://127.0.0.1:9/unreachable"})

    def definition(name: str, text: str) -> dict:
        return {"name": name, "trigger": {"type": "manual"}, "options": {}, "steps": [{**slack_step(cred), "config": {"text": text}}]}

    async def created(name: str) -> str:
        return (await api.create(definition(name, "Order {{order.id}}"))).workflow.id

    old, fixed, gone, fine = [await created(name) for name in ("old", "fixed", "gone", "fine")]
    version = await _store_as_an_old_release(database_url, old, tenant.tenant_id, definition("old", f"cheapest: {REFUSED}"))
    # Refused in an older version only: its current one renders.
    await _store_as_an_old_release(database_url, fixed, tenant.tenant_id, definition("fixed", REFUSED))
    await _store_as_an_old_release(database_url, fixed, tenant.tenant_id, definition("fixed", "{{$.items[?@.price > 10].sku}}"))
    await _store_as_an_old_release(database_url, gone, tenant.tenant_id, definition("gone", REFUSED))
    await api.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=gone), metadata=api.md)

    env = {"IPAAS_DATABASE_URL": database_url}
    done = run_cli("workflows", "check", "--batch-size", "1", cwd=tmp_path, **env)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith(f"tenant {tenant.tenant_id} workflow {old} version {version}: step notify steps[0].config.text: ")
    assert "invalid JSONPath '$.items[?@.price > $.min].sku'" in lines[0] and "a filter may only read the item it tests" in lines[0], lines[0]
    assert done.returncode == 1 and "error: 1 workflow would fail every execution" in done.stderr, done.stderr

    as_json = run_cli("workflows", "check", "--json", cwd=tmp_path, **env)
    [found] = json.loads(as_json.stdout)
    assert (found["tenant_id"], found["workflow_id"], found["version"]) == (tenant.tenant_id, old, version)
    assert [(t["step_id"], t["where"]) for t in found["refused"]] == [("notify", "steps[0].config.text")]

    # The tenant's view: a dry run of the stored workflow fails its step, saying why.
    answer = await api.executions.DryRun(pb.DryRunRequest(workflow_id=old, payload=value({"min": 10, "items": []})), metadata=api.md)
    assert (answer.ok, answer.steps[0].status) == (False, "failed")
    assert "a filter may only read the item it tests" in answer.steps[0].message, answer.steps[0].message
    assert (await api.executions.DryRun(pb.DryRunRequest(workflow_id=fine, payload=value({"order": {"id": 1}})), metadata=api.md)).ok

    await api.workflows.DeleteWorkflow(workflows_pb2.DeleteWorkflowRequest(id=old), metadata=api.md)
    clean = run_cli("workflows", "check", cwd=tmp_path, **env)
    assert (clean.returncode, clean.stdout) == (0, "no workflow's current version holds a template this release refuses\n"), clean.stderr
