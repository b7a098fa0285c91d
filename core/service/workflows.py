"""WorkflowService: thin methods over WorkflowStore."""

from __future__ import annotations

import grpc

from ipaas.auth import current_tenant as _tenant
from ipaas.errors import InvalidArgument
from ipaas.pagination import PageRequest, within_bytes
from ipaas.service import convert
from ipaas.v1 import workflows_pb2 as pb
from ipaas.v1 import workflows_pb2_grpc
from ipaas.workflow_store import UPDATABLE, WorkflowStore

OPTION_DEFAULTS = {field.name: field.default_value for field in pb.WorkflowOptions.DESCRIPTOR.fields}
MASK_PATHS = (*UPDATABLE, "active", *(f"options.{name}" for name in OPTION_DEFAULTS))


class WorkflowServicer(workflows_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, store: WorkflowStore) -> None:
        self.store = store

    async def CreateWorkflow(self, request: pb.CreateWorkflowRequest, context: grpc.aio.ServicerContext) -> pb.CreateWorkflowResponse:
        active = request.workflow.active if request.workflow.HasField("active") else True
        view, secret = await self.store.create(_tenant(), convert.definition_from_proto(request.workflow), active)
        return pb.CreateWorkflowResponse(workflow=convert.workflow(view), webhook_secret=secret)

    async def GetWorkflow(self, request: pb.GetWorkflowRequest, context: grpc.aio.ServicerContext) -> pb.GetWorkflowResponse:
        return pb.GetWorkflowResponse(workflow=convert.workflow(await self.store.get(_tenant(), request.id)))

    async def ListWorkflows(self, request: pb.ListWorkflowsRequest, context: grpc.aio.ServicerContext) -> pb.ListWorkflowsResponse:
        page = await self.store.list(_tenant(), PageRequest.of(request, _tenant()))
        items, token = within_bytes([convert.workflow(v) for v in page.items], page, key=lambda v: v.workflow.id)
        return pb.ListWorkflowsResponse(workflows=items, next_page_token=token)

    async def UpdateWorkflow(self, request: pb.UpdateWorkflowRequest, context: grpc.aio.ServicerContext) -> pb.UpdateWorkflowResponse:
        given = convert.definition_from_proto(request.workflow)
        paths = list(request.update_mask.paths)
        unknown = [p for p in paths if p not in MASK_PATHS]
        if unknown:
            raise InvalidArgument.field("update_mask", f"unknown fields {unknown}; use {', '.join(MASK_PATHS)}")
        fields = [p for p in paths if p in UPDATABLE] if paths else [name for name in UPDATABLE if name in given]
        changes = {name: given.get(name, {} if name != "steps" else []) for name in fields}
        # Options have presence: the ones set (or named in the mask) change, the rest stay.
        # "options" itself in the mask replaces them all, as a mask path means (AIP-134).
        options_whole = "options" in paths
        if not options_whole:
            named = [p.removeprefix("options.") for p in paths if p.startswith("options.")]
            set_options = given.get("options", {})
            option_changes = {name: set_options.get(name, OPTION_DEFAULTS[name]) for name in named} if paths else set_options
            changes.pop("options", None)
            if option_changes:
                changes["options"] = option_changes
        wants_active = "active" in paths or (not paths and request.workflow.HasField("active"))
        active = request.workflow.active if wants_active else None
        view, secret = await self.store.update(_tenant(), request.id, request.expected_version, changes, active, merge_options=not options_whole)
        return pb.UpdateWorkflowResponse(workflow=convert.workflow(view), webhook_secret=secret)

    async def DeleteWorkflow(self, request: pb.DeleteWorkflowRequest, context: grpc.aio.ServicerContext) -> pb.DeleteWorkflowResponse:
        await self.store.delete(_tenant(), request.id)
        return pb.DeleteWorkflowResponse()

    async def SetWorkflowActive(self, request: pb.SetWorkflowActiveRequest, context: grpc.aio.ServicerContext) -> pb.SetWorkflowActiveResponse:
        view = await self.store.set_active(_tenant(), request.id, request.active)
        return pb.SetWorkflowActiveResponse(workflow=convert.workflow(view))

    async def ListWorkflowVersions(self, request: pb.ListWorkflowVersionsRequest, context: grpc.aio.ServicerContext) -> pb.ListWorkflowVersionsResponse:
        wf, page = await self.store.list_versions(_tenant(), request.id, PageRequest.of(request, _tenant()))
        from ipaas.workflow_store import WorkflowView

        versions = [convert.workflow(WorkflowView(wf, r.version, r.definition, r.created_at)) for r in page.items]
        versions, token = within_bytes(versions, page, key=lambda r: str(r.version))
        return pb.ListWorkflowVersionsResponse(versions=versions, next_page_token=token)

    async def GetWorkflowVersion(self, request: pb.GetWorkflowVersionRequest, context: grpc.aio.ServicerContext) -> pb.GetWorkflowVersionResponse:
        if request.version <= 0:
            raise InvalidArgument.field("version", "must be 1 or more")
        view = await self.store.get(_tenant(), request.id, request.version)
        return pb.GetWorkflowVersionResponse(workflow=convert.workflow(view))

    async def RollbackWorkflow(self, request: pb.RollbackWorkflowRequest, context: grpc.aio.ServicerContext) -> pb.RollbackWorkflowResponse:
        if request.version <= 0:
            raise InvalidArgument.field("version", "must be 1 or more")
        view, secret = await self.store.rollback(_tenant(), request.id, request.version, request.expected_version)
        return pb.RollbackWorkflowResponse(workflow=convert.workflow(view), webhook_secret=secret)

    async def RotateWebhookSecret(self, request: pb.RotateWebhookSecretRequest, context: grpc.aio.ServicerContext) -> pb.RotateWebhookSecretResponse:
        secret, expires = await self.store.rotate_secret(_tenant(), request.id, request.grace_period_seconds, request.revoke_previous)
        return pb.RotateWebhookSecretResponse(webhook_secret=secret, previous_expires_at=convert.timestamp(expires))
