"""Domain errors → gRPC status, in one table, with google.rpc details: ErrorInfo (the reason)
on every error, BadRequest for bad input."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ipaas import errors, reasons
from ipaas.reasons import Reason

STATUS_OF: dict[type[errors.IpaasError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_for(exc: errors.IpaasError) -> grpc.StatusCode:
    for klass in type(exc).__mro__:
        if klass in STATUS_OF:
            return STATUS_OF[klass]
    return grpc.StatusCode.INTERNAL


def to_grpc_status(failure: errors.IpaasError | status_pb2.Status) -> grpc.Status:
    return rpc_status.to_status(failure if isinstance(failure, status_pb2.Status) else to_status_proto(failure))


# Messages may quote what the caller sent (an unknown id, a bad field). The status travels in
# trailing metadata, which gRPC clients refuse past 16 KiB and, at random, past a soft 8 KiB:
# a message quoting a huge input turned the answer into the client's own RESOURCE_EXHAUSTED
# ("Stream removed"). The details go base64-encoded (a third more), so they get 3 KiB.
MAX_MESSAGE_CHARS = 1024
MAX_DETAILS_CHARS = 3 * 1024


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _within_budget(violations: list[errors.FieldViolation]) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The first violations, clipped, up to MAX_DETAILS_CHARS in all (the message sums them up)."""
    kept, used = [], 0
    for v in violations:
        field, description = _clip(v.field), _clip(v.description)
        used += len(field) + len(description)
        if used > MAX_DETAILS_CHARS and kept:
            break
        kept.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
    return kept


def _packed(message: Any) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def error_info(reason: Reason) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason.name, domain=reasons.DOMAIN, metadata=reason.error_metadata())


def to_status_proto(exc: errors.IpaasError) -> status_pb2.Status:
    """The google.rpc.Status a call failing with `exc` answers (alone, or as a batch item)."""
    code = code_for(exc)
    st = status_pb2.Status(code=code.value[0], message=_clip(str(exc)))
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        st.details.append(_packed(error_details_pb2.BadRequest(field_violations=_within_budget(exc.violations))))
    # After BadRequest: clients written before ErrorInfo read the violations at details[0].
    st.details.append(_packed(error_info(exc.reason)))
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(exc.retry_after * 1e9)))
        st.details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return st


def internal_status_proto(request_id: str) -> status_pb2.Status:
    """What a call that failed on a bug answers: no words of the bug, the id to find it by."""
    st = status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error (request id {request_id})")
    st.details.append(_packed(error_info(reasons.INTERNAL_ERROR)))
    return st
