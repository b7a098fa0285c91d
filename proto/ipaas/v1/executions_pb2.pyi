import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.api import httpbody_pb2 as _httpbody_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from ipaas.v1 import workflows_pb2 as _workflows_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepRun(_message.Message):
    __slots__ = ("step_id", "status", "attempts", "rendered_config", "output", "error", "retryable", "started_at", "finished_at", "duration_ms", "message")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RENDERED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    status: str
    attempts: int
    rendered_config: _struct_pb2.Struct
    output: _struct_pb2.Struct
    error: str
    retryable: bool
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    duration_ms: int
    message: str
    def __init__(self, step_id: _Optional[str] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., rendered_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ms: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("id", "workflow_id", "workflow_version", "status", "trigger", "payload", "attempts", "error", "steps", "created_at", "started_at", "finished_at", "next_attempt_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    workflow_id: str
    workflow_version: int
    status: str
    trigger: str
    payload: _struct_pb2.Value
    attempts: int
    error: str
    steps: _containers.RepeatedCompositeFieldContainer[StepRun]
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    next_attempt_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., workflow_id: _Optional[str] = ..., workflow_version: _Optional[int] = ..., status: _Optional[str] = ..., trigger: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepRun, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RunWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id", "payload", "version")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    payload: _struct_pb2.Value
    version: int
    def __init__(self, workflow_id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class RunWorkflowResponse(_message.Message):
    __slots__ = ("execution", "duplicate")
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    duplicate: bool
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ReceiveWebhookRequest(_message.Message):
    __slots__ = ("workflow_id", "http_body", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    HTTP_BODY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    http_body: _httpbody_pb2.HttpBody
    headers: _containers.ScalarMap[str, str]
    def __init__(self, workflow_id: _Optional[str] = ..., http_body: _Optional[_Union[_httpbody_pb2.HttpBody, _Mapping]] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReceiveWebhookResponse(_message.Message):
    __slots__ = ("execution_id", "status", "duplicate")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    status: str
    duplicate: bool
    def __init__(self, execution_id: _Optional[str] = ..., status: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ReceiveWebhooksRequest(_message.Message):
    __slots__ = ("webhooks",)
    WEBHOOKS_FIELD_NUMBER: _ClassVar[int]
    webhooks: _containers.RepeatedCompositeFieldContainer[WebhookDelivery]
    def __init__(self, webhooks: _Optional[_Iterable[_Union[WebhookDelivery, _Mapping]]] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("webhook", "request_id", "idempotency_key")
    WEBHOOK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    webhook: ReceiveWebhookRequest
    request_id: str
    idempotency_key: str
    def __init__(self, webhook: _Optional[_Union[ReceiveWebhookRequest, _Mapping]] = ..., request_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ReceiveWebhooksResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[WebhookResult]
    def __init__(self, results: _Optional[_Iterable[_Union[WebhookResult, _Mapping]]] = ...) -> None: ...

class WebhookResult(_message.Message):
    __slots__ = ("accepted", "error", "tenant_id", "tier")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    accepted: ReceiveWebhookResponse
    error: _status_pb2.Status
    tenant_id: str
    tier: str
    def __init__(self, accepted: _Optional[_Union[ReceiveWebhookResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., tenant_id: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class DryRunRequest(_message.Message):
    __slots__ = ("workflow", "workflow_id", "version", "payload", "mode")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    workflow: _workflows_pb2.Workflow
    workflow_id: str
    version: int
    payload: _struct_pb2.Value
    mode: str
    def __init__(self, workflow: _Optional[_Union[_workflows_pb2.Workflow, _Mapping]] = ..., workflow_id: _Optional[str] = ..., version: _Optional[int] = ..., payload: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., mode: _Optional[str] = ...) -> None: ...

class DryRunStep(_message.Message):
    __slots__ = ("step_id", "rendered_config", "missing_paths", "status", "message", "output", "duration_ms", "retryable")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RENDERED_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MISSING_PATHS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    rendered_config: _struct_pb2.Struct
    missing_paths: _containers.RepeatedScalarFieldContainer[str]
    status: str
    message: str
    output: _struct_pb2.Struct
    duration_ms: int
    retryable: bool
    def __init__(self, step_id: _Optional[str] = ..., rendered_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., missing_paths: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., message: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., duration_ms: _Optional[int] = ..., retryable: _Optional[bool] = ...) -> None: ...

class DryRunResponse(_message.Message):
    __slots__ = ("ok", "steps", "mode")
    OK_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    steps: _containers.RepeatedCompositeFieldContainer[DryRunStep]
    mode: str
    def __init__(self, ok: _Optional[bool] = ..., steps: _Optional[_Iterable[_Union[DryRunStep, _Mapping]]] = ..., mode: _Optional[str] = ...) -> None: ...

class GetExecutionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class ListExecutionsRequest(_message.Message):
    __slots__ = ("workflow_id", "status", "page_size", "page_token")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    status: str
    page_size: int
    page_token: str
    def __init__(self, workflow_id: _Optional[str] = ..., status: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExecutionsResponse(_message.Message):
    __slots__ = ("executions", "next_page_token")
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    executions: _containers.RepeatedCompositeFieldContainer[Execution]
    next_page_token: str
    def __init__(self, executions: _Optional[_Iterable[_Union[Execution, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReplayExecutionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReplayExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class CancelExecutionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class GetQueueStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetQueueStatsResponse(_message.Message):
    __slots__ = ("depth", "max_depth", "tenant_depth", "in_flight", "workers", "tenant_max_depth")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TENANT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    depth: int
    max_depth: int
    tenant_depth: int
    in_flight: int
    workers: int
    tenant_max_depth: int
    def __init__(self, depth: _Optional[int] = ..., max_depth: _Optional[int] = ..., tenant_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., workers: _Optional[int] = ..., tenant_max_depth: _Optional[int] = ...) -> None: ...
