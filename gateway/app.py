"""The REST gateway: HTTP in, gRPC to the core out, with the HTTP concerns in between.

Per request: request id → route (from the protos) → bounded body → caller and rate limit →
idempotency → transcode → call the core → envelope. Every answer, errors included, uses the
envelope; nothing raised inside reaches the caller as a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import time
from datetime import datetime, timezone
from typing import Any

import grpc
import orjson
from google.protobuf import json_format, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ipaas import __version__, heap, lifecycle, logs, reasons
from ipaas.gateway import envelope, idempotency, kept_answers, metrics, parse_errors, request_deadlines
from ipaas.gateway.core_client import CALL_TIMEOUT, CoreClient
from ipaas.gateway.envelope import HttpError
from ipaas.gateway.openapi import DOCS_PAGE, build_openapi
from ipaas.gateway.ratelimit import ANONYMOUS, ANONYMOUS_WEBHOOKS, RateLimiter, Tier, parse_tiers
from ipaas.gateway.routes import MAX_PARAM_LENGTH, Match, Route, Router, field_value
from ipaas.gateway.throttled_log import ThrottledWarning
from ipaas.gateway.webhook_batch import OversizedDelivery, WebhookBatcher
from ipaas.json_numbers import EXACT, inexact_integer, integral
from ipaas.pagination import MAX_VERSION
from ipaas.settings import Settings, boolean
from ipaas.singleflight import SingleFlight
from ipaas.v1 import executions_pb2
from ipaas.wire import MAX_JSON_DEPTH

log = logging.getLogger("ipaas.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")  # \Z: $ also matches before a final newline
WEBHOOK_BODY_LIMIT = 1024 * 1024
BODY_LIMIT = 256 * 1024
MAX_AUTHORIZATION_LENGTH = 1024  # API keys are ~50 characters
# The request head's headers, names and values: far above any real client's few KiB. A
# webhook's headers are copied into its gRPC message, and past gRPC's 4 MiB the call failed
# with a 502 its sender retried forever. uvicorn does not bound them here: its
# h11_max_incomplete_event_size (16 KiB) applies to the h11 protocol only, and the
# httptools one the gateway runs (llhttp) has no header size limit at all, so a head is
# bounded only by its deadline (IPAAS_HTTP_HEAD_TIMEOUT) while it is read.
MAX_HEADER_BYTES = 64 * 1024
# Failures of the call itself rather than answers of the core's handlers.
CHANNEL_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# Answers of the core that say it failed, not that the request was wrong (a database outage,
# a bug): counted with the channel's failures in ipaas_gateway_core_call_failures.
CORE_FAILURE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
CALLER_TTL = 10.0
# A key the core refused is answered 401 here for this long: a client retrying a bad key in
# a loop then costs no core call. Short, so a key refused during a core hiccup (an admin
# key being rolled out) is not refused for long once it is good.
REFUSED_TTL = 5.0
MAX_CACHED_KEYS = 10_000
READY_TIMEOUT = 1.0  # seconds Redis has to answer /health/ready's ping
OWNER_TTL = 60.0
# How long after its last refused webhook a (sender address, workflow) pair's webhooks look
# at its budget first: longer than the default budget takes to refill (100 at 10/s).
REFUSED_SENDER_TTL = 60.0
# The budget of an address's webhooks to workflow ids the core did not know (404), counted
# once per id a minute: ten times IPAAS_RATE_ANONYMOUS_WEBHOOKS (default 100/s, burst 1,000).
UNKNOWN_WEBHOOK_IDS = "anonymous_webhook_ids"
UNKNOWN_IDS_FACTOR = 10
UNLIMITED_PATHS = {"/health", "/health/live", "/health/ready", "/openapi.json", "/docs", "/metrics"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade", "authorization", "cookie"}
IDEMPOTENT_VERBS = {"POST", "PATCH"}
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _request_id(given: str | None) -> str:
    return given if given and _REQUEST_ID.match(given) else os.urandom(16).hex()


def _ascii_text(value: str) -> bool:
    """What a gRPC metadata value may hold."""
    return value.isascii() and value.isprintable()


def _client_address(request: Request) -> str:
    """The client's address: the proxy's forwarded one when uvicorn trusts that proxy
    (FORWARDED_ALLOW_IPS), else the peer's."""
    client = request.scope.get("client")
    return client[0] if client else "-"


def _header_bytes(scope: dict[str, Any]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"


def _header_map(scope: dict[str, Any]) -> dict[str, str]:
    """Each header's first value, as Starlette's Headers.get gives it, built once per
    request: a lookup is then a dict get instead of a scan of the raw header list."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in found:
            found[key] = value.decode("latin-1")
    return found


_ORJSON_TOO_DEEP = "depth limit exceeded"


def _nested_too_deeply(field: str) -> HttpError:
    """The core's own answer to free-form JSON nested past MAX_JSON_DEPTH (ipaas.wire),
    given in its place so that every depth gets it: the core can give it only one level
    past the limit (deeper, protobuf cannot parse the request it is sent), and protobuf's
    JSON parser here gives up deeper still. `body`: past what orjson reads, no field can
    be named."""
    problem = f"is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)"
    return HttpError.from_grpc(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}", [{"field": field, "description": problem}], reasons.INVALID_FIELD)


_KEY_HEADERS = (b"idempotency-key", b"x-idempotency-key")


def _idempotency_key(scope: dict[str, Any], h: dict[str, str]) -> str | None:
    """The request's Idempotency-Key (or X-Idempotency-Key). Two different values, in two
    headers or one repeated, are refused: taking either one silently could answer a retry
    with another request's answer, or run it twice."""
    key = h.get("idempotency-key") or h.get("x-idempotency-key")
    if key is not None:
        values = {value for name, value in scope["headers"] if name.lower() in _KEY_HEADERS}
        if len(values) > 1:
            raise HttpError(400, "the request has more than one Idempotency-Key (or X-Idempotency-Key) value: send one", reason=reasons.INVALID_HEADER)
    return key


class Gateway:
    def __init__(self, settings: Settings, *, freeze_heap: bool = False) -> None:
        self.settings = settings
        self.freeze_heap = freeze_heap  # a process of its own (see ipaas.heap), not a test's
        self.router = Router()
        self.openapi = orjson.dumps(build_openapi(self.router.routes))
        env = settings.extra
        unlimited = frozenset(t.strip() for t in env.get("IPAAS_RATE_UNLIMITED_TENANTS", "").split(",") if t.strip())
        self.rate_limits_off = boolean(env, "IPAAS_RATE_LIMITS_OFF", False)
        self.body_timeout = request_deadlines.body_timeout(env)
        tiers = parse_tiers(env)
        webhooks = tiers[ANONYMOUS_WEBHOOKS]
        tiers[UNKNOWN_WEBHOOK_IDS] = Tier(UNKNOWN_WEBHOOK_IDS, webhooks.rate * UNKNOWN_IDS_FACTOR, webhooks.burst * UNKNOWN_IDS_FACTOR)
        self.limiter = RateLimiter(tiers, settings.redis_url, unlimited)
        self.metrics: metrics.GatewayMetrics | metrics.NoMetrics = (
            metrics.GatewayMetrics([r.template for r in self.router.routes], UNLIMITED_PATHS, tiers, [c.name for c in grpc.StatusCode]) if metrics.enabled(env) else metrics.NoMetrics()
        )
        self.client: CoreClient | None = None
        self.webhooks: WebhookBatcher | None = None
        self.store: Any = None
        self._db: Any = None
        self._callers: dict[str, tuple[float, str, str]] = {}
        self._refused: dict[str, tuple[float, HttpError]] = {}  # key digest -> (until, the core's answer)
        self._checks: SingleFlight[str, tuple[str, str]] = SingleFlight()
        self._owners: dict[str, tuple[float, str, str]] = {}
        # (client address, workflow id) -> when the core last refused a webhook of that
        # address to that workflow here. Keyed by both, not the address alone: senders are
        # shared SaaS egress, and one tenant's dead or misconfigured hook had every other
        # tenant's webhooks from that SaaS answered 429. Only those pairs' webhooks look at
        # their budget first: the look costs ~5 us a webhook (5 % of the gateway's CPU for
        # one), and a pair never refused has nothing spent to look at, on this replica.
        # Another replica's refusals (shared through Redis) are seen here after this one
        # refuses that pair once.
        self._refused_senders: dict[tuple[str, str], float] = {}
        # Client address -> when the core last answered one of its webhooks 404 here: its
        # webhooks to workflows not known live here look at its unknown-ids budget first.
        self._unknown_id_senders: dict[str, float] = {}
        self._started = time.monotonic()
        self._draining = False
        self._stopping = False
        self.startup_error: BaseException | None = None  # why the start failed, for `ipaas gateway`'s one line
        self._purger: asyncio.Task[None] | None = None
        self._store_down = ThrottledWarning(log, "idempotency.store_unavailable")

    # -- lifecycle ---------------------------------------------------------------------------
    async def startup(self) -> None:
        self.client = CoreClient(self.settings.core_target)
        send = self.client.call("/ipaas.v1.ExecutionService/ReceiveWebhooks", executions_pb2.ReceiveWebhooksResponse)
        self.webhooks = WebhookBatcher(lambda batch: send(batch, timeout=CALL_TIMEOUT))
        if self.settings.redis_url:
            self.store = idempotency.RedisStore(self.settings.redis_url)
        else:
            from sqlalchemy.engine import make_url

            from ipaas.storage.db import Database

            url = self.settings.database_url
            if make_url(url).get_backend_name() == "sqlite":
                # A file of its own: SQLite has one writer per file, and sharing the core's
                # would make every keyed request wait on the core's commits (and the core on it).
                url = f"sqlite:///{self.settings.data_dir / 'gateway-idempotency.db'}"
            # NORMAL: a record lost to a power cut costs a replay at most; the core's outbox
            # dedupes the trigger by the same key.
            # A database still starting (the machine booting) is waited for, not a failure.
            await lifecycle.wait_for_database(url, lifecycle.database_wait_seconds(self.settings.extra), stopping=lambda: self._stopping)
            self._db = Database(url, pool_size=5, synchronous="NORMAL")
            self.store = idempotency.SqlStore(self._db)
            await self.store.create()
        self._purger = asyncio.create_task(self._purge_loop())
        if self.freeze_heap:
            heap.after_startup()

    def stop_requested(self) -> None:
        """A stop signal: report not ready from now on, and give up waiting at start-up."""
        self._draining = self._stopping = True

    async def shutdown(self) -> None:
        self._draining = True
        if self._purger:
            self._purger.cancel()
        if self.webhooks:
            await self.webhooks.close()
        if self.client:
            await self.client.close()
        if self.store is not None:
            await self.store.close()
        if self._db is not None:
            await self._db.dispose()

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(600)
            with contextlib.suppress(Exception):
                await self.store.purge()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.startup()
                    except Exception as exc:
                        # Said in one line by whoever runs the gateway (ipaas.cli), not in
                        # uvicorn's log.
                        self.startup_error = exc
                        await send({"type": "lifespan.startup.failed", "message": ""})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        response = await self.handle(Request(scope, receive))
        try:
            await response(scope, receive, send)
        finally:
            self.metrics.observe(scope, response.status_code, time.perf_counter() - started)

    # -- one request -------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        h = _header_map(request.scope)
        path = request.scope["path"]
        rid = _request_id(h.get("x-request-id"))
        meta: dict[str, Any] = {"request_id": rid}
        headers = {"X-Request-ID": rid}
        with logs.bind(request_id=rid):
            try:
                if request.scope.get("extensions", {}).get(request_deadlines.OVER_CAPACITY) and path != "/health/live":
                    # Alive all the same: a probe that failed here would have the process
                    # restarted for being busy, which drops every connection it serves.
                    raise HttpError(503, "the gateway has too many connections open: retry shortly", headers={"Retry-After": "1", "Connection": "close"}, reason=reasons.SERVICE_UNAVAILABLE)
                if _header_bytes(request.scope) > MAX_HEADER_BYTES:
                    raise HttpError(431, f"the request headers exceed {MAX_HEADER_BYTES} bytes", headers={"Connection": "close"}, reason=reasons.HEADERS_TOO_LARGE)
                if path in UNLIMITED_PATHS:
                    return await self._local(request, meta, headers)
                return await self._transcode(request, h, meta, headers)
            except HttpError as err:
                return envelope.json_response(err.status, envelope.error_body(err, meta), {**headers, **err.headers})
            except Exception:
                log.exception("gateway.failed", extra={"path": path})
                err = HttpError(500, f"internal error (request id {rid})", reason=reasons.INTERNAL_ERROR)
                return envelope.json_response(500, envelope.error_body(err, meta), headers)

    async def _transcode(self, request: Request, h: dict[str, str], meta: dict[str, Any], headers: dict[str, str]) -> Response:
        path = request.scope["path"]
        raw_path = request.scope.get("raw_path")
        match, allowed = self.router.match(request.method, raw_path.decode("latin-1") if raw_path else path)
        if match is None:
            if allowed:
                raise HttpError(405, f"{request.method} is not allowed here", headers={"Allow": ", ".join(sorted(allowed))}, reason=reasons.METHOD_NOT_ALLOWED)
            raise HttpError(404, f"no route for {path}", reason=reasons.ROUTE_NOT_FOUND)
        route = match.route
        request.scope[metrics.ROUTE] = route.template
        body = await self._read_body(request, h, WEBHOOK_BODY_LIMIT if route.raw_body else BODY_LIMIT)
        if body and not route.raw_body:
            ctype = h.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in ("application/json", "") and not ctype.endswith("+json"):
                raise HttpError(415, "send JSON: Content-Type: application/json", reason=reasons.UNSUPPORTED_MEDIA_TYPE)
        message = self._request_message(route, match, request, h, body)

        tenant, tier = await self._caller(route, match, h, request, headers)
        # A webhook's sender is known only once the core has checked its signature: before
        # the call the owner's budget is only looked at, and spent once the core accepted it
        # (below), so requests it refuses cannot keep the owner's own API rate-limited.
        await self._limit(tenant, tier, headers, spend=not route.raw_body)
        if route.raw_body and (self._refused_senders or self._unknown_id_senders):
            await self._limit_refused_webhooks(_client_address(request), match.params.get("workflow_id", ""))

        key = _idempotency_key(request.scope, h)
        if request.method not in IDEMPOTENT_VERBS:
            key = None  # reads and deletes are idempotent already; the core has no use for it
        elif key is not None and not (1 <= len(key) <= idempotency.MAX_KEY_LENGTH and _ascii_text(key)):
            # It travels as gRPC metadata, which is printable ASCII.
            raise HttpError(400, f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_LENGTH} printable ASCII characters", reason=reasons.INVALID_HEADER)
        # Webhooks keep no answer here: it would be kept before the core checked the
        # signature, so an unsigned sender could answer the genuine delivery's key or read
        # its answer. The core dedupes what it accepted, by webhook-id or by the key.
        if key is None or route.raw_body:
            try:
                status, content = await self._call(route, message, h, meta, key)
            except HttpError as err:
                if route.raw_body and 400 <= err.status < 500 and err.status != 429:  # refused, not "not now"
                    await self._spend_refused_webhook(_client_address(request), match.params.get("workflow_id", ""), err.status, headers)
                raise
            if route.raw_body and (owner := self._owners.get(match.params.get("workflow_id", ""))):
                await self._spend(owner[1], owner[2], headers)
            return envelope.json_response(status, content, headers)
        scope = f"{tenant}:{key}"
        fingerprint = idempotency.fingerprint(request.method, path, request.scope.get("query_string", b"").decode("latin-1"), h.get("if-match", ""), body)
        try:
            record = await self.store.begin(scope, fingerprint)
        except Exception as exc:
            # Without its store the key cannot be honoured: running the request anyway could
            # run it twice. The caller retries later (or without the key).
            self._store_down(exc)
            raise HttpError(503, "the idempotency store is unavailable: retry shortly", headers={"Retry-After": str(envelope.RETRY_AFTER[grpc.StatusCode.UNAVAILABLE])}, reason=reasons.IDEMPOTENCY_STORE_UNAVAILABLE) from None
        if record is not None:
            if record.fingerprint != fingerprint:
                raise HttpError(422, "this Idempotency-Key was used with a different request", reason=reasons.IDEMPOTENCY_KEY_REUSED)
            if not record.done:
                raise HttpError(409, "a request with this Idempotency-Key is still being processed", reason=reasons.IDEMPOTENCY_KEY_IN_USE)
            # A replay never reaches the core, so the key is checked there first: from the
            # cache, a key revoked in the last CALLER_TTL seconds would still read the answer
            # (which may hold a webhook secret). Replays are rare; the check costs one call.
            await self._caller(route, match, h, request, headers, fresh=True)
            answer = kept_answers.open_sealed(h.get("authorization", ""), scope, fingerprint, record.body)
            if answer is None:
                raise HttpError(422, "this Idempotency-Key was used by another API key: only the key that made the request can read its answer", reason=reasons.IDEMPOTENCY_KEY_REUSED)
            replay = {**headers, **(record.headers or {}), "X-Idempotency-Replay": "true"}
            self.metrics.replayed()
            return envelope.json_response(record.status, envelope.with_meta(answer, meta), replay)
        try:
            status, content = await self._call(route, message, h, meta, key)
        except HttpError as err:
            if err.status in idempotency.TRANSIENT_STATUSES:
                await self._release(scope)
            else:  # the core's answer to this request, even an error: keep it
                await self._keep(h, scope, fingerprint, err.status, err.headers, envelope.error_body(err, meta))
            raise
        except BaseException:
            await self._release(scope)
            raise
        await self._keep(h, scope, fingerprint, status, {}, content)
        return envelope.json_response(status, content, headers)

    # The request has run: a store that fails now must not hide its answer. The key's lock
    # then expires after LOCK_SECONDS, and the core dedupes a retry's trigger by the key.
    async def _keep(self, h: dict[str, str], scope: str, fingerprint: str, status: int, headers: dict[str, str], content: bytes) -> None:
        try:
            sealed = kept_answers.seal(h.get("authorization", ""), scope, fingerprint, content)
            await self.store.complete(scope, fingerprint, status, headers, sealed)
        except Exception as exc:
            self._store_down(exc)

    async def _release(self, scope: str) -> None:
        try:
            await self.store.abandon(scope)
        except Exception as exc:
            self._store_down(exc)

    async def _limit_refused_webhooks(self, sender: str, workflow_id: str) -> None:
        """Before a webhook reaches the core: the budgets its sender spent on refusals, only
        looked at (spent in _spend_refused_webhook). A pair never refused, to a workflow known
        live here, looks at nothing."""
        now = time.monotonic()
        refused_at = self._refused_senders.get((sender, workflow_id))
        if refused_at is not None and now - refused_at < REFUSED_SENDER_TTL:
            await self._limit(f"{ANONYMOUS_WEBHOOKS}:{sender}:{workflow_id}", ANONYMOUS_WEBHOOKS, {}, spend=False)
        unknown_at = self._unknown_id_senders.get(sender)
        if unknown_at is not None and now - unknown_at < REFUSED_SENDER_TTL:
            owner = self._owners.get(workflow_id)
            if owner is None or owner[0] <= now:  # a workflow accepted here lately never waits on it
                await self._limit(f"{UNKNOWN_WEBHOOK_IDS}:{sender}", UNKNOWN_WEBHOOK_IDS, {}, spend=False)

    async def _spend_refused_webhook(self, sender: str, workflow_id: str, status: int, headers: dict[str, str]) -> None:
        """The core refused a webhook: spend the (address, workflow) budget, and for an id the
        core does not know (404) the address's unknown-ids budget, once per id a minute, so
        a flood of made-up ids from one address waits while a dead hook retried for days
        costs its address's other webhooks nothing."""
        if len(self._refused_senders) > MAX_CACHED_KEYS:
            self._refused_senders.clear()
        if len(self._unknown_id_senders) > MAX_CACHED_KEYS:
            self._unknown_id_senders.clear()
        now = time.monotonic()
        refused_at = self._refused_senders.get((sender, workflow_id))
        self._refused_senders[(sender, workflow_id)] = now
        await self._spend(f"{ANONYMOUS_WEBHOOKS}:{sender}:{workflow_id}", ANONYMOUS_WEBHOOKS, headers)
        if status == 404 and (refused_at is None or now - refused_at >= REFUSED_SENDER_TTL):
            self._unknown_id_senders[sender] = now
            await self._spend(f"{UNKNOWN_WEBHOOK_IDS}:{sender}", UNKNOWN_WEBHOOK_IDS, {})

    async def _limit(self, tenant: str | None, tier: str | None, headers: dict[str, str], *, spend: bool) -> None:
        """The caller's rate limit: its headers on the answer, 429 when over the budget."""
        if not tenant or not tier or tier == "admin" or self.rate_limits_off:
            return
        decision = await self.limiter.check(tenant, tier, spend=spend)
        if decision is None:
            return
        headers.update(decision.headers)
        if not decision.allowed:
            self.metrics.rate_limited(tier)
            raise HttpError(429, "rate limit exceeded: slow down and retry after the time in Retry-After", headers={"Retry-After": str(decision.retry_after)}, reason=reasons.RATE_LIMITED)

    async def _spend(self, tenant: str, tier: str, headers: dict[str, str]) -> None:
        """Count an accepted webhook against its owner. It is accepted already: when
        webhooks that arrived together overran the budget, they are not refused for it."""
        if tier == "admin" or self.rate_limits_off:
            return
        decision = await self.limiter.check(tenant, tier)
        if decision is not None:
            headers.update(decision.headers)

    async def _read_body(self, request: Request, h: dict[str, str], limit: int) -> bytes:
        declared = h.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"the body exceeds {limit} bytes", reason=reasons.PAYLOAD_TOO_LARGE)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HttpError(413, f"the body exceeds {limit} bytes", reason=reasons.PAYLOAD_TOO_LARGE)
                    chunks.append(chunk)
        except TimeoutError:
            # What is left of the body would be read as the next request: the connection ends.
            raise HttpError(408, f"the body did not arrive within {self.body_timeout:g} s", headers={"Connection": "close"}, reason=reasons.REQUEST_TIMEOUT) from None
        return b"".join(chunks)

    def _request_message(self, route: Route, match: Match, request: Request, h: dict[str, str], body: bytes) -> Any:
        message = message_factory.GetMessageClass(route.method.input_type)()
        if route.raw_body:
            target = getattr(message, route.body)
            target.data = body
            target.content_type = h.get("content-type", "")
            if "headers" in route.method.input_type.fields_by_name:
                for name, value in request.headers.items():
                    if name not in HOP_BY_HOP:
                        message.headers[name] = value
        elif route.body:
            data: Any = {}
            if body:
                try:
                    data = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    if str(exc).startswith(_ORJSON_TOO_DEEP):  # valid JSON, past orjson's 1,024 levels
                        raise _nested_too_deeply("body") from None
                    raise HttpError(400, "the body is not valid JSON", reason=reasons.REQUEST_UNPARSABLE) from None
                if not isinstance(data, dict):
                    raise HttpError(400, "the body must be a JSON object", reason=reasons.REQUEST_UNPARSABLE)
                # A body with fewer brackets than the limit cannot nest past it: the usual
                # small one is not walked.
                if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH:
                    described = route.method.input_type if route.body == "*" else route.method.input_type.fields_by_name[route.body].message_type
                    if (deep := parse_errors.nested_too_deeply(described, data, MAX_JSON_DEPTH)) is not None:
                        raise _nested_too_deeply(deep)
                if (where := inexact_integer(data, body)) is not None:
                    where = where if len(where) <= MAX_PARAM_LENGTH else where[:MAX_PARAM_LENGTH] + "…"
                    raise HttpError(400, f"{where} is an integer past ±2^53, which the API cannot carry exactly: send it as a string", details=[{"field": where, "description": f"integers must lie within ±{EXACT}"}], reason=reasons.INVALID_FIELD)
            target = message if route.body == "*" else getattr(message, route.body)
            if (shape := parse_errors.shape_problem(target.DESCRIPTOR, data)) is not None:
                raise HttpError(400, f"the body does not fit the request: {shape[0]} {shape[1]}", details=[{"field": shape[0], "description": shape[1]}], reason=reasons.INVALID_FIELD)
            try:
                json_format.ParseDict(data, target, ignore_unknown_fields=False)
            except json_format.ParseError as exc:
                field, problem = parse_errors.describe(str(exc))
                field = field if len(field) <= MAX_PARAM_LENGTH else field[:MAX_PARAM_LENGTH] + "…"  # a key the caller made up
                raise HttpError(400, f"the body does not fit the request: {field} {problem}", details=[{"field": field, "description": problem}], reason=reasons.INVALID_FIELD) from None
        fields = route.method.input_type.fields_by_name
        for name, raw in match.params.items():
            if len(raw) > MAX_PARAM_LENGTH:  # no resource has such a name
                raise HttpError(404, f"not found: {name} is longer than {MAX_PARAM_LENGTH} characters", details=[{"field": name, "description": f"at most {MAX_PARAM_LENGTH} characters"}], reason=reasons.RESOURCE_NOT_FOUND)
            try:
                setattr(message, name, field_value(fields[name], raw))
            except (ValueError, TypeError):
                raise HttpError(400, f"path parameter {name} is not valid", details=[{"field": name, "description": "invalid value"}], reason=reasons.INVALID_FIELD) from None
        for field in route.query_fields:
            raw = request.query_params.get(field.name) or request.query_params.get(field.json_name)
            if raw is None:
                continue
            if len(raw) > MAX_PARAM_LENGTH:
                raise HttpError(400, f"query parameter {field.name} is too long", details=[{"field": field.name, "description": f"at most {MAX_PARAM_LENGTH} characters"}], reason=reasons.INVALID_FIELD)
            try:
                setattr(message, field.name, field_value(field, raw))
            except (ValueError, TypeError):
                raise HttpError(400, f"query parameter {field.name} is not valid", details=[{"field": field.name, "description": "invalid value"}], reason=reasons.INVALID_FIELD) from None
        if "expected_version" in fields and not message.expected_version and h.get("if-match"):
            if sum(1 for name, _ in request.scope["headers"] if name.lower() == b"if-match") > 1:
                # Two If-Match lines are one list (RFC 9110), refused as `"1", "2"` in one
                # line is: taking the first would check the change against a version the
                # client may not have meant.
                raise HttpError(400, 'If-Match must be one version number, e.g. If-Match: "3"', reason=reasons.INVALID_HEADER)
            version = h["if-match"].removeprefix("W/").strip().strip('"')
            # isdigit alone takes "²" and other Unicode digits; a version is an int32.
            if not (version.isascii() and version.isdigit() and len(version) <= 10 and int(version) <= MAX_VERSION):
                raise HttpError(400, 'If-Match must be a version number, e.g. If-Match: "3"', reason=reasons.INVALID_HEADER)
            message.expected_version = int(version)
        return message

    async def _caller(self, route: Route, match: Match, h: dict[str, str], request: Request, headers: dict[str, str], fresh: bool = False) -> tuple[str | None, str | None]:
        """The tenant and tier a request is charged to (webhooks: the workflow's owner).
        `fresh`: ask the core even if the caller is cached."""
        now = time.monotonic()
        if route.name == "ReceiveWebhook":
            # Anonymous by nature (signed, not keyed): charged to the owner once accepted.
            owner = self._owners.get(match.params.get("workflow_id", ""))
            return (owner[1], owner[2]) if owner and owner[0] > now else (None, None)
        auth = h.get("authorization")
        if auth is not None and sum(1 for name, _ in request.scope["headers"] if name.lower() == b"authorization") > 1:
            # Only the first value went on to the core, so which key a request ran as was
            # left to the order in which a client or proxy wrote the headers. The core
            # refuses the same over gRPC.
            raise HttpError(401, "send one Authorization header", reason=reasons.AUTHORIZATION_AMBIGUOUS)
        if not auth:
            await self._limit_anonymous(request, headers)  # the core would refuse it, at a cost
            return None, None
        if len(auth) > MAX_AUTHORIZATION_LENGTH or not _ascii_text(auth):  # no API key looks like that
            raise HttpError(401, "invalid Authorization header: send Authorization: Bearer <API key>", reason=reasons.API_KEY_INVALID)
        digest = hashlib.sha256(auth.encode()).hexdigest()
        cached = self._callers.get(digest)
        if cached and cached[0] > now and not fresh:
            return cached[1], cached[2]
        refused = self._refused.get(digest)
        if refused and refused[0] > now:
            kept = refused[1]
            raise HttpError(401, kept.message, kept.code, reason=kept.reason, metadata=kept.metadata)

        async def ask_core() -> tuple[str, str]:
            if cached is None:
                # Never accepted here: possibly one of a flood of made-up keys, which no
                # cache stops. A key this gateway has accepted before (its entry expired,
                # kept until the cache is cleared) is re-checked without it, so a tenant
                # sharing an address with such a flood keeps working.
                await self._limit_anonymous(request, headers)
            from ipaas.v1 import tenants_pb2

            assert self.client is not None
            call = self.client.call("/ipaas.v1.TenantService/GetCaller", tenants_pb2.GetCallerResponse)
            try:
                reply = await call(tenants_pb2.GetCallerRequest(), metadata=(("authorization", auth),), timeout=5)
            except grpc.aio.AioRpcError as exc:
                error = self._rpc_error(exc)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and error.status == 401:
                    if len(self._refused) > MAX_CACHED_KEYS:
                        self._refused.clear()
                    self._refused[digest] = (time.monotonic() + REFUSED_TTL, error)
                    self._callers.pop(digest, None)  # revoked: re-checked as an unknown key
                raise error from None
            tenant = reply.tenant_id or "admin"
            if len(self._callers) > MAX_CACHED_KEYS:
                self._callers.clear()
            self._callers[digest] = (time.monotonic() + CALLER_TTL, tenant, reply.tier)
            return tenant, reply.tier

        if fresh:  # a check begun before this request must not answer for it
            return await ask_core()
        # A new key's first burst (or a busy key's expiry) asks the core, and spends the
        # anonymous budget, once.
        return await self._checks.do(digest, ask_core)

    async def _limit_anonymous(self, request: Request, headers: dict[str, str]) -> None:
        """The budget of requests with no known caller, per client address; checked before
        the core is asked, and apart from every tenant's budget."""
        await self._limit(f"{ANONYMOUS}:{_client_address(request)}", ANONYMOUS, headers, spend=True)

    async def _call(self, route: Route, message: Any, h: dict[str, str], meta: dict[str, Any], key: str | None) -> tuple[int, bytes]:
        assert self.client is not None
        if route.name == "ReceiveWebhook":
            reply = await self._webhook(message, meta, key)
        else:
            response_class = message_factory.GetMessageClass(route.method.output_type)
            metadata = [("x-request-id", meta["request_id"])]
            if auth := h.get("authorization"):
                metadata.append(("authorization", auth))
            if key:
                metadata.append(("idempotency-key", key))
            try:
                reply = await self.client.call(route.path, response_class)(message, metadata=metadata, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                raise self._rpc_error(exc) from None
        data = integral(json_format.MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
        if "next_page_token" in data:
            meta["pagination"] = {"next_page_token": data.pop("next_page_token")}
        if route.response_body:
            data = data.get(route.response_body, {})
        status = route.success_status
        return status, (b"" if status == 204 else envelope.body(data, meta))

    async def _webhook(self, message: Any, meta: dict[str, Any], key: str | None) -> Any:
        """One webhook, sent to the core with those that arrived beside it."""
        assert self.webhooks is not None
        delivery = executions_pb2.WebhookDelivery(webhook=message, request_id=meta["request_id"], idempotency_key=key or "")
        try:
            result = await self.webhooks.submit(delivery)
        except OversizedDelivery:
            # Refused for good: sent, the call would fail on gRPC's message limit (a 502 the
            # sender would retry forever).
            raise HttpError(413, "the webhook (body and headers) is too large to deliver", reason=reasons.PAYLOAD_TOO_LARGE) from None
        except grpc.aio.AioRpcError as exc:
            raise self._rpc_error(exc) from None
        if result.HasField("error"):
            error = result.error
            raise self._error(STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message, error, from_core=True)
        # The webhook counts against its owner's rate limit from now on.
        if len(self._owners) > MAX_CACHED_KEYS:  # one entry per workflow ever accepted, else
            self._owners.clear()
        self._owners[message.workflow_id] = (time.monotonic() + OWNER_TTL, result.tenant_id, result.tier or "free")
        return result.accepted

    def _rpc_error(self, exc: grpc.aio.AioRpcError) -> HttpError:
        from_core = any(k == "x-request-id" for k, _ in exc.trailing_metadata() or ())
        if not from_core or exc.code() in CORE_FAILURE_CODES:
            self.metrics.core_call_failed(exc.code().name)
        if exc.code() not in CHANNEL_CODES and not from_core:
            # The core's handlers answer every call with x-request-id in the trailers: an
            # error without it is the channel's own (an answer over gRPC's metadata limit,
            # a stream reset), and its words are the transport's, not the caller's business.
            log.warning("core.unreadable_answer", extra={"grpc_code": exc.code().name, "details": (exc.details() or "")[:200]})
            return HttpError(502, "the core's answer could not be read", reason=reasons.CORE_ANSWER_UNREADABLE)
        status = None
        with contextlib.suppress(Exception):  # a status that does not match the call's
            status = rpc_status.from_call(exc)
        return self._error(exc.code(), exc.details(), status, from_core=from_core)

    @staticmethod
    def _error(code: grpc.StatusCode, details: str | None, status: status_pb2.Status | None, from_core: bool = False) -> HttpError:
        violations: list[dict[str, str]] = []
        reason: str | None = None
        metadata: dict[str, str] | None = None
        retry_after: float | None = None
        with contextlib.suppress(Exception):
            for detail in status.details if status else []:
                bad, info, retry = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
                if detail.Unpack(bad):
                    violations += [{"field": v.field, "description": v.description} for v in bad.field_violations]
                elif detail.Unpack(info) and info.domain == reasons.DOMAIN:
                    reason, metadata = info.reason, dict(info.metadata)
                elif detail.Unpack(retry):
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        message = details or code.name.lower()
        if code == grpc.StatusCode.UNAVAILABLE and not from_core:  # the channel's words, not the core's
            message = "the core is unavailable: retry shortly"
        error = HttpError.from_grpc(code, message, violations, reason, metadata)
        if retry_after is not None:  # the core's rate limit says when: the status's default (1 s) would be retried too soon
            error.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return error

    # -- local endpoints -----------------------------------------------------------------------
    async def _local(self, request: Request, meta: dict[str, Any], headers: dict[str, str]) -> Response:
        path = request.url.path
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, f"{request.method} is not allowed here", headers={"Allow": "GET, HEAD"}, reason=reasons.METHOD_NOT_ALLOWED)
        if path == "/metrics":
            if not isinstance(self.metrics, metrics.GatewayMetrics):  # IPAAS_METRICS=0
                raise HttpError(404, f"no route for {path}", reason=reasons.ROUTE_NOT_FOUND)
            body, content_type = self.metrics.exposition(request.headers.get("accept"))
            return Response(body, headers={**headers, "Content-Type": content_type})
        if path == "/openapi.json":
            return Response(self.openapi, media_type="application/json", headers=headers)
        if path == "/docs":
            return HTMLResponse(DOCS_PAGE, headers=headers)
        if path == "/health/live":
            return envelope.json_response(200, envelope.body({"status": "alive"}, meta), headers)
        assert self.client is not None
        core_ok = await self.client.serving()
        if path == "/health/ready":
            if self._draining or not core_ok:
                raise HttpError(503, "not ready: " + ("draining" if self._draining else "the core is unreachable"), details=[{"check": "core", "status": "ok" if core_ok else "failing"}], reason=reasons.NOT_READY)
            # Not Redis: every gateway shares it, so a Redis outage would take all of them
            # out of the balancer at once, though all they lose is keyed requests (503) and
            # shared rate limits (open). /health reports it for monitoring.
            return envelope.json_response(200, envelope.body({"status": "ready"}, meta), headers)
        checks = {"core": "ok" if core_ok else "failing", "database": await self._store_check(), "runtime": "ok"}
        if isinstance(self.store, idempotency.RedisStore):
            checks["redis"] = "ok" if await self._redis_ok() else "failing"
        uptime = time.monotonic() - self._started
        report = {
            "status": "healthy" if all(v == "ok" for v in checks.values()) else "unhealthy",
            "version": __version__,
            "uptime": f"{int(uptime // 3600)}h{int(uptime % 3600 // 60)}m{int(uptime % 60)}s",
            "uptime_seconds": round(uptime, 3),
            "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "checks": checks,
        }
        if report["status"] != "healthy":
            raise HttpError(503, "unhealthy: " + ", ".join(k for k, v in checks.items() if v != "ok"), details=[report], reason=reasons.NOT_READY)
        return envelope.json_response(200, envelope.body(report, meta), headers)

    async def _redis_ok(self) -> bool:
        """Whether Redis answers a ping in time (keyed requests need it)."""
        assert isinstance(self.store, idempotency.RedisStore)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.store.redis.ping()
            return True
        except Exception:
            return False

    async def _store_check(self) -> str:
        try:
            async with asyncio.timeout(2):
                if isinstance(self.store, idempotency.RedisStore):
                    await self.store.redis.ping()
                else:
                    from sqlalchemy import text

                    async with self._db.engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
            return "ok"
        except Exception:
            return "failing"


def create_app(settings: Settings, *, freeze_heap: bool = False) -> Gateway:
    return Gateway(settings, freeze_heap=freeze_heap)
