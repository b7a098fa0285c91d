"""Helpers for integration tests: stubs, definitions, signing, waiting for executions."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import orjson
from google.protobuf import json_format, struct_pb2
from standardwebhooks.webhooks import Webhook

from ipaas.v1 import (
    credentials_pb2,
    credentials_pb2_grpc,
    executions_pb2,
    executions_pb2_grpc,
    workflows_pb2,
    workflows_pb2_grpc,
)


def workflow(definition: dict[str, Any]) -> workflows_pb2.Workflow:
    message = workflows_pb2.Workflow()
    json_format.ParseDict(definition, message)
    return message


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def value(data: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(data, v)
    return v


class Api:
    """The tenant's view of the core through its gRPC stubs."""

    def __init__(self, channel: Any, md: Any) -> None:
        self.md = md
        self.workflows = workflows_pb2_grpc.WorkflowServiceStub(channel)
        self.executions = executions_pb2_grpc.ExecutionServiceStub(channel)
        self.credentials = credentials_pb2_grpc.CredentialServiceStub(channel)

    async def credential(self, connector: str, secrets: dict[str, Any], name: str = "main") -> str:
        response = await self.credentials.CreateCredential(
            credentials_pb2.CreateCredentialRequest(connector=connector, name=name, secrets=struct(secrets)), metadata=self.md
        )
        return response.credential.id

    async def create(self, definition: dict[str, Any]) -> workflows_pb2.CreateWorkflowResponse:
        return await self.workflows.CreateWorkflow(workflows_pb2.CreateWorkflowRequest(workflow=workflow(definition)), metadata=self.md)

    async def run(self, workflow_id: str, payload: Any = None, key: str | None = None, version: int = 0) -> executions_pb2.RunWorkflowResponse:
        md = (*self.md, ("idempotency-key", key)) if key else self.md
        request = executions_pb2.RunWorkflowRequest(workflow_id=workflow_id, version=version)
        if payload is not None:
            request.payload.CopyFrom(value(payload))
        return await self.executions.RunWorkflow(request, metadata=md)

    async def execution(self, execution_id: str) -> executions_pb2.Execution:
        return (await self.executions.GetExecution(executions_pb2.GetExecutionRequest(id=execution_id), metadata=self.md)).execution

    async def wait(self, execution_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "dead", "cancelled"), timeout: float = 20) -> executions_pb2.Execution:
        deadline = time.monotonic() + timeout
        while True:
            ex = await self.execution(execution_id)
            if ex.status in statuses:
                return ex
            if time.monotonic() > deadline:
                raise AssertionError(f"execution {execution_id} stayed {ex.status}: {ex}")
            await asyncio.sleep(0.05)


def signed_webhook(secret: str, body: dict[str, Any], msg_id: str = "msg_1", when: datetime | None = None) -> tuple[bytes, dict[str, str]]:
    """Sign as a real sender does, with the standardwebhooks package's own signer."""
    raw = orjson.dumps(body)
    return raw, signed_headers(secret, raw, msg_id, when)


def signed_headers(secret: str, raw: bytes, msg_id: str, when: datetime | None = None) -> dict[str, str]:
    """The headers that sign `raw` as it is (for bodies orjson would not write)."""
    when = when or datetime.now(timezone.utc)
    signature = Webhook(secret).sign(msg_id, when, raw.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": signature, "content-type": "application/json"}


def slack_step(credential_id: str, text: str = "Order {{order.id}} for {{user.name}}", step_id: str = "notify") -> dict[str, Any]:
    return {"id": step_id, "connector": "slack", "action": "send_message", "config": {"text": text}, "credential_id": credential_id}
