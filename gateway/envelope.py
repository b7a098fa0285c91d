"""The response envelope every answer uses, and the one table from gRPC status to HTTP."""

from __future__ import annotations

from typing import Any, Mapping

import grpc
import orjson
from starlette.responses import Response

from ipaas import reasons
from ipaas.reasons import Reason

# grpc-gateway's runtime/errors.go table.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

HTTP_CODE_NAMES = {400: "bad_request", 401: "unauthenticated", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 431: "request_header_fields_too_large", 422: "unprocessable_entity", 429: "rate_limited", 500: "internal", 501: "unimplemented", 502: "bad_gateway", 503: "unavailable", 504: "deadline_exceeded"}

# Seconds a caller should wait before retrying the core's "not now" answers. The core
# counts its queue again at most once a second (ipaas.engine.enqueuer), so a full queue
# can have room a second later. UNAVAILABLE is a core that is restarting or unreachable,
# or a replica still waiting for a rolled-out key: a few seconds, not a tight loop of
# reconnects from every sender at once. DEADLINE_EXCEEDED is a core (or its database) that
# did not answer in time, most often unreachable: the same.
RETRY_AFTER = {grpc.StatusCode.RESOURCE_EXHAUSTED: 1, grpc.StatusCode.UNAVAILABLE: 5, grpc.StatusCode.DEADLINE_EXCEEDED: 5}


# The reason of an answer whose sender named none: the gateway's own errors that pass no
# reason, and statuses without an ErrorInfo of ours (the channel's own: the core unreachable
# or too slow; a core older than ErrorInfo). Each mirrors the default of the core's error
# class for that code (ipaas.errors).
HTTP_REASONS = {
    400: reasons.INVALID_FIELD,
    401: reasons.API_KEY_INVALID,
    403: reasons.ACCESS_DENIED,
    404: reasons.RESOURCE_NOT_FOUND,
    405: reasons.METHOD_NOT_ALLOWED,
    408: reasons.REQUEST_TIMEOUT,
    413: reasons.PAYLOAD_TOO_LARGE,
    415: reasons.UNSUPPORTED_MEDIA_TYPE,
    422: reasons.INVALID_FIELD,
    429: reasons.RATE_LIMITED,
    431: reasons.HEADERS_TOO_LARGE,
    502: reasons.CORE_ANSWER_UNREADABLE,
    503: reasons.SERVICE_UNAVAILABLE,
    504: reasons.CORE_DEADLINE_EXCEEDED,
}
GRPC_REASONS = {
    grpc.StatusCode.CANCELLED: reasons.REQUEST_CANCELLED,
    grpc.StatusCode.INVALID_ARGUMENT: reasons.INVALID_FIELD,
    grpc.StatusCode.DEADLINE_EXCEEDED: reasons.CORE_DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: reasons.RESOURCE_NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: reasons.RESOURCE_ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED: reasons.ACCESS_DENIED,
    grpc.StatusCode.UNAUTHENTICATED: reasons.API_KEY_INVALID,
    grpc.StatusCode.RESOURCE_EXHAUSTED: reasons.QUEUE_FULL,
    grpc.StatusCode.FAILED_PRECONDITION: reasons.PRECONDITION_FAILED,
    grpc.StatusCode.ABORTED: reasons.STALE_VERSION,
    grpc.StatusCode.UNAVAILABLE: reasons.CORE_UNAVAILABLE,
}


class HttpError(Exception):
    """The one error type of the gateway: status, code, reason (with its domain and
    metadata, as google.rpc.ErrorInfo has them), message, details."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        reason: Reason | str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or HTTP_CODE_NAMES.get(status, "error")
        self.reason = str(reason or HTTP_REASONS.get(status, reasons.INTERNAL_ERROR))
        # Every reason sent, the core's or the gateway's own, is one of ipaas.reasons: the
        # domain is that set's, whoever answered.
        self.domain = reasons.DOMAIN
        if metadata is None:
            metadata = reason.error_metadata() if isinstance(reason, Reason) else {}
        self.metadata = dict(metadata)
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str, violations: list[dict[str, str]], reason: str | None = None, metadata: Mapping[str, str] | None = None) -> "HttpError":
        """`reason` and `metadata`: the core's ErrorInfo's, if it sent one. The metadata is
        passed on as the core chose it (ids, never a secret: ipaas.reasons), nothing added."""
        status = HTTP_STATUS.get(code, 500)
        if code == grpc.StatusCode.INVALID_ARGUMENT and violations:
            status = 422
        retry = RETRY_AFTER.get(code)
        headers = {"Retry-After": str(retry)} if retry else None
        return cls(status, message, code.name.lower(), violations, headers, reason or GRPC_REASONS.get(code, reasons.INTERNAL_ERROR), metadata if reason else None)


def body(data: Any, meta: dict[str, Any]) -> bytes:
    return orjson.dumps({"success": True, "data": data, "meta": meta})


def error_body(error: HttpError, meta: dict[str, Any]) -> bytes:
    fields = {"code": error.code, "reason": error.reason, "domain": error.domain, "metadata": error.metadata, "message": error.message, "details": error.details}
    return orjson.dumps({"success": False, "error": fields, "meta": meta})


def with_meta(content: bytes, meta: dict[str, Any]) -> bytes:
    """A kept envelope with this request's meta (a replay answers under its own request id)."""
    if not content:
        return content
    kept = orjson.loads(content)
    kept["meta"] = {**kept.get("meta", {}), **meta}
    return orjson.dumps(kept)


def json_response(status: int, content: bytes, headers: dict[str, str] | None = None) -> Response:
    if status == 204:
        return Response(status_code=204, headers=headers)
    return Response(content, status_code=status, media_type="application/json", headers=headers)
