"""Accepting triggers: manual runs and signed webhooks. An accepted trigger is durably in
the outbox before the caller hears back; a repeated idempotency key or webhook-id returns
the execution it already created."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ipaas import reasons
from ipaas.definitions import max_attempts
from ipaas.engine.enqueuer import Enqueuer
from ipaas.engine.outbox import Accepted, NewExecution
from ipaas.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Unauthenticated
from ipaas.wire import MAX_JSON_DEPTH, nested_deeper_than
from ipaas.workflow_store import WebhookTarget, WorkflowStore

log = logging.getLogger("ipaas.triggers")

MAX_BODY_BYTES = 1024 * 1024
MAX_KEY_LENGTH = 255


def _unparsable(message: str) -> InvalidArgument:
    """A webhook body that is no JSON at all: the request cannot be read, as a REST body
    that is not JSON cannot (400 over REST, REQUEST_UNPARSABLE), rather than a field whose
    value is refused (BadRequest, 422). Issue 4's contract: not JSON → 400."""
    return InvalidArgument(message, reason=reasons.REQUEST_UNPARSABLE)


def _nested_too_deeply() -> InvalidArgument:
    return InvalidArgument.field("http_body.data", f"the body is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)")


def _key(value: str | None, field: str) -> str | None:
    if not value:
        return None
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidArgument.field(field, f"must be at most {MAX_KEY_LENGTH} characters")
    if "\x00" in value:  # PostgreSQL cannot store it, and the batch's commit would fail
        raise InvalidArgument.field(field, "must not contain NUL characters")
    return value


def _well_formed(signatures: str) -> str:
    """The header's `v1,<base64>` entries, without the ones the package cannot read.

    The spec asks a receiver to accept any valid signature in the space-separated list and
    to skip versions it does not know. The package stops at the first entry it cannot split
    or decode (`v2`, `v1,a,b`, truncated base64, a double space): the valid one after it was
    never tried, and the sender got 401 for a correctly signed delivery."""
    kept = []
    for entry in signatures.split():
        version, comma, signature = entry.partition(",")
        if version != "v1" or not comma:
            continue
        try:
            base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            continue
        kept.append(entry)
    return " ".join(kept)


def verify_signature(secrets: list[str], body: bytes, headers: dict[str, str]) -> bool:
    """True when any current secret verifies (rotation keeps two valid for a while).
    The package compares in constant time and enforces the 5-minute tolerance. `headers`
    have lower-case names."""
    signatures = _well_formed(headers.get("webhook-signature", ""))
    if not signatures:
        return False
    headers = {**headers, "webhook-signature": signatures}
    for secret in secrets:
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
            return True
        except (WebhookVerificationError, ValueError, binascii.Error, UnicodeDecodeError):
            continue
    return False


class TriggerService:
    def __init__(self, workflows: WorkflowStore, enqueuer: Enqueuer) -> None:
        self.workflows = workflows
        self.enqueuer = enqueuer

    async def run_manual(self, tenant_id: str, workflow_id: str, payload: Any, idempotency_key: str | None, version: int = 0) -> tuple[Accepted, int]:
        """The accepted execution and the workflow version it runs: `version`, or the
        current one when 0."""
        # The store reads any other number as a version's own: a negative one would be
        # NOT_FOUND, as if the caller had named a version that was deleted.
        if version < 0:
            raise InvalidArgument.field("version", "must be 1 or more, or 0 for the current version")
        view = await self.workflows.get(tenant_id, workflow_id, version)
        if not view.workflow.active:
            raise FailedPrecondition(f"workflow {workflow_id} is inactive: activate it first", reasons.WORKFLOW_INACTIVE(workflowId=workflow_id))
        key = _key(idempotency_key, "idempotency-key")
        accepted = await self.enqueuer.submit(
            NewExecution(
                tenant_id=tenant_id,
                workflow_id=workflow_id,
                workflow_version=view.version,
                trigger="manual",
                payload=payload,
                max_attempts=max_attempts(view.definition),
                dedup_key=f"idem:{workflow_id}:{key}" if key else None,
            )
        )
        # The dedup key stays the workflow's and the key's alone, so a key never starts two
        # runs. A repeat naming another version than the key's run is another request: it
        # gets what the gateway answers for one (422 over REST), not a run of the wrong
        # version reported as done. A repeat naming none stays a plain retry (what every
        # request was before versions could be named).
        if accepted.duplicate and version and accepted.workflow_version != version:
            raise InvalidArgument(
                f"idempotency-key already started a run of version {accepted.workflow_version} of workflow {workflow_id}: use a new key for version {version}",
                [FieldViolation("version", f"the idempotency-key's run is of version {accepted.workflow_version}")],
                reasons.IDEMPOTENCY_KEY_REUSED,
            )
        return accepted, view.version

    async def receive_webhook(self, workflow_id: str, body: bytes, headers: dict[str, str], idempotency_key: str | None) -> tuple[WebhookTarget, Accepted]:
        """Returns the target (owner, tier) and the accepted execution."""
        if len(body) > MAX_BODY_BYTES:
            raise InvalidArgument.field("http_body.data", f"the body exceeds {MAX_BODY_BYTES} bytes")
        # An id with a NUL cannot exist, and PostgreSQL would refuse to look it up.
        target = None if "\x00" in workflow_id else await self.workflows.webhook_target(workflow_id)
        if target is None:
            raise NotFound(f"workflow {workflow_id} not found", reasons.WORKFLOW_NOT_FOUND(workflowId=workflow_id))
        headers = {k.lower(): v for k, v in headers.items()}
        try:
            body.decode()
        except UnicodeDecodeError:
            # JSON is UTF-8 (RFC 8259). Checked before the signature: the package decodes
            # the body to verify it, and a correctly signed sender was told its signature
            # was wrong, which sends it looking in the wrong place.
            raise _unparsable("the body is not valid JSON: it is not UTF-8") from None
        unsigned_ok = bool(target.definition.get("options", {}).get("allow_unsigned_webhooks"))
        # Where unsigned webhooks are allowed, a signature sent is still checked: what it
        # proves decides the key space the delivery dedupes in (below).
        verified = verify_signature(target.secrets, body, headers) if not unsigned_ok or "webhook-signature" in headers else False
        if not unsigned_ok and not verified:
            log.warning("webhook.rejected", extra={"workflow_id": workflow_id, "tenant_id": target.tenant_id})
            raise Unauthenticated("missing or invalid webhook signature (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)", reasons.WEBHOOK_SIGNATURE_INVALID(workflowId=workflow_id))
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError as exc:
            if str(exc).startswith("depth limit exceeded"):  # valid JSON past orjson's 1,024 levels: too deep, as below
                raise _nested_too_deeply() from None
            raise _unparsable("the body is not valid JSON") from None
        # orjson reads 1,024 levels of nesting, but an execution's reply carries MAX_JSON_DEPTH
        # (and the database's encoder writes 254): a deeper body was stored, then broke every
        # read of its execution and every page listing it. A body with fewer brackets than
        # the limit cannot nest past it, so the usual small one is not walked.
        if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH and nested_deeper_than(payload, MAX_JSON_DEPTH):
            raise _nested_too_deeply()
        webhook_id = _key(headers.get("webhook-id"), "webhook-id")
        key = _key(idempotency_key, "idempotency-key")
        # Keys dedupe per workflow: one key sent to two workflows starts both. A webhook's
        # key has a space of its own: where unsigned webhooks are allowed, anyone could send
        # one, and must not be answered with a run the owner started with the same key. For
        # the same reason an unverified delivery dedupes apart from verified ones: sent first
        # with a genuine sender's webhook-id (often guessable), it made the signed delivery
        # a "duplicate" of the sender's own forgery, and its payload never ran.
        space = "wh" if verified else "whu"
        dedup = f"{space}:{workflow_id}:{webhook_id}" if webhook_id else (f"{space}key:{workflow_id}:{key}" if key else None)
        accepted = await self.enqueuer.submit(
            NewExecution(
                tenant_id=target.tenant_id,
                workflow_id=workflow_id,
                workflow_version=target.version,
                trigger="webhook",
                payload=payload,
                max_attempts=max_attempts(target.definition),
                dedup_key=dedup,
            )
        )
        return target, accepted
