"""One interceptor for every ipaas.v1 RPC: request id, authentication, log context, the checks
every request gets (parsable, storable text, required ids), and the mapping of domain errors
to status codes. Health and reflection pass through untouched."""

from __future__ import annotations

import functools
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from ipaas import auth, logs, reasons
from ipaas.errors import InvalidArgument, IpaasError, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from ipaas.ratelimit import RateLimiter
from ipaas.service import storable_text
from ipaas.service.status import internal_status_proto, to_grpc_status
from ipaas.storage.outage import OutageLog
from ipaas.tenants import TenantStore

log = logging.getLogger("ipaas.rpc")
# A database outage fails every call until it ends: the caller retries (UNAVAILABLE, which
# the gateway answers 503 with Retry-After), and the log says so once a minute.
DATABASE_UNAVAILABLE = Unavailable("the database is unavailable: retry shortly", reasons.DATABASE_UNAVAILABLE)
database_down = OutageLog(log, "rpc.database_unavailable")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")  # \Z: $ also matches before a final newline

PUBLIC = {"/ipaas.v1.ExecutionService/ReceiveWebhook", "/ipaas.v1.ExecutionService/ReceiveWebhooks"}
ANY_CALLER = {"/ipaas.v1.TenantService/GetCaller"}
ADMIN_ONLY_SERVICE = "/ipaas.v1.TenantService/"


REQUEST_ID = "x-request-id"


def add_trailing_metadata(context: grpc.aio.ServicerContext, *pairs: tuple[str, str]) -> None:
    """Trailers beside the request id the interceptor already set (a plain set replaces)."""
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))


def request_id_from(metadata: dict[str, str]) -> str:
    given = metadata.get(REQUEST_ID, "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def bearer_from(metadata: dict[str, str]) -> str | None:
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class _Unparsable:
    """What the request deserializer hands the handler for bytes that are no request of its
    type (invalid UTF-8 in a string, a truncated message, nesting past protobuf's limit).
    Raised there, the DecodeError reached the client as UNKNOWN with the parser's own text
    and no request id; guarded() answers INVALID_ARGUMENT instead."""


_UNPARSABLE = _Unparsable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNPARSABLE

    return parse


_PATH_VARIABLE = re.compile(r"\{([^}=]+)")


@dataclass(frozen=True)
class _Method:
    request_type: str
    # The string fields the method's REST path carries ("/api/workflows/{id}"): the id of
    # the resource it acts on, which an empty value names nothing. Sent empty over gRPC,
    # they were looked up and answered NOT_FOUND "workflow  not found".
    required: tuple[str, ...]


@functools.cache
def _method(name: str) -> _Method | None:
    """What the descriptors say of the RPC `name` ("/ipaas.v1.WorkflowService/GetWorkflow")."""
    try:
        method = descriptor_pool.Default().FindMethodByName(name.lstrip("/").replace("/", "."))
    except KeyError:
        return None
    rule = method.GetOptions().Extensions[annotations_pb2.http]
    pattern = rule.WhichOneof("pattern")
    path = getattr(rule, pattern) if pattern and pattern != "custom" else ""
    fields = method.input_type.fields_by_name
    required = tuple(
        variable
        for variable in _PATH_VARIABLE.findall(path)
        if variable in fields and fields[variable].type == FieldDescriptor.TYPE_STRING
    )
    return _Method(method.input_type.full_name, required)


def _check_required(request: Any, method: _Method | None) -> None:
    if method is None or not method.required:
        return
    if missing := [name for name in method.required if not getattr(request, name)]:
        raise InvalidArgument.many([(name, "is required") for name in missing])


class CoreInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tenants: TenantStore, limiter: RateLimiter | None = None) -> None:
        self._tenants = tenants
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith("/ipaas.v1.") or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        described = _method(method)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            pairs = context.invocation_metadata() or ()
            metadata = {k: v for k, v in pairs if isinstance(v, str)}
            request_id = request_id_from(metadata)
            # The request id rides in the trailers, sent with the status in the call's last
            # batch: sending it as initial metadata took a batch of its own and cost ~17 % of
            # the core's CPU per call (measured).
            context.set_trailing_metadata(((REQUEST_ID, request_id),))
            with logs.bind(request_id=request_id, rpc=method):
                token = None
                try:
                    caller = await self._authorize(method, metadata, pairs)
                    if self._limiter is not None and caller is not None and caller.tenant_id and method not in ANY_CALLER:
                        await self._limit(caller)
                    if request is _UNPARSABLE:
                        type_name = described.request_type if described else "the method's request"
                        raise InvalidArgument(f"the request could not be parsed as {type_name}", reason=reasons.REQUEST_UNPARSABLE(requestType=type_name))
                    if method not in PUBLIC:  # webhooks: their few stored strings are checked in ipaas.triggers, off this hot path
                        storable_text.check(request)
                    _check_required(request, described)
                    token = auth.set_caller(caller)
                    if caller is not None and caller.tenant_id:
                        with logs.bind(tenant_id=caller.tenant_id):
                            return await inner(request, context)
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except IpaasError as exc:
                    status = to_grpc_status(exc)
                    await context.abort(status.code, status.details, (*status.trailing_metadata, (REQUEST_ID, request_id)))
                except Exception as exc:
                    if not database_down(exc):
                        log.exception("rpc.failed")
                        status = to_grpc_status(internal_status_proto(request_id))
                        await context.abort(status.code, status.details, (*status.trailing_metadata, (REQUEST_ID, request_id)))
                    status = to_grpc_status(DATABASE_UNAVAILABLE)
                    await context.abort(status.code, status.details, (*status.trailing_metadata, (REQUEST_ID, request_id)))
                finally:
                    if token is not None:
                        auth._current.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _limit(self, caller: auth.Caller) -> None:
        """The tenant's tier rate limit, for gRPC clients that call the core directly as the
        gateway's limit does for REST callers. A budget of its own (not the gateway's), so a
        REST caller, whose calls pass both, gets its whole budget from each. GetCaller is
        left out: the gateway asks it for every new key, and it only reads the key."""
        assert self._limiter is not None and caller.tenant_id is not None
        wait = await self._limiter.acquire(caller.tenant_id, caller.tier)
        if wait is not None:
            raise ResourceExhausted(f"rate limit exceeded: slow down and retry in {wait:.3f} s (google.rpc.RetryInfo)", reasons.RATE_LIMITED, retry_after=wait)

    async def _authorize(self, method: str, metadata: dict[str, str], pairs: Any) -> auth.Caller | None:
        if method in PUBLIC:
            return None
        if sum(1 for key, _ in pairs if key == "authorization") > 1:
            # The metadata dict keeps the last, so which key a call ran as was left to the
            # order in which a client library or proxy put its values.
            raise Unauthenticated("send one authorization value", reasons.AUTHORIZATION_AMBIGUOUS)
        caller = await self._tenants.authenticate(bearer_from(metadata))
        if method in ANY_CALLER:
            return caller
        if method.startswith(ADMIN_ONLY_SERVICE):
            if not caller.is_admin:
                raise PermissionDenied("this RPC needs the admin key", reasons.ADMIN_KEY_REQUIRED)
        elif caller.is_admin:
            raise PermissionDenied("the admin key manages tenants; use a tenant's API key here", reasons.TENANT_KEY_REQUIRED)
        return caller
