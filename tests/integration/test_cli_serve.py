"""The README's run path: `ipaas serve` starts core and gateway as supervised processes;
reflection lists the ipaas.v1 services, gRPC health answers SERVING, the gateway answers,
and SIGTERM stops both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import free_port



def test_serve_starts_both_and_stops_on_sigterm(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "IPAAS_DATA_DIR": str(tmp_path / "data"),
        "IPAAS_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "IPAAS_HTTP_LISTEN": f"127.0.0.1:{http_port}",
    }
    env.pop("IPAAS_ADMIN_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "ipaas", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("the platform did not become ready")

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            (reply,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            services = {s.name for s in reply.list_services_response.service}
        assert {"ipaas.v1.WorkflowService", "ipaas.v1.ExecutionService", "ipaas.v1.TenantService", "grpc.health.v1.Health"} <= services

        key_file = tmp_path / "data" / "admin.key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        admin = key_file.read_text().strip()
        created = httpx.post(f"http://127.0.0.1:{http_port}/api/tenants", json={"name": "acme", "tier": "paid"}, headers={"authorization": f"Bearer {admin}"}, timeout=5)
        assert created.status_code == 201 and created.json()["data"]["tier"] == "paid"

        listed = subprocess.run([sys.executable, "-m", "ipaas", "tenants", "list", "--json"], env=env, capture_output=True, text=True, timeout=60, check=True)
        assert [t["name"] for t in json.loads(listed.stdout)] == ["acme"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "admin key (shown once" in err, "a generated admin key is printed once"
