"""ExecutionService: triggers in, execution state out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from ipaas import logs
from ipaas.auth import current_tenant as _tenant
from ipaas.dryrun import DryRunner
from ipaas.engine.outbox import queue_depth
from ipaas.errors import IpaasError, InvalidArgument
from ipaas.execution_store import ExecutionStore, ExecutionView
from ipaas.pagination import PageRequest, within_bytes
from ipaas.service import convert
from ipaas.service.interceptors import DATABASE_UNAVAILABLE, REQUEST_ID, add_trailing_metadata, database_down, request_id_from
from ipaas.service.status import internal_status_proto, to_status_proto
from ipaas.triggers import TriggerService
from ipaas.v1 import executions_pb2 as pb
from ipaas.v1 import executions_pb2_grpc
from ipaas.wire import MAX_JSON_DEPTH, REPLY_ITEMS_BYTES, nested_deeper_than

log = logging.getLogger("ipaas.rpc")

MAX_BATCH = 512
# A reply whose steps each carry a rendered_config and an output: an execution, a dry run.
Stepped = TypeVar("Stepped", pb.Execution, pb.DryRunResponse)


def _idempotency_key(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "idempotency-key" and isinstance(value, str):
            return value
    return None


def _carried(value: Any) -> Any:
    """value, or a note in its place where it nests deeper than a reply can carry (ipaas.wire).
    Triggers and steps refuse such values now; rows stored before that would otherwise fail
    their execution's every read and every page of ListExecutions that holds them."""
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        return {"omitted": f"nested more than {MAX_JSON_DEPTH} levels deep, more than one reply carries"}
    return value


def _step(row) -> pb.StepRun:  # type: ignore[no-untyped-def]
    return pb.StepRun(
        step_id=row.step_id,
        status=row.status,
        attempts=row.attempts,
        rendered_config=convert.to_struct(_carried(row.rendered_config)),
        output=convert.to_struct(_carried(row.output)),
        error=row.error or "",
        retryable=row.retryable,
        started_at=convert.timestamp(row.started_at),
        finished_at=convert.timestamp(row.finished_at),
        duration_ms=row.duration_ms or 0,
        message=row.message or "",
    )


def execution(row, steps=()) -> pb.Execution:  # type: ignore[no-untyped-def]
    return pb.Execution(
        id=row.id,
        workflow_id=row.workflow_id,
        workflow_version=row.workflow_version,
        status=row.status,
        trigger=row.trigger,
        payload=convert.to_value(_carried(row.payload)),
        attempts=row.attempts,
        error=row.error or "",
        steps=[_step(s) for s in steps],
        created_at=convert.timestamp(row.created_at),
        started_at=convert.timestamp(row.started_at),
        finished_at=convert.timestamp(row.finished_at),
        next_attempt_at=convert.timestamp(row.next_attempt_at),
    )


def _view(view: ExecutionView) -> pb.Execution:
    return _within_reply(execution(view.execution, view.steps))


def _within_reply(message: Stepped) -> Stepped:
    """Each step may keep up to 1 MiB of rendered config and 256 KiB of output, so a long
    workflow over a large payload can outgrow one gRPC reply (4 MiB), and the execution (or
    the dry run, whose connectors may have been called) could not be read at all. Its largest
    configs and outputs then give way to a note of their size; status, payload and errors
    stay."""
    excess = message.ByteSize() - REPLY_ITEMS_BYTES
    if excess <= 0:
        return message
    parts = [(getattr(step, name).ByteSize(), getattr(step, name)) for step in message.steps for name in ("rendered_config", "output")]
    for size, part in sorted(parts, key=lambda p: p[0], reverse=True):
        if excess <= 0:
            break
        part.Clear()
        part.update({"omitted": f"{size} bytes, more than one reply holds"})
        excess -= size
    return message


def _log_accepted(request_ids: list[str], execution_ids: list[str]) -> None:
    """One line per call that pairs each accepted webhook's request id with its execution
    (the i-th id of one list with the i-th of the other): the execution's own lines come from
    an engine process that never saw the request. Per call, not per webhook: under load a
    line per webhook added ~30 us to the core's ~120 us of CPU per webhook; with the
    gateway's batches (~16 webhooks a call at saturation) this one costs ~6 us a webhook.
    Two lists of strings are the cheapest structure to mask (a list of objects: 40 % more)."""
    if request_ids:
        log.info("webhooks.accepted", extra={"request_ids": request_ids, "execution_ids": execution_ids})


class ExecutionServicer(executions_pb2_grpc.ExecutionServiceServicer):
    def __init__(self, triggers: TriggerService, store: ExecutionStore, dry_runner: DryRunner, dispatcher: Any = None) -> None:
        self.triggers = triggers
        self.store = store
        self.dry_runner = dry_runner
        self.dispatcher = dispatcher
        # Webhooks accepted (committed, or recognised as a repeat), counted per webhook:
        # ipaas_core_webhooks_accepted_total.
        self.webhooks_accepted = 0

    async def GetQueueStats(self, request: pb.GetQueueStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetQueueStatsResponse:
        enqueuer = self.triggers.enqueuer
        return pb.GetQueueStatsResponse(
            depth=await enqueuer.refresh_depth(),
            max_depth=enqueuer.max_depth,
            tenant_depth=await queue_depth(enqueuer.db, _tenant()),
            in_flight=self.dispatcher.inflight if self.dispatcher else 0,
            workers=self.dispatcher.workers if self.dispatcher else 0,
            tenant_max_depth=min(enqueuer.max_depth, enqueuer.max_tenant_depth or enqueuer.max_depth),
        )

    async def RunWorkflow(self, request: pb.RunWorkflowRequest, context: grpc.aio.ServicerContext) -> pb.RunWorkflowResponse:
        tenant = _tenant()
        payload = convert.from_value(request.payload, "payload") if request.HasField("payload") else None
        accepted, version = await self.triggers.run_manual(tenant, request.workflow_id, payload, _idempotency_key(context), request.version)
        if accepted.duplicate:  # the earlier run, as it is now
            return pb.RunWorkflowResponse(execution=_view(await self.store.get(tenant, accepted.execution_id)), duplicate=True)
        # A new run is answered as it was accepted, without reading back what was just
        # written: that read was a third of the call's database work.
        new = pb.Execution(id=accepted.execution_id, workflow_id=request.workflow_id, workflow_version=version, status=accepted.status, trigger="manual", created_at=convert.timestamp(accepted.created_at))
        if payload is None:
            new.payload.null_value = struct_pb2.NULL_VALUE  # as a stored run without one reads
        else:
            new.payload.CopyFrom(request.payload)
        return pb.RunWorkflowResponse(execution=new, duplicate=False)

    async def ReceiveWebhook(self, request: pb.ReceiveWebhookRequest, context: grpc.aio.ServicerContext) -> pb.ReceiveWebhookResponse:
        with logs.bind(workflow_id=request.workflow_id):
            target, accepted = await self.triggers.receive_webhook(
                request.workflow_id, request.http_body.data, dict(request.headers), _idempotency_key(context)
            )
        # The gateway charges the webhook to the owner's rate limit with this.
        add_trailing_metadata(context, ("x-ipaas-tenant", target.tenant_id), ("x-ipaas-tier", target.tier))
        _log_accepted([logs.current_context().get("request_id", "")], [accepted.execution_id])
        self.webhooks_accepted += 1
        return pb.ReceiveWebhookResponse(execution_id=accepted.execution_id, status=accepted.status, duplicate=accepted.duplicate)

    async def ReceiveWebhooks(self, request: pb.ReceiveWebhooksRequest, context: grpc.aio.ServicerContext) -> pb.ReceiveWebhooksResponse:
        if len(request.webhooks) > MAX_BATCH:
            raise InvalidArgument.field("webhooks", f"at most {MAX_BATCH} webhooks per call, got {len(request.webhooks)}")
        # Concurrently, so the items' enqueues share one group commit.
        request_ids = [request_id_from({REQUEST_ID: item.request_id}) for item in request.webhooks]
        results = await asyncio.gather(*(self._one_webhook(item, rid) for item, rid in zip(request.webhooks, request_ids)))
        accepted = [(rid, result.accepted.execution_id) for rid, result in zip(request_ids, results) if result.HasField("accepted")]
        _log_accepted([rid for rid, _ in accepted], [eid for _, eid in accepted])
        self.webhooks_accepted += len(accepted)
        return pb.ReceiveWebhooksResponse(results=results)

    async def _one_webhook(self, item: pb.WebhookDelivery, request_id: str) -> pb.WebhookResult:
        request = item.webhook
        with logs.bind(request_id=request_id, workflow_id=request.workflow_id):
            try:
                target, accepted = await self.triggers.receive_webhook(
                    request.workflow_id, request.http_body.data, dict(request.headers), item.idempotency_key or None
                )
            except IpaasError as exc:
                return pb.WebhookResult(error=to_status_proto(exc))
            except Exception as exc:
                if database_down(exc):
                    return pb.WebhookResult(error=to_status_proto(DATABASE_UNAVAILABLE))
                log.exception("rpc.failed")
                return pb.WebhookResult(error=internal_status_proto(request_id))
        accepted_pb = pb.ReceiveWebhookResponse(execution_id=accepted.execution_id, status=accepted.status, duplicate=accepted.duplicate)
        return pb.WebhookResult(accepted=accepted_pb, tenant_id=target.tenant_id, tier=target.tier)

    async def DryRun(self, request: pb.DryRunRequest, context: grpc.aio.ServicerContext) -> pb.DryRunResponse:
        return _within_reply(await self.dry_runner.run(_tenant(), request))

    async def GetExecution(self, request: pb.GetExecutionRequest, context: grpc.aio.ServicerContext) -> pb.GetExecutionResponse:
        return pb.GetExecutionResponse(execution=_view(await self.store.get(_tenant(), request.id)))

    async def ListExecutions(self, request: pb.ListExecutionsRequest, context: grpc.aio.ServicerContext) -> pb.ListExecutionsResponse:
        page = await self.store.list(_tenant(), request.workflow_id, request.status, PageRequest.of(request, _tenant()))
        items, token = within_bytes([execution(e) for e in page.items], page, key=lambda e: e.id)
        return pb.ListExecutionsResponse(executions=items, next_page_token=token)

    async def ReplayExecution(self, request: pb.ReplayExecutionRequest, context: grpc.aio.ServicerContext) -> pb.ReplayExecutionResponse:
        return pb.ReplayExecutionResponse(execution=_view(await self.store.replay(_tenant(), request.id)))

    async def CancelExecution(self, request: pb.CancelExecutionRequest, context: grpc.aio.ServicerContext) -> pb.CancelExecutionResponse:
        return pb.CancelExecutionResponse(execution=_view(await self.store.cancel(_tenant(), request.id)))
