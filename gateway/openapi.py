"""An OpenAPI 3.1 document generated from the same descriptors as the routes."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ipaas import __version__, reasons
from ipaas.gateway.idempotency import MAX_KEY_LENGTH
from ipaas.gateway.routes import MAX_PARAM_LENGTH, Route

_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},  # proto3 JSON writes int64 as a string
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
_WELL_KNOWN = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.api.HttpBody": {},
}


# Headers the gateway itself reads; they are no fields of the protos, so they are added here.
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Repeating a request with the same key within 24 h answers with the first answer (X-Idempotency-Replay: true) instead of running it again; the same key with another request is 422. X-Idempotency-Key is read too; two different values in one request are 400.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[ -~]+$"},  # printable ASCII: it travels as gRPC metadata
}
_WEBHOOK_HEADERS = [
    {"name": name, "in": "header", "required": False, "description": f"{what} (Standard Webhooks); required unless the workflow allows unsigned webhooks.", "schema": schema}
    for name, what, schema in [
        ("webhook-id", "The message id, also used to drop duplicate deliveries", {"type": "string"}),
        ("webhook-timestamp", "Seconds since the epoch when it was signed; at most 5 minutes off", {"type": "string", "pattern": "^[0-9]+$"}),
        ("webhook-signature", "Space-separated v1,<base64 HMAC-SHA256 of id.timestamp.body>", {"type": "string"}),
    ]
]
# Routes whose core refuses a change without the version it is based on, sent as If-Match
# or as expected_version: neither parameter is required alone (OpenAPI cannot say "one of").
_VERSION_REQUIRED = {"UpdateWorkflow"}
# The gateway moves a list's next_page_token from the answer's data to meta.pagination.
_MOVED_TO_META = "next_page_token"


def _if_match(version_required: bool) -> dict[str, Any]:
    either = " This header or the expected_version query parameter is required (422 without either)." if version_required else ""
    return {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "description": 'The version the change is based on, e.g. "3"; a stale one is 409. Sent as the expected_version query parameter instead, this header is not needed.' + either,
        "schema": {"type": "string", "pattern": '^(W/)?"?[0-9]{1,10}"?$'},
    }


def _health_paths() -> dict[str, Any]:
    """The gateway's own probes, which no proto describes: GET (or HEAD), no key, not rate
    limited; 503 NOT_READY in the error envelope when failing."""
    report = {
        "type": "object",
        "properties": {
            "status": {"type": "string"},
            "version": {"type": "string"},
            "uptime": {"type": "string"},
            "uptime_seconds": {"type": "number"},
            "timestamp": {"type": "string", "format": "date-time"},
            "checks": {"type": "object", "additionalProperties": {"type": "string", "enum": ["ok", "failing"]}},
        },
    }
    probes = [
        ("/health", "Health", "Every check: core, database, runtime, and redis where it is used. 503 when one fails, with this report in details.", report),
        ("/health/live", "HealthLive", "The process answers; nothing else is checked.", {"type": "object", "properties": {"status": {"const": "alive"}}}),
        ("/health/ready", "HealthReady", "The core is reachable and the gateway is not draining; else 503.", {"type": "object", "properties": {"status": {"const": "ready"}}}),
    ]
    error = {"description": "not ready (NOT_READY)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}
    paths: dict[str, Any] = {}
    for path, operation_id, description, data in probes:
        responses = {"200": {"description": "success", "content": {"application/json": {"schema": _envelope(data)}}}, "503": error, "default": {**error, "description": "error"}}
        operation = {"operationId": operation_id, "tags": ["Health"], "summary": operation_id, "description": description, "security": [], "parameters": [], "responses": responses}
        paths[path] = {"get": operation}
    return paths


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def message(self, descriptor: Descriptor, omit: frozenset[str] = frozenset()) -> dict[str, Any]:
        """`omit`: fields the gateway never answers with (a list's page token); only for
        answers' top-level messages, which nothing else refers to."""
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        name = descriptor.full_name.replace("ipaas.v1.", "")
        if name not in self.components:
            self.components[name] = {}  # placeholder against recursion
            props = {f.name: self.field(f) for f in descriptor.fields if f.name not in omit}
            self.components[name] = {"type": "object", "properties": props}
        return {"$ref": f"#/components/schemas/{name}"}

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            return {"type": "object", "additionalProperties": self.field(field.message_type.fields_by_name["value"])}
        schema = self.message(field.message_type) if field.message_type is not None else dict(_SCALARS.get(field.type, {"type": "string"}))
        if field.is_repeated:
            return {"type": "array", "items": schema}
        return schema


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["success", "meta"],
        "properties": {"success": {"const": True}, "data": data, "meta": {"$ref": "#/components/schemas/Meta"}},
    }


def _bounded(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "maxLength": MAX_PARAM_LENGTH} if schema.get("type") == "string" else schema


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, Any] = {}
    for route in routes:
        method = route.method
        params = [{"name": n, "in": "path", "required": True, "schema": _bounded(schemas.field(method.input_type.fields_by_name[n]))} for n in route.path_fields]
        params += [{"name": f.name, "in": "query", "required": False, "schema": _bounded(schemas.field(f))} for f in route.query_fields]
        fields = method.input_type.fields_by_name
        if "expected_version" in fields:
            for param in params:
                if param["name"] == "expected_version":
                    param["description"] = "The version the change is based on, instead of If-Match."
            params.append(_if_match(route.name in _VERSION_REQUIRED))
        if route.verb in ("POST", "PATCH"):
            key = dict(_IDEMPOTENCY_KEY)
            if route.raw_body:  # kept by the core, which dedupes only what it accepted
                key["description"] = "A delivery with a key the workflow accepted before is not run again: the answer names the first execution, with duplicate: true."
            params.append(key)
        if route.raw_body and "headers" in fields:
            params += [dict(p) for p in _WEBHOOK_HEADERS]
        operation: dict[str, Any] = {
            "operationId": method.name,
            "tags": [method.containing_service.name],
            "summary": method.name,
            "parameters": params,
            "responses": {
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}},
            },
        }
        output = method.output_type
        if route.response_body:
            output_schema = schemas.field(output.fields_by_name[route.response_body])
        else:
            output_schema = schemas.message(output, omit=frozenset({_MOVED_TO_META}))
        status = str(route.success_status)
        if status == "204":
            operation["responses"]["204"] = {"description": "deleted"}
        else:
            operation["responses"][status] = {"description": "success", "content": {"application/json": {"schema": _envelope(output_schema)}}}
        if route.body:
            if route.raw_body:
                body_schema: dict[str, Any] = {"type": "object"}
            elif route.body == "*":
                body_schema = schemas.message(method.input_type)
            else:
                body_schema = schemas.field(method.input_type.fields_by_name[route.body])
            operation["requestBody"] = {"required": route.raw_body or route.body != "*", "content": {"application/json": {"schema": body_schema}}}
        if route.name == "ReceiveWebhook":
            operation["security"] = []
        paths.setdefault(route.template, {})[route.verb.lower()] = operation
    paths.update(_health_paths())
    schemas.components["Meta"] = {
        "type": "object",
        "required": ["request_id"],
        "properties": {
            "request_id": {"type": "string"},
            "pagination": {
                "type": "object",
                "description": "Lists only: pass next_page_token as page_token for the next page; empty on the last page.",
                "properties": {"next_page_token": {"type": "string"}},
            },
        },
    }
    schemas.components["ErrorEnvelope"] = {
        "type": "object",
        "required": ["success", "error", "meta"],
        "properties": {
            "success": {"const": False},
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "The status in the terms of whoever answered: a gRPC status name in lower case (invalid_argument) when the core or the channel to it did, the HTTP status's name (bad_request, rate_limited) when the gateway did; docs/errors.md defines it. Switch on reason, not on code."},
                    # Not required: an answer kept for an Idempotency-Key by a gateway older
                    # than reasons replays without one.
                    "reason": {
                        "type": "string",
                        "enum": sorted(reasons.ALL),
                        "description": f"Why, as a stable constant (google.rpc.ErrorInfo.reason of domain {reasons.DOMAIN}); the table is in docs/errors.md.",
                    },
                    # Not required either, for the same kept answers.
                    "domain": {"const": reasons.DOMAIN, "description": "google.rpc.ErrorInfo.domain: the domain the reason belongs to."},
                    "metadata": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "description": "google.rpc.ErrorInfo.metadata: the ids of the resource concerned (resourceType and its id, lowerCamelCase keys), never a secret; empty when the reason names none. docs/errors.md lists each reason's.",
                    },
                    "message": {"type": "string"},
                    "details": {"type": "array"},
                },
            },
            "meta": {"$ref": "#/components/schemas/Meta"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "simple-ipaas", "version": __version__, "description": "REST gateway over the ipaas.v1 gRPC API. Every answer uses the envelope {success, data, error, meta}."},
        "paths": paths,
        "components": {"schemas": schemas.components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>simple-ipaas API</title>
<style>body{font:15px system-ui,sans-serif;margin:2rem;max-width:60rem}code{background:#f3f3f3;padding:0 .3em}
.op{border:1px solid #ddd;border-radius:6px;margin:.6rem 0;padding:.6rem}.verb{font-weight:700;display:inline-block;width:4.5em}
pre{background:#f7f7f7;padding:.6rem;overflow:auto}</style></head>
<body><h1>simple-ipaas REST API</h1>
<p>Generated from the protos; the machine-readable document is <a href="/openapi.json">/openapi.json</a>.
Send <code>Authorization: Bearer &lt;key&gt;</code>. Try a GET below.</p>
<input id="key" placeholder="API key" size="60"><div id="ops">loading…</div>
<script>
fetch('/openapi.json').then(r=>r.json()).then(doc=>{
  const ops=document.getElementById('ops'); ops.textContent='';
  for (const [path,item] of Object.entries(doc.paths)) for (const [verb,op] of Object.entries(item)) {
    const div=document.createElement('div'); div.className='op';
    div.innerHTML=`<span class="verb">${verb.toUpperCase()}</span><code>${path}</code> — ${op.operationId}`;
    if (verb==='get' && !path.includes('{')) { const b=document.createElement('button'); b.textContent='try';
      const out=document.createElement('pre'); b.onclick=async()=>{const k=document.getElementById('key').value;
      const r=await fetch(path,{headers:k?{Authorization:'Bearer '+k}:{}}); out.textContent=r.status+'\\n'+JSON.stringify(await r.json(),null,2)};
      div.append(' ',b,out);}
    ops.append(div);
  }
});
</script></body></html>"""
