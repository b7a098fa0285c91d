"""The Slack connector against a fake Slack that follows the incoming-webhook contract."""

from __future__ import annotations

import pytest
from ipaas_slack import CONNECTOR

from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import PermanentError, RateLimited, RetryableError
from ipaas.testing.contract import ConnectorContract
from tests.fakes.slack import FakeSlack


class TestSlackContract(ConnectorContract):
    connector = CONNECTOR
    action = "send_message"

    def valid_config(self):  # type: ignore[no-untyped-def]
        return {"text": "hello"}

    def target(self, base_url, monkeypatch):  # type: ignore[no-untyped-def]
        return {"webhook_url": f"{base_url}/services/T1/B1/secretpathtoken"}


@pytest.fixture
async def registry():
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(CONNECTOR, "ipaas-slack")
    yield registry
    await registry.aclose()


async def send(registry: ConnectorRegistry, url: str, config: dict | None = None):
    ctx = registry.context("slack", config or {"text": "Order 42 shipped", "username": "bot"}, {"webhook_url": url}, 2.0)
    return await registry.invoke("slack", "send_message", ctx)


async def test_message_is_delivered(registry) -> None:
    async with FakeSlack() as slack:
        result = await send(registry, slack.url)
    assert slack.received == [{"text": "Order 42 shipped", "username": "bot"}]
    assert result.output["ok"] is True and result.message == "message sent"


@pytest.mark.parametrize("status,code", [(400, "invalid_payload"), (403, "action_prohibited"), (404, "no_service"), (410, "channel_is_archived")])
async def test_slack_errors_are_permanent_and_named(registry, status: int, code: str) -> None:
    async with FakeSlack() as slack:
        slack.fail_next(status)
        with pytest.raises(PermanentError, match=code):
            await send(registry, slack.url)


async def test_rate_limit_carries_retry_after(registry) -> None:
    """A 429 is RateLimited, which the engine retries without counting it against the
    breaker: Slack limits each webhook on its own, so it says nothing of the others."""
    async with FakeSlack() as slack:
        slack.fail_next(429, retry_after=30)
        with pytest.raises(RateLimited) as err:
            await send(registry, slack.url)
    assert err.value.retry_after == 30


async def test_server_error_is_retryable(registry) -> None:
    async with FakeSlack() as slack:
        slack.fail_next(503)
        with pytest.raises(RetryableError) as err:
            await send(registry, slack.url)
    assert not isinstance(err.value, RateLimited), "a 5xx counts against the breaker"


async def test_timeout_abandons_the_call(registry) -> None:
    async with FakeSlack(delay=1.5) as slack:
        ctx = registry.context("slack", {"text": "x"}, {"webhook_url": slack.url}, 0.3)
        with pytest.raises(RetryableError, match="timed out"):
            await registry.invoke("slack", "send_message", ctx)


def test_webhook_urls_must_be_slack_https_unless_insecure_allowed() -> None:
    strict = ConnectorRegistry(allow_insecure=False)
    strict.add(CONNECTOR, "ipaas-slack")
    assert strict.validate_credentials("slack", {"webhook_url": "https://hooks.slack.com/services/T/B/X"}) == []
    for bad in ("http://hooks.slack.com/services/T/B/X", "https://evil.example.com/services/T/B/X", "https://127.0.0.1/services/T/B/X"):
        assert strict.validate_credentials("slack", {"webhook_url": bad}), bad
