"""`ipaas workflows check`: the live workflows whose current version holds a template this
release refuses (docs/operating.md, "Upgrading").

A release may refuse templates an older one saved: JSONPath filters that read more than the
item they test (`$.items[?@.price > $.min]`), `$.a[$.b]`, `&` (ipaas.templates). A stored
version is never rewritten, so each execution of such a workflow fails its step; this names
them before they do. It only reads, a batch of workflows at a time, and prints what the
definition says (the template's path and the reason), never a payload or a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator

from sqlalchemy import Connection, select

from ipaas.definitions import _strings
from ipaas.storage.db import Database
from ipaas.storage.tables import Workflow, WorkflowVersion
from ipaas.templates import validate_template

BATCH = 200


@dataclass(frozen=True)
class RefusedTemplate:
    step_id: str
    where: str  # the config field, as a saved workflow's violations name it: steps[0].config.text
    reason: str


@dataclass(frozen=True)
class AffectedWorkflow:
    tenant_id: str
    workflow_id: str
    version: int
    refused: tuple[RefusedTemplate, ...]


def refused_templates(definition: dict[str, Any]) -> list[RefusedTemplate]:
    """The templates of a stored definition that this release refuses to compile."""
    refused = []
    for i, step in enumerate(definition.get("steps") or []):
        if not isinstance(step, dict):
            continue
        for where, template in _strings(step.get("config") or {}, f"steps[{i}].config"):
            if "{{" in template:
                refused += [RefusedTemplate(str(step.get("id") or ""), where, reason) for reason in validate_template(template)]
    return refused


async def affected_workflows(db: Database, batch: int = BATCH) -> AsyncIterator[AffectedWorkflow]:
    """Every live (not deleted) workflow whose current version holds a refused template, in
    id order; the database is read `batch` workflows at a time."""
    after = ""
    while rows := await db.read(partial(_read_batch, after, batch)):
        after = rows[-1].id
        for row in rows:
            refused = refused_templates(row.definition or {})
            if refused:
                yield AffectedWorkflow(row.tenant_id, row.id, row.version, tuple(refused))


def _read_batch(after: str, batch: int, conn: Connection) -> list[Any]:
    current = (WorkflowVersion.workflow_id == Workflow.id) & (WorkflowVersion.version == Workflow.current_version)
    query = (
        select(Workflow.id, Workflow.tenant_id, WorkflowVersion.version, WorkflowVersion.definition)
        .join(WorkflowVersion, current)
        .where(Workflow.deleted_at.is_(None), Workflow.id > after)
        .order_by(Workflow.id)
        .limit(batch)
    )
    return list(conn.execute(query))
