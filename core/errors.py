"""Domain errors. One root, a flat hierarchy; the gRPC layer maps each to a status code in
one table (ipaas.service.status), so domain code never speaks gRPC.

Each error carries a reason (ipaas.reasons), which the caller reads as ErrorInfo.reason: a
raise site names its cause when the class has several, and each class has a default, so no
error goes without one."""

from __future__ import annotations

from dataclasses import dataclass

from ipaas import reasons
from ipaas.reasons import Reason


class IpaasError(Exception):
    """Root of every error a caller may see. The message is safe to show: no secrets."""

    reason: Reason = reasons.INTERNAL_ERROR

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(IpaasError):
    reason = reasons.INVALID_FIELD

    def __init__(self, message: str, violations: list[FieldViolation] | None = None, reason: Reason | None = None) -> None:
        super().__init__(message, reason)
        self.violations = list(violations or [])

    @classmethod
    def many(cls, violations: list[tuple[str, str]]) -> "InvalidArgument":
        message = "; ".join(f"{f}: {d}" for f, d in violations)
        return cls(message, [FieldViolation(f, d) for f, d in violations])

    @classmethod
    def field(cls, field: str, description: str) -> "InvalidArgument":
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(IpaasError):
    reason = reasons.RESOURCE_NOT_FOUND


class AlreadyExists(IpaasError):
    reason = reasons.RESOURCE_ALREADY_EXISTS


class Aborted(IpaasError):
    """A concurrent change won (e.g. a stale expected_version)."""

    reason = reasons.STALE_VERSION


class FailedPrecondition(IpaasError):
    reason = reasons.PRECONDITION_FAILED


class Unauthenticated(IpaasError):
    reason = reasons.API_KEY_INVALID


class PermissionDenied(IpaasError):
    reason = reasons.ACCESS_DENIED


class ResourceExhausted(IpaasError):
    reason = reasons.QUEUE_FULL

    def __init__(self, message: str, reason: Reason | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after  # seconds, when known: sent as google.rpc.RetryInfo


class Unavailable(IpaasError):
    reason = reasons.SERVICE_UNAVAILABLE
