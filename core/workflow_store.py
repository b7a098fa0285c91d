"""Workflows and their immutable versions.

Optimistic concurrency: a change names the version it was based on, and the store bumps
`current_version` with a conditional UPDATE, so two concurrent editors cannot both win.
Deletion is soft, so executions that pinned a version can still read it.
"""

from __future__ import annotations

import base64
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cachetools import LRUCache, TTLCache
from sqlalchemy import bindparam, delete, select, update

from ipaas import definitions, reasons
from ipaas.credentials import CredentialStore
from ipaas.crypto import SecretBox
from ipaas.engine import schedule
from ipaas.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unavailable
from ipaas.ids import new_id
from ipaas.pagination import MAX_VERSION, Page, PageRequest
from ipaas.singleflight import SingleFlight
from ipaas.storage.db import Database
from ipaas.storage.tables import Schedule, Tenant, WebhookSecret, Workflow, WorkflowVersion, utcnow

# Built once: API reads run them on every call (a run reads its workflow).
_GET_WORKFLOW = select(*Workflow.__table__.c).where(Workflow.id == bindparam("id"), Workflow.tenant_id == bindparam("tenant_id"), Workflow.deleted_at.is_(None))
_GET_VERSION = select(WorkflowVersion.definition, WorkflowVersion.created_at).where(WorkflowVersion.workflow_id == bindparam("id"), WorkflowVersion.version == bindparam("version"))

log = logging.getLogger("ipaas.workflows")

DEFAULT_SECRET_GRACE = timedelta(hours=24)
UPDATABLE = ("name", "trigger", "steps", "options")
TARGET_TTL = 1.0
# An id with no workflow, or a deleted one, never takes a webhook (ids are the core's own,
# never reused, and nothing is undeleted): kept longer than TARGET_TTL, so a sender retrying
# a deleted workflow's webhook, or made-up ids sent again, cost no database read each.
MISSING_TTL = 60.0


@dataclass(frozen=True)
class WorkflowView:
    """A workflow at one version: its row (id, active, timestamps) and that version's definition."""

    workflow: Workflow
    version: int
    definition: dict[str, Any]
    version_created_at: datetime


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class WorkflowStore:
    def __init__(self, db: Database, box: SecretBox, catalog: definitions.Catalog, credentials: CredentialStore) -> None:
        self.db = db
        self.box = box
        self.catalog = catalog
        self.credentials = credentials
        self._targets: TTLCache[str, WebhookTarget | None] = TTLCache(maxsize=10_000, ttl=TARGET_TTL)
        self._target_loads: SingleFlight[str, WebhookTarget | None] = SingleFlight()
        self._missing: TTLCache[str, bool] = TTLCache(maxsize=10_000, ttl=MISSING_TTL)
        self._generation = 0
        self._versions: LRUCache[tuple[str, int], dict[str, Any]] = LRUCache(maxsize=5_000)
        self._version_rows: LRUCache[tuple[str, int], Any] = LRUCache(maxsize=5_000)  # (definition, created_at)

    async def _validated(self, tenant_id: str, definition: dict[str, Any]) -> dict[str, Any]:
        definition = definitions.normalise(definition)
        violations = definitions.validate(definition, self.catalog)
        wanted = {s["credential_id"] for s in definition["steps"] if s.get("credential_id")}
        owned = await self.credentials.connectors_of(tenant_id, wanted)
        for i, step in enumerate(definition["steps"]):
            cred = step.get("credential_id")
            if not cred:
                continue
            if cred not in owned:
                violations.append(FieldViolation(f"steps[{i}].credential_id", f"no credential {cred!r}"))
            elif owned[cred] != step.get("connector"):
                violations.append(
                    FieldViolation(f"steps[{i}].credential_id", f"credential {cred!r} is for {owned[cred]!r}, not {step.get('connector')!r}")
                )
        definitions.raise_if_invalid(violations)
        return definition

    async def create(self, tenant_id: str, definition: dict[str, Any], active: bool = True) -> tuple[WorkflowView, str]:
        definition = await self._validated(tenant_id, definition)
        now = utcnow()
        wf = Workflow(
            id=new_id("wf"),
            tenant_id=tenant_id,
            name=definition["name"],
            current_version=1,
            active=active,
            trigger_type=definition["trigger"]["type"],
            created_at=now,
            updated_at=now,
        )
        secret = ""
        async with self.db.session() as s, s.begin():
            s.add(wf)
            await s.flush()
            s.add(WorkflowVersion(workflow_id=wf.id, version=1, tenant_id=tenant_id, definition=definition, created_at=now))
            if wf.trigger_type == "webhook":
                secret = new_webhook_secret()
                s.add(self._secret_row(wf, secret, now))
            if wf.trigger_type == "schedule":
                s.add(Schedule(workflow_id=wf.id, tenant_id=tenant_id, next_fire_at=_first_fire(definition["trigger"], now)))
        return WorkflowView(wf, 1, definition, now), secret

    def _secret_row(self, wf: Workflow, secret: str, now: datetime) -> WebhookSecret:
        return WebhookSecret(id=new_id("whs"), workflow_id=wf.id, tenant_id=wf.tenant_id, ciphertext=self.box.encrypt(secret), created_at=now)

    async def _row(self, s: Any, tenant_id: str, workflow_id: str, lock: bool = False) -> Workflow:
        wf = await s.get(Workflow, workflow_id, with_for_update=lock or None)
        if wf is None or wf.tenant_id != tenant_id or wf.deleted_at is not None:
            raise NotFound(f"workflow {workflow_id} not found", reasons.WORKFLOW_NOT_FOUND(workflowId=workflow_id))
        return wf

    async def get(self, tenant_id: str, workflow_id: str, version: int = 0) -> WorkflowView:
        """The workflow (a read-only row with the Workflow's attributes) at `version`, or at
        its current version."""

        # The workflow row is read every time (its current version, active flag); the version
        # it names is immutable, so after the first read it comes from memory (the cache is
        # used on the event loop only: reads run on reader threads).
        wf = await self.db.read(lambda conn: conn.execute(_GET_WORKFLOW, {"id": workflow_id, "tenant_id": tenant_id}).first())
        if wf is None:
            raise NotFound(f"workflow {workflow_id} not found", reasons.WORKFLOW_NOT_FOUND(workflowId=workflow_id))
        number = version or wf.current_version
        row = self._version_rows.get((workflow_id, number))
        if row is None:
            row = await self.db.read(lambda conn: conn.execute(_GET_VERSION, {"id": workflow_id, "version": number}).first())
            if row is None:
                raise NotFound(f"workflow {workflow_id} has no version {number}", reasons.WORKFLOW_VERSION_NOT_FOUND(workflowId=workflow_id, version=number))
            self._version_rows[(workflow_id, number)] = row
        return WorkflowView(wf, number, row.definition, row.created_at)

    async def get_pinned(self, workflow_id: str, version: int) -> dict[str, Any]:
        """A version's definition even if the workflow was deleted since (for executions).
        Versions are immutable, so they are cached without expiry (bounded in size)."""
        cached = self._versions.get((workflow_id, version))
        if cached is not None:
            return cached
        async with self.db.session() as s:
            row = await s.get(WorkflowVersion, (workflow_id, version))
        if row is None:
            raise NotFound(f"workflow {workflow_id} version {version} not found", reasons.WORKFLOW_VERSION_NOT_FOUND(workflowId=workflow_id, version=version))
        self._versions[(workflow_id, version)] = row.definition
        return row.definition

    async def list(self, tenant_id: str, paging: PageRequest) -> Page[WorkflowView]:
        q = (
            select(Workflow, WorkflowVersion)
            .join(WorkflowVersion, (WorkflowVersion.workflow_id == Workflow.id) & (WorkflowVersion.version == Workflow.current_version))
            .where(Workflow.tenant_id == tenant_id, Workflow.deleted_at.is_(None))
            .order_by(Workflow.id.desc())
            .limit(paging.size + 1)
        )
        if paging.after:
            q = q.where(Workflow.id < paging.after)
        async with self.db.session() as s:
            rows = (await s.execute(q)).all()
        views = [WorkflowView(wf, v.version, v.definition, v.created_at) for wf, v in rows]
        return Page.of(views, paging, key=lambda v: v.workflow.id)

    async def update(
        self, tenant_id: str, workflow_id: str, expected_version: int, changes: dict[str, Any], active: bool | None = None, merge_options: bool = False
    ) -> tuple[WorkflowView, str]:
        """A new version with `changes` applied; `merge_options`: the options given change
        and the others keep their values (else the options given are all of them)."""
        if expected_version <= 0:
            raise InvalidArgument.field("expected_version", "is required: the version this change is based on (or If-Match)")
        current = await self.get(tenant_id, workflow_id)
        merged = {**current.definition, **{k: v for k, v in changes.items() if k in UPDATABLE}}
        if merge_options and "options" in changes:
            merged["options"] = {**current.definition.get("options", {}), **changes["options"]}
        definition = await self._validated(tenant_id, merged)
        if definition == current.definition:
            # Versions record changes of the definition: an update that changes none (a
            # retried PATCH, or only `active`, which is operational state) makes none.
            if expected_version != current.version:
                raise Aborted(f"workflow {workflow_id} is at version {current.version}, not {expected_version}: reload and retry", reasons.STALE_VERSION(workflowId=workflow_id, currentVersion=current.version))
            if active is not None and active != current.workflow.active:
                return await self.set_active(tenant_id, workflow_id, active), ""
            return current, ""
        return await self._new_version(tenant_id, current, expected_version, definition, active)

    async def rollback(self, tenant_id: str, workflow_id: str, version: int, expected_version: int) -> tuple[WorkflowView, str]:
        target = await self.get(tenant_id, workflow_id, version)
        current = await self.get(tenant_id, workflow_id)
        definition = await self._validated(tenant_id, target.definition)
        return await self._new_version(tenant_id, current, expected_version or current.version, definition, None)

    async def _new_version(self, tenant_id: str, current: WorkflowView, expected: int, definition: dict[str, Any], active: bool | None) -> tuple[WorkflowView, str]:
        """The workflow at its new version, and a new webhook secret when this change made it
        a webhook workflow that had none (shown only in this answer, as at creation)."""
        if expected != current.version:  # also keeps expected + 1 within the API's int32
            raise Aborted(f"workflow {current.workflow.id} is at version {current.version}, not {expected}: reload and retry", reasons.STALE_VERSION(workflowId=current.workflow.id, currentVersion=current.version))
        if expected >= MAX_VERSION:
            raise FailedPrecondition(f"workflow {current.workflow.id} has used every version number: create a new workflow", reasons.WORKFLOW_VERSIONS_EXHAUSTED(workflowId=current.workflow.id))
        now = utcnow()
        new_version = expected + 1
        secret = ""
        values: dict[str, Any] = {
            "current_version": new_version,
            "name": definition["name"],
            "trigger_type": definition["trigger"]["type"],
            "updated_at": now,
        }
        if active is not None:
            values["active"] = active
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(Workflow)
                .where(Workflow.id == current.workflow.id, Workflow.tenant_id == tenant_id, Workflow.current_version == expected, Workflow.deleted_at.is_(None))
                .values(**values)
            )
            if result.rowcount != 1:
                raise Aborted(f"workflow {current.workflow.id} is at version {current.version}, not {expected}: reload and retry", reasons.STALE_VERSION(workflowId=current.workflow.id, currentVersion=current.version))
            s.add(WorkflowVersion(workflow_id=current.workflow.id, version=new_version, tenant_id=tenant_id, definition=definition, created_at=now))
            reactivated = bool(active) and not current.workflow.active
            await self._sync_trigger_rows(s, current.workflow, current.definition["trigger"], definition["trigger"], reactivated, now)
            if definition["trigger"]["type"] == "webhook" and not await self._has_live_secret(s, current.workflow.id, now):
                secret = new_webhook_secret()
                s.add(self._secret_row(current.workflow, secret, now))
        self.forget(current.workflow.id)
        return await self.get(tenant_id, current.workflow.id), secret

    async def _has_live_secret(self, s: Any, workflow_id: str, now: datetime) -> bool:
        live = select(WebhookSecret.id).where(WebhookSecret.workflow_id == workflow_id, WebhookSecret.expires_at.is_(None) | (WebhookSecret.expires_at > now)).limit(1)
        return (await s.scalar(live)) is not None

    async def _sync_trigger_rows(self, s: Any, wf: Workflow, before: dict[str, Any], after: dict[str, Any], reactivated: bool, now: datetime) -> None:
        if after["type"] != "schedule":
            await s.execute(delete(Schedule).where(Schedule.workflow_id == wf.id))
        elif await s.get(Schedule, wf.id) is None:  # a new schedule, planned as at creation
            s.add(Schedule(workflow_id=wf.id, tenant_id=wf.tenant_id, next_fire_at=_first_fire(after, now)))
        elif reactivated or schedule.timing(after) != schedule.timing(before):
            await self._replan(s, wf.id, after, now)
        # Same timing: the planned fire stands, even one that is due and not yet fired. Reset
        # to NULL, the next tick planned the first fire after its own "now", past that one.

    async def _replan(self, s: Any, workflow_id: str, trigger: dict[str, Any], now: datetime) -> None:
        """Plans the first fire after `now` in the caller's transaction. Left NULL for the
        scheduler, a fire between this change and its next tick (up to a second) was skipped.
        Fires before `now` are not owed: they belonged to the old timing, or fell while the
        workflow was inactive (a stale plan would catch one up on reactivation)."""
        await s.execute(update(Schedule).where(Schedule.workflow_id == workflow_id).values(next_fire_at=_first_fire(trigger, now)))

    async def set_active(self, tenant_id: str, workflow_id: str, active: bool) -> WorkflowView:
        async with self.db.session() as s, s.begin():
            wf = await self._row(s, tenant_id, workflow_id)
            reactivated = active and not wf.active
            wf.active = active
            # Deactivating keeps the plan (the scheduler skips inactive workflows); activating
            # an active workflow keeps it too, so a fire due at that moment still runs.
            if reactivated and wf.trigger_type == "schedule":
                version = await s.get(WorkflowVersion, (wf.id, wf.current_version))
                await self._replan(s, wf.id, version.definition["trigger"], utcnow())
        self.forget(workflow_id)
        return await self.get(tenant_id, workflow_id)

    async def delete(self, tenant_id: str, workflow_id: str) -> None:
        async with self.db.session() as s, s.begin():
            wf = await self._row(s, tenant_id, workflow_id)
            wf.deleted_at = utcnow()
            wf.active = False
            await s.execute(delete(Schedule).where(Schedule.workflow_id == wf.id))
        self.forget(workflow_id)

    async def list_versions(self, tenant_id: str, workflow_id: str, paging: PageRequest) -> tuple[Workflow, Page[WorkflowVersion]]:
        before = paging.version_after()
        async with self.db.session() as s:
            wf = await self._row(s, tenant_id, workflow_id)
            q = select(WorkflowVersion).where(WorkflowVersion.workflow_id == workflow_id).order_by(WorkflowVersion.version.desc()).limit(paging.size + 1)
            if before is not None:
                q = q.where(WorkflowVersion.version < before)
            rows = list((await s.scalars(q)).all())
        return wf, Page.of(rows, paging, key=lambda v: str(v.version))

    async def rotate_secret(self, tenant_id: str, workflow_id: str, grace_seconds: int, revoke_previous: bool) -> tuple[str, datetime]:
        if grace_seconds < 0:
            raise InvalidArgument.field("grace_period_seconds", "must not be negative")
        now = utcnow()
        grace = timedelta(seconds=grace_seconds) if grace_seconds else DEFAULT_SECRET_GRACE
        expires = now if revoke_previous else now + grace
        secret = new_webhook_secret()
        async with self.db.session() as s, s.begin():
            # Locked (PostgreSQL): rotations at once through several replicas each saw only
            # the secrets committed before they began, and each left its own live.
            wf = await self._row(s, tenant_id, workflow_id, lock=True)
            if wf.trigger_type != "webhook":
                raise FailedPrecondition(f"workflow {workflow_id} is not triggered by webhooks: it has no webhook secret to rotate", reasons.WORKFLOW_NOT_WEBHOOK_TRIGGERED(workflowId=workflow_id))
            # Only the secret being replaced gets the grace period; one that an earlier
            # rotation already replaced ends now. Otherwise every rotation within a grace
            # period added one more secret that verifies (and that each delivery tries).
            await s.execute(delete(WebhookSecret).where(WebhookSecret.workflow_id == wf.id, WebhookSecret.expires_at.is_not(None)))
            await s.execute(update(WebhookSecret).where(WebhookSecret.workflow_id == wf.id).values(expires_at=expires))
            s.add(self._secret_row(wf, secret, now))
        self.forget(workflow_id)
        return secret, expires

    async def webhook_target(self, workflow_id: str) -> "WebhookTarget | None":
        """Cached for TARGET_TTL seconds: the hot path of every webhook. Changes made through
        this replica invalidate at once; other replicas see them within the TTL."""
        try:
            return self._targets[workflow_id]
        except KeyError:
            pass
        if workflow_id in self._missing:
            return None

        async def load() -> WebhookTarget | None:
            generation = self._generation
            target = await self._load_webhook_target(workflow_id)
            if generation == self._generation:  # nothing changed while it loaded
                self._targets[workflow_id] = target
            return target

        return await self._target_loads.do(workflow_id, load)

    def forget(self, workflow_id: str) -> None:
        self._generation += 1
        self._targets.pop(workflow_id, None)
        self._missing.pop(workflow_id, None)

    async def _load_webhook_target(self, workflow_id: str) -> "WebhookTarget | None":
        """What a webhook needs in one round of reads: owner, tier, current version and the
        secrets that still verify. None when the workflow does not exist, is deleted, is
        inactive or is not webhook-triggered (all answer the same: not found)."""
        now = utcnow()
        async with self.db.session() as s:
            row = (
                await s.execute(
                    # Inactive and deleted ones too, in the same read: only those can come back.
                    select(Workflow.tenant_id, Workflow.current_version, Workflow.deleted_at, Workflow.active, Workflow.trigger_type, WorkflowVersion.definition, Tenant.tier)
                    .join(WorkflowVersion, (WorkflowVersion.workflow_id == Workflow.id) & (WorkflowVersion.version == Workflow.current_version))
                    .join(Tenant, Tenant.id == Workflow.tenant_id)
                    .where(Workflow.id == workflow_id)
                )
            ).first()
            if row is None or row.deleted_at is not None:
                self._missing[workflow_id] = True
                return None
            if not row.active or row.trigger_type != "webhook":
                return None
            ciphertexts = (
                await s.scalars(
                    select(WebhookSecret.ciphertext).where(
                        WebhookSecret.workflow_id == workflow_id,
                        (WebhookSecret.expires_at.is_(None)) | (WebhookSecret.expires_at > now),
                    )
                )
            ).all()
        try:
            secrets_ = [str(self.box.decrypt(c)) for c in ciphertexts]
        except ValueError:
            # A replica whose IPAAS_SECRET_KEYS lacks the key that encrypted the secret (a key
            # rotation rolling out): the delivery is sound, so the sender is asked to retry,
            # which reaches an updated replica or this one once it has the key.
            log.error("webhook.secret_unreadable", extra={"workflow_id": workflow_id, "hint": "this replica's IPAAS_SECRET_KEYS lacks the key that encrypted the secret"})
            raise Unavailable("the webhook cannot be verified right now: retry shortly", reasons.WEBHOOK_SECRET_UNREADABLE(workflowId=workflow_id)) from None
        return WebhookTarget(row.tenant_id, row.tier, row.current_version, row.definition, secrets_)


@dataclass(frozen=True)
class WebhookTarget:
    tenant_id: str
    tier: str
    version: int
    definition: dict[str, Any]
    secrets: list[str]


def _first_fire(trigger: dict[str, Any], now: datetime) -> datetime | None:
    """The first fire after `now`, planned in the saving transaction. Left NULL for the
    scheduler to plan at its next tick (up to a second later), a fire in between was missed."""
    try:
        return schedule.next_fire(trigger, now)
    except Exception:
        return None  # the scheduler parks a schedule it cannot compute, and logs it
