"""Routes built from the `google.api.http` annotations of the ipaas.v1 services: the
gateway is a generic transcoder (like grpc-gateway or Envoy's), with no route written by
hand. Literal path segments beat variables, so /api/workflows/dry-run is not /{id}."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor

from ipaas.v1 import breakers_pb2, connectors_pb2, credentials_pb2, executions_pb2, tenants_pb2, workflows_pb2

MODULES = [tenants_pb2, workflows_pb2, executions_pb2, connectors_pb2, credentials_pb2, breakers_pb2]
VERBS = ("get", "post", "put", "patch", "delete")
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_.]*)\}")

# The longest path or query value the gateway passes on. Ids, names and page tokens are far
# shorter (ids ~30 characters, tokens under 100); the core names a value it cannot find in
# its error, and an error over gRPC's 16 KiB metadata limit would never arrive.
MAX_PARAM_LENGTH = 256

# Answers that are not "200 OK": creations, accepted triggers, deletions.
ACCEPTED = {"RunWorkflow", "ReceiveWebhook", "ReplayExecution"}


@dataclass(frozen=True)
class Route:
    # Derived fields are cached on first use: the router answers every request with them.
    method: MethodDescriptor
    verb: str
    template: str
    pattern: re.Pattern[str]
    literal_segments: int
    body: str
    response_body: str
    path: str  # the gRPC method path, /ipaas.v1.Service/Method

    @property
    def name(self) -> str:
        return self.method.name

    @cached_property
    def success_status(self) -> int:
        if self.name.startswith("Create"):
            return 201
        if self.name in ACCEPTED:
            return 202
        if self.name.startswith("Delete"):
            return 204
        return 200

    @cached_property
    def raw_body(self) -> bool:
        """The body is passed as bytes in a google.api.HttpBody field (webhooks)."""
        return bool(self.body) and self.body != "*" and self.method.input_type.fields_by_name[self.body].message_type is not None and self.method.input_type.fields_by_name[self.body].message_type.full_name == "google.api.HttpBody"

    @cached_property
    def path_fields(self) -> list[str]:
        return _VARIABLE.findall(self.template)

    @cached_property
    def query_fields(self) -> list[FieldDescriptor]:
        if self.body == "*":
            return []
        bound = set(self.path_fields) | {self.body}
        return [f for f in self.method.input_type.fields if f.name not in bound and f.name != "headers" and f.message_type is None]


def _compile(template: str) -> tuple[re.Pattern[str], int]:
    regex = "^" + _VARIABLE.sub(lambda m: f"(?P<{m.group(1)}>[^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")) + "$"
    literal = sum(1 for seg in template.strip("/").split("/") if not seg.startswith("{"))
    return re.compile(regex), literal


def build_routes() -> list[Route]:
    routes = []
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb not in VERBS:
                    continue
                template = getattr(rule, verb)
                pattern, literal = _compile(template)
                routes.append(Route(method, verb.upper(), template, pattern, literal, rule.body, rule.response_body, f"/{service.full_name}/{method.name}"))
    # More literal segments first: /api/workflows/dry-run wins over /api/workflows/{id}.
    return sorted(routes, key=lambda r: (-r.literal_segments, r.template))


@dataclass(frozen=True)
class Match:
    route: Route
    params: dict[str, str]


class Router:
    def __init__(self, routes: list[Route] | None = None) -> None:
        self.routes = routes if routes is not None else build_routes()

    def match(self, verb: str, path: str) -> tuple[Match | None, list[str]]:
        """The route for verb and path, or None and the verbs the path allows (405's Allow).
        HEAD is GET without the body (RFC 9110 asks every server for both; uvicorn drops
        the body).

        path is the path as sent, still percent-encoded: segments are split first and each
        variable decoded after, so an id holding %2F stays one segment (as grpc-gateway and
        Envoy read it) and cannot reach a deeper route."""
        allowed: list[str] = []
        wanted = "GET" if verb == "HEAD" else verb
        for route in self.routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.verb == wanted:
                return Match(route, {k: unquote(v) for k, v in m.groupdict().items()}), []
            for offered in ("GET", "HEAD") if route.verb == "GET" else (route.verb,):
                if offered not in allowed:
                    allowed.append(offered)
        return None, allowed


def field_value(field: FieldDescriptor, raw: str) -> Any:
    """A query or path string as the field's type; ValueError when it does not fit."""
    t = field.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64):
        value = int(raw)
        if t == FieldDescriptor.TYPE_INT32 and not -(2**31) <= value < 2**31:
            raise ValueError("out of range")
        return value
    if t == FieldDescriptor.TYPE_BOOL:
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise ValueError("not a boolean")
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float(raw)
    return raw
