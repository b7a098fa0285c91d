"""Conversions between protobuf messages and storage rows, shared by the servicers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from ipaas.errors import InvalidArgument
from ipaas.json_numbers import integral
from ipaas.v1 import breakers_pb2, connectors_pb2, tenants_pb2, workflows_pb2
from ipaas.wire import MAX_JSON_DEPTH, nested_deeper_than


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    st = struct_pb2.Struct()
    st.update(value)
    return st


def to_value(value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(value, v)
    return v


# protobuf's JSON conversion is pure Python, ~2.5 µs a value on the core's event loop: a 4 MiB
# request of small numbers held every other call for ~0.9 s. A workflow, a run's payload or
# a credential is refused past 1 MiB on the wire (a webhook body has the same limit).
MAX_JSON_MESSAGE_BYTES = 1024 * 1024


def _as_json(message: Any, field: str, **options: Any) -> Any:
    if message.ByteSize() > MAX_JSON_MESSAGE_BYTES:
        raise InvalidArgument.field(field, f"is larger than {MAX_JSON_MESSAGE_BYTES} bytes")
    try:
        return integral(json_format.MessageToDict(message, **options))
    except ValueError:  # a NaN or an infinity, which a double may hold and JSON may not
        raise InvalidArgument.field(field, "numbers must be finite: JSON has no NaN or Infinity") from None


def from_struct(message: struct_pb2.Struct, field: str) -> dict[str, Any]:
    return _as_json(message, field)


def from_value(message: struct_pb2.Value, field: str) -> Any:
    """A run's payload: refused where its execution could not be read back (ipaas.wire)."""
    if not message.WhichOneof("kind"):
        return None
    data = _as_json(message, field)
    if nested_deeper_than(data, MAX_JSON_DEPTH):
        raise InvalidArgument.field(field, f"is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)")
    return data


def tenant(row: Any) -> tenants_pb2.Tenant:
    return tenants_pb2.Tenant(id=row.id, name=row.name, tier=row.tier, created_at=timestamp(row.created_at))


def api_key(row: Any) -> tenants_pb2.ApiKey:
    return tenants_pb2.ApiKey(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        prefix=row.prefix,
        created_at=timestamp(row.created_at),
        revoked_at=timestamp(row.revoked_at),
    )


def connector(described: dict[str, Any]) -> connectors_pb2.Connector:
    """From one item of ConnectorRegistry.describe()."""
    return connectors_pb2.Connector(
        name=described["name"],
        version=described["version"],
        description=described["description"],
        distribution=described["distribution"],
        credential_schema=to_struct(described["credential_schema"]),
        actions=[
            connectors_pb2.ConnectorAction(name=a["name"], description=a["description"], config_schema=to_struct(a["config_schema"]), secret_fields=a["secret_fields"])
            for a in described["actions"]
        ],
    )


def breaker(state: Any) -> breakers_pb2.Breaker:
    return breakers_pb2.Breaker(
        connector=state.connector,
        state=state.state,
        failure_count=state.failure_count,
        success_count=state.success_count,
        opened_at=timestamp(state.opened_at),
        half_open_at=timestamp(state.half_open_at),
    )


OUTPUT_ONLY = ("id", "version", "created_at", "updated_at", "active")


def definition_from_proto(message: "workflows_pb2.Workflow") -> dict[str, Any]:
    """The stored definition: the REST JSON shape, without output-only fields."""
    data = _as_json(message, "workflow", preserving_proto_field_name=True)
    for name in OUTPUT_ONLY:
        data.pop(name, None)
    return data


def workflow(view: Any) -> "workflows_pb2.Workflow":
    from ipaas.v1 import workflows_pb2

    message = workflows_pb2.Workflow()
    json_format.ParseDict(view.definition, message, ignore_unknown_fields=True)
    message.id = view.workflow.id
    message.version = view.version
    message.active = view.workflow.active
    message.created_at.CopyFrom(timestamp(view.workflow.created_at))
    message.updated_at.CopyFrom(timestamp(view.version_created_at))
    return message
