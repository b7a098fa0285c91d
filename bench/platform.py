"""Starting and stopping the processes a benchmark needs, all on loopback, free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "ipk_admin_bench_" + "b" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=None if os.environ.get("BENCH_STDERR") else subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def uvicorn_app(target: str, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log", "--no-server-header"]
    with process(cmd, env):
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        yield url


@contextlib.contextmanager
def fake_slack() -> Iterator[str]:
    port = free_port()
    with process([sys.executable, "-m", "bench.fake_slack", "--port", str(port)]):
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/stats")
        yield url


def platform_env(data_dir: Path, database_url: str | None, grpc_port: int, http_port: int, **extra: str) -> dict[str, str]:
    return {
        "IPAAS_DATA_DIR": str(data_dir),
        "IPAAS_DATABASE_URL": database_url or f"sqlite:///{data_dir / 'ipaas.db'}",
        "IPAAS_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        "IPAAS_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "IPAAS_CORE_TARGET": f"127.0.0.1:{grpc_port}",
        "IPAAS_ADMIN_KEY": ADMIN_KEY,
        "IPAAS_ALLOW_INSECURE_TARGETS": "1",
        "IPAAS_RATE_LIMITS_OFF": "1",  # measure the platform, not the limiter (measured separately)
        # Logs at the default level (INFO), as deployed: their cost is part of the platform's.
        "IPAAS_SECRET_KEYS": "Zm9yLWJlbmNobWFya3Mtb25seS0wMDAwMDAwMDAwMDA=",
        **extra,
    }


@contextlib.contextmanager
def core(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with process([sys.executable, "-m", "ipaas", "core"], env) as proc:
        yield proc


@contextlib.contextmanager
def gateway(env: dict[str, str]) -> Iterator[str]:
    with process([sys.executable, "-m", "ipaas", "gateway"], env):
        url = "http://" + env["IPAAS_HTTP_LISTEN"]
        wait_http(url + "/health/live")
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("core not ready")
            time.sleep(0.1)
        yield url


def setup_webhook_workflow(gateway_url: str, slack_url: str, tier: str = "paid") -> dict[str, str]:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    tenant = httpx.post(f"{gateway_url}/api/tenants", json={"name": "bench", "tier": tier}, headers=admin).json()["data"]
    key = httpx.post(f"{gateway_url}/api/tenants/{tenant['id']}/keys", json={"name": "bench"}, headers=admin).json()["data"]["secret"]
    auth = {"authorization": f"Bearer {key}"}
    cred = httpx.post(f"{gateway_url}/api/credentials", json={"connector": "slack", "name": "bench", "secrets": {"webhook_url": f"{slack_url}/services/T1/B1/benchtoken"}}, headers=auth).json()["data"]
    wf = httpx.post(
        f"{gateway_url}/api/workflows",
        json={"name": "bench", "trigger": {"type": "webhook"}, "steps": [{"id": "notify", "connector": "slack", "action": "send_message", "config": {"text": "{{t}}"}, "credential_id": cred["id"]}]},
        headers=auth,
    ).json()["data"]
    return {"tenant_id": tenant["id"], "key": key, "workflow_id": wf["workflow"]["id"], "secret": wf["webhook_secret"]}
