"""A reusable pytest contract suite for connector plugins.

Subclass it in your plugin's tests (the class name must start with `Test`):

    from ipaas.testing.contract import ConnectorContract
    from my_plugin import CONNECTOR

    class TestMyConnectorContract(ConnectorContract):
        connector = CONNECTOR
        action = "send"

        def valid_config(self):
            return {"text": "hello"}

        def target(self, base_url, monkeypatch):
            # credentials (or settings) that point the action at base_url
            return {"webhook_url": base_url + "/hook"}

It checks: the declaration is valid; schemas are valid JSON Schema; actions are abandoned at
their timeout and can be cancelled; errors are classified (5xx and 429 retryable, 429 with
Retry-After, 4xx permanent); no credential value reaches a log line or an error message.
The local upstream is a tiny HTTP server on 127.0.0.1 with no dependencies.

It needs pytest and pytest-asyncio (`simple-ipaas[testing]`), in either asyncio mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from jsonschema import Draft202012Validator

from ipaas.plugin_host import ConnectorRegistry, declaration_problems
from ipaas.sdk import Connector, PermanentError, RetryableError


class LocalUpstream:
    """Answers every request with a fixed status, headers and body, or never answers."""

    def __init__(self, status: int = 200, body: bytes = b"ok", headers: dict[str, str] | None = None, black_hole: bool = False) -> None:
        self.status, self.body, self.headers, self.black_hole = status, body, headers or {}, black_hole
        self.requests = 0
        self._server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            self.requests += 1
            if self.black_hole:
                await asyncio.sleep(3600)
            headers = {"Content-Length": str(len(self.body)), "Content-Type": "application/json" if self.body.startswith(b"{") else "text/plain", **self.headers}
            lines = [f"HTTP/1.1 {self.status} X"] + [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)


class ConnectorContract:
    connector: Connector
    action: str
    timeout: float = 0.5

    def valid_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def target(self, base_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        """Credentials (and any settings, via monkeypatch) that point the action at base_url."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    # Marked explicitly (not left to asyncio_mode = "auto"): a plugin's project runs
    # pytest-asyncio in its default strict mode, where unmarked async tests and fixtures are
    # not run but errors.
    @pytest_asyncio.fixture
    async def registry(self) -> AsyncIterator[ConnectorRegistry]:
        registry = ConnectorRegistry(allow_insecure=True)
        registry.add(self.connector, "contract-under-test")
        yield registry
        await registry.aclose()

    async def call(self, registry: ConnectorRegistry, credentials: dict[str, Any]) -> Any:
        ctx = registry.context(self.connector.name, self.valid_config(), credentials, self.timeout)
        return await registry.invoke(self.connector.name, self.action, ctx)

    # -- the contract ----------------------------------------------------------------------
    def test_declaration_is_valid(self, registry: ConnectorRegistry) -> None:
        assert declaration_problems(self.connector) == []
        assert registry.get(self.connector.name) is self.connector
        assert self.connector.action(self.action) is not None

    def test_schemas_are_valid_json_schema(self) -> None:
        for action in self.connector.actions:
            Draft202012Validator.check_schema(action.config_schema)
        if self.connector.credential_schema is not None:
            Draft202012Validator.check_schema(self.connector.credential_schema)

    def test_sample_config_is_valid(self, registry: ConnectorRegistry) -> None:
        assert registry.config_problems(self.connector.name, self.action, self.valid_config()) == []

    @pytest.mark.asyncio
    async def test_call_is_abandoned_at_the_timeout(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        async with LocalUpstream(black_hole=True) as url:
            started = time.monotonic()
            with pytest.raises(RetryableError, match="timed out"):
                await self.call(registry, self.target(url, monkeypatch))
            assert time.monotonic() - started < self.timeout + 1.0

    @pytest.mark.asyncio
    async def test_call_can_be_cancelled(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        async with LocalUpstream(black_hole=True) as url:
            task = asyncio.create_task(self.call(registry, self.target(url, monkeypatch)))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    @pytest.mark.asyncio
    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_server_errors_are_retryable(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
        async with LocalUpstream(status=status, body=b"upstream broke") as url:
            with pytest.raises(RetryableError):
                await self.call(registry, self.target(url, monkeypatch))

    @pytest.mark.asyncio
    async def test_rate_limits_are_retryable_with_retry_after(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
        async with LocalUpstream(status=429, body=b"slow down", headers={"Retry-After": "7"}) as url:
            with pytest.raises(RetryableError) as err:
                await self.call(registry, self.target(url, monkeypatch))
        assert err.value.retry_after == 7

    @pytest.mark.asyncio
    @pytest.mark.parametrize("status", [400, 401, 403, 404])
    async def test_client_errors_are_permanent(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
        async with LocalUpstream(status=status, body=b"bad request") as url:
            with pytest.raises(PermanentError):
                await self.call(registry, self.target(url, monkeypatch))

    @pytest.mark.asyncio
    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    async def test_a_redirect_is_not_a_delivery(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch, status: int) -> None:
        """Connector clients follow no redirect (it could leave the allowed hosts), so a 3xx
        means nothing was delivered; where it points stays out of the error."""
        async with LocalUpstream(status=status, body=b"", headers={"Location": "https://elsewhere.example/moved-secret"}) as url:
            with pytest.raises(PermanentError) as err:
                await self.call(registry, self.target(url, monkeypatch))
        assert "moved-secret" not in str(err.value)

    @pytest.mark.asyncio
    async def test_no_secret_reaches_a_log_or_an_error(self, registry: ConnectorRegistry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        async with LocalUpstream(status=500, body=b"broke") as url:
            credentials = self.target(url, monkeypatch)
            with pytest.raises(RetryableError) as err:
                await self.call(registry, credentials)
        secrets = [str(v) for v in credentials.values() if isinstance(v, str) and len(v) >= 8]
        logged = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records) + str(err.value)
        for secret in secrets:
            # The path of a webhook URL is its secret; the host may appear.
            for part in (secret, secret.split("://", 1)[-1].split("/", 1)[-1]):
                if len(part) >= 8:
                    assert part not in logged
