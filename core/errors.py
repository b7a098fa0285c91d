"""Domain errors. One root, a flat hierarchy; the gRPC layer maps each to a status code in
one table (ipaas.service.status), so domain code never speaks gRPC."""

from __future__ import annotations

from dataclasses import dataclass


class IpaasError(Exception):
    """Root of every error a caller may see. The message is safe to show: no secrets."""


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(IpaasError):
    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = list(violations or [])

    @classmethod
    def many(cls, violations: list[tuple[str, str]]) -> "InvalidArgument":
        message = "; ".join(f"{f}: {d}" for f, d in violations)
        return cls(message, [FieldViolation(f, d) for f, d in violations])

    @classmethod
    def field(cls, field: str, description: str) -> "InvalidArgument":
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(IpaasError):
    pass


class AlreadyExists(IpaasError):
    pass


class Aborted(IpaasError):
    """A concurrent change won (e.g. a stale expected_version)."""


class FailedPrecondition(IpaasError):
    pass


class Unauthenticated(IpaasError):
    pass


class PermissionDenied(IpaasError):
    pass


class ResourceExhausted(IpaasError):
    pass


class Unavailable(IpaasError):
    pass
