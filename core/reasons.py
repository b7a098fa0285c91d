"""The reasons errors give, in one place: google.rpc.ErrorInfo.reason in the core's statuses
and error.reason in the gateway's envelope (AIP-193).

A reason is a stable, machine-readable cause, so a client can tell apart answers that share a
status code (two kinds of PERMISSION_DENIED, a missing workflow or execution) without reading
English. The set is small and part of the API: a reason is never renamed or given a new
meaning, only added; docs/errors.md lists each (tests/unit/test_error_reasons.py keeps the
two in step). The gateway imports this module as it imports ipaas.pagination: it is the
API's vocabulary, not the core's internals."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# The API's protobuf package: the name every client already addresses the service by
# (/ipaas.v1.WorkflowService/...). Reasons are unique within it and stable for v1. A
# host-like name ("simple-ipaas.dev") would claim a DNS name the project does not own.
DOMAIN = "ipaas.v1"

# Metadata values are ids, which a gRPC caller may send at any length: clipped, so the
# ErrorInfo stays a few hundred bytes of the trailers' budget (see ipaas.service.status).
MAX_METADATA_CHARS = 128


@dataclass(frozen=True)
class Reason:
    """One reason, with what its errors say about the resource in ErrorInfo.metadata.

    Call it to attach identifiers: ``WORKFLOW_NOT_FOUND(workflowId=wf_id)``. Metadata
    holds ids and names of our own making only, never a secret nor other caller input;
    keys are lowerCamelCase (AIP-193)."""

    name: str
    resource_type: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __call__(self, **ids: object) -> "Reason":
        return dataclasses.replace(self, metadata={k: _clip(str(v)) for k, v in ids.items()})

    def __str__(self) -> str:
        return self.name

    def error_metadata(self) -> dict[str, str]:
        return {"resourceType": self.resource_type, **self.metadata} if self.resource_type else dict(self.metadata)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_METADATA_CHARS else text[: MAX_METADATA_CHARS - 1] + "…"


_ALL: dict[str, Reason] = {}


def _reason(name: str, resource_type: str = "") -> Reason:
    assert name not in _ALL, name
    _ALL[name] = reason = Reason(name, resource_type)
    return reason


ALL: Mapping[str, Reason] = MappingProxyType(_ALL)

# -- the request ------------------------------------------------------------------------------
INVALID_FIELD = _reason("INVALID_FIELD")  # google.rpc.BadRequest names the fields
REQUEST_UNPARSABLE = _reason("REQUEST_UNPARSABLE")
INVALID_HEADER = _reason("INVALID_HEADER")
PAYLOAD_TOO_LARGE = _reason("PAYLOAD_TOO_LARGE")
HEADERS_TOO_LARGE = _reason("HEADERS_TOO_LARGE")
UNSUPPORTED_MEDIA_TYPE = _reason("UNSUPPORTED_MEDIA_TYPE")
REQUEST_TIMEOUT = _reason("REQUEST_TIMEOUT")
ROUTE_NOT_FOUND = _reason("ROUTE_NOT_FOUND")
METHOD_NOT_ALLOWED = _reason("METHOD_NOT_ALLOWED")

# -- who calls --------------------------------------------------------------------------------
API_KEY_MISSING = _reason("API_KEY_MISSING")
API_KEY_INVALID = _reason("API_KEY_INVALID")
AUTHORIZATION_AMBIGUOUS = _reason("AUTHORIZATION_AMBIGUOUS")
WEBHOOK_SIGNATURE_INVALID = _reason("WEBHOOK_SIGNATURE_INVALID", "workflow")
ADMIN_KEY_REQUIRED = _reason("ADMIN_KEY_REQUIRED")
TENANT_KEY_REQUIRED = _reason("TENANT_KEY_REQUIRED")
ACCESS_DENIED = _reason("ACCESS_DENIED")

# -- resources --------------------------------------------------------------------------------
RESOURCE_NOT_FOUND = _reason("RESOURCE_NOT_FOUND")
WORKFLOW_NOT_FOUND = _reason("WORKFLOW_NOT_FOUND", "workflow")
WORKFLOW_VERSION_NOT_FOUND = _reason("WORKFLOW_VERSION_NOT_FOUND", "workflow_version")
EXECUTION_NOT_FOUND = _reason("EXECUTION_NOT_FOUND", "execution")
CREDENTIAL_NOT_FOUND = _reason("CREDENTIAL_NOT_FOUND", "credential")
TENANT_NOT_FOUND = _reason("TENANT_NOT_FOUND", "tenant")
API_KEY_NOT_FOUND = _reason("API_KEY_NOT_FOUND", "api_key")
RESOURCE_ALREADY_EXISTS = _reason("RESOURCE_ALREADY_EXISTS")
CREDENTIAL_ALREADY_EXISTS = _reason("CREDENTIAL_ALREADY_EXISTS", "credential")
STALE_VERSION = _reason("STALE_VERSION", "workflow")

# -- state ------------------------------------------------------------------------------------
PRECONDITION_FAILED = _reason("PRECONDITION_FAILED")
WORKFLOW_INACTIVE = _reason("WORKFLOW_INACTIVE", "workflow")
WORKFLOW_NOT_WEBHOOK_TRIGGERED = _reason("WORKFLOW_NOT_WEBHOOK_TRIGGERED", "workflow")
WORKFLOW_VERSIONS_EXHAUSTED = _reason("WORKFLOW_VERSIONS_EXHAUSTED", "workflow")
EXECUTION_STATUS_CONFLICT = _reason("EXECUTION_STATUS_CONFLICT", "execution")

# -- capacity and availability ----------------------------------------------------------------
QUEUE_FULL = _reason("QUEUE_FULL")
TENANT_QUEUE_FULL = _reason("TENANT_QUEUE_FULL")
RATE_LIMITED = _reason("RATE_LIMITED")
IDEMPOTENCY_KEY_IN_USE = _reason("IDEMPOTENCY_KEY_IN_USE")
IDEMPOTENCY_KEY_REUSED = _reason("IDEMPOTENCY_KEY_REUSED")
SERVICE_UNAVAILABLE = _reason("SERVICE_UNAVAILABLE")
DATABASE_UNAVAILABLE = _reason("DATABASE_UNAVAILABLE")
WEBHOOK_SECRET_UNREADABLE = _reason("WEBHOOK_SECRET_UNREADABLE", "workflow")
CORE_UNAVAILABLE = _reason("CORE_UNAVAILABLE")
CORE_DEADLINE_EXCEEDED = _reason("CORE_DEADLINE_EXCEEDED")
CORE_ANSWER_UNREADABLE = _reason("CORE_ANSWER_UNREADABLE")
IDEMPOTENCY_STORE_UNAVAILABLE = _reason("IDEMPOTENCY_STORE_UNAVAILABLE")
NOT_READY = _reason("NOT_READY")
REQUEST_CANCELLED = _reason("REQUEST_CANCELLED")
INTERNAL_ERROR = _reason("INTERNAL_ERROR")
