"""Domain errors → gRPC status, in one table, with google.rpc details for bad input."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ipaas import errors

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


def to_grpc_status(exc: errors.IpaasError) -> grpc.Status:
    return rpc_status.to_status(to_status_proto(exc))


def to_status_proto(exc: errors.IpaasError) -> status_pb2.Status:
    """The google.rpc.Status a call failing with `exc` answers (alone, or as a batch item)."""
    code = code_for(exc)
    st = status_pb2.Status(code=code.value[0], message=str(exc))
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in exc.violations
                ]
            )
        )
        st.details.append(detail)
    return st
