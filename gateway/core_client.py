"""One long-lived gRPC channel to the core, and generic unary calls by method path."""

from __future__ import annotations

import json
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ipaas.wire import MAX_MESSAGE_BYTES

CALL_TIMEOUT = 30.0

# Core replicas are interchangeable (they share the database), so calls spread over every
# address the target names (`ipv4:10.0.0.5:50051,10.0.0.6:50051`) or resolves to (a
# Kubernetes headless service: `dns:///ipaas-core:50051`). gRPC's default, pick_first,
# would send every call to the first one.
MAX_RECONNECT_BACKOFF_MS = 2_000
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


class CoreClient:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.service_config", SERVICE_CONFIG),
                # gRPC's reconnect backoff grows to 120 s: a core back after a few minutes
                # down went unused for up to two more (readiness 503, every call 503).
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ],
        )
        self._calls: dict[str, Any] = {}
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def call(self, path: str, response_class: Any) -> Any:
        call = self._calls.get(path)
        if call is None:
            call = self._calls[path] = self.channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_class.FromString
            )
        return call

    async def serving(self, timeout: float = 2.0) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()
