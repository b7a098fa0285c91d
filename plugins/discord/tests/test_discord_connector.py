"""The Discord connector against a fake Discord that follows the channel-webhook contract."""

from __future__ import annotations

import pytest
from ipaas_discord import CONNECTOR

from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import PermanentError, RateLimited
from ipaas.testing.contract import ConnectorContract
from tests.fakes.discord import FakeDiscord


class TestDiscordContract(ConnectorContract):
    connector = CONNECTOR
    action = "post_message"

    def valid_config(self):  # type: ignore[no-untyped-def]
        return {"content": "hello"}

    def target(self, base_url, monkeypatch):  # type: ignore[no-untyped-def]
        return {"webhook_url": f"{base_url}/api/webhooks/42/secretwebhooktoken"}


@pytest.fixture
async def registry():
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(CONNECTOR, "ipaas-discord")
    yield registry
    await registry.aclose()


async def post(registry: ConnectorRegistry, url: str):
    ctx = registry.context("discord", {"content": "Deploy done", "username": "ci"}, {"webhook_url": url}, 2.0)
    return await registry.invoke("discord", "post_message", ctx)


async def test_message_is_posted_and_its_id_returned(registry) -> None:
    async with FakeDiscord() as discord:
        result = await post(registry, discord.url)
    assert discord.received == [{"content": "Deploy done", "username": "ci"}]
    assert result.output["message_id"] == "1001"


async def test_unknown_webhook_is_permanent(registry) -> None:
    async with FakeDiscord() as discord:
        with pytest.raises(PermanentError, match="Unknown Webhook"):
            await post(registry, discord.url.replace("/api/webhooks/123456789012345678", "/api/webhooks/1"))


async def test_bad_request_is_permanent(registry) -> None:
    async with FakeDiscord() as discord:
        discord.fail_next(400)
        with pytest.raises(PermanentError, match="Cannot send an empty message"):
            await post(registry, discord.url)


async def test_rate_limit_reads_retry_after_from_the_json_body(registry) -> None:
    async with FakeDiscord() as discord:
        discord.fail_next(429, retry_after=1.5)
        with pytest.raises(RateLimited) as err:
            await post(registry, discord.url)
    assert err.value.retry_after == 1.5


def test_webhook_hosts_are_discords_own() -> None:
    strict = ConnectorRegistry(allow_insecure=False)
    strict.add(CONNECTOR, "ipaas-discord")
    for good in ("https://discord.com/api/webhooks/1/x", "https://discordapp.com/api/webhooks/1/x", "https://canary.discord.com/api/webhooks/1/x"):
        assert strict.validate_credentials("discord", {"webhook_url": good}) == [], good
    assert strict.validate_credentials("discord", {"webhook_url": "https://discord.com.evil.net/api/webhooks/1/x"})


async def test_a_thread_named_in_the_webhook_url_is_kept(registry) -> None:
    """Discord's own way to post into a thread or forum post is ?thread_id= on the webhook
    URL; the connector adds wait=true beside it."""
    async with FakeDiscord() as discord:
        await post(registry, discord.url + "?thread_id=99")
        await post(registry, discord.url)
    assert discord.threads == ["99", None]


async def test_a_message_of_embeds_alone_is_posted(registry) -> None:
    embeds = [{"title": "Deploy", "description": "done"}]
    async with FakeDiscord() as discord:
        ctx = registry.context("discord", {"embeds": embeds}, {"webhook_url": discord.url}, 2.0)
        result = await registry.invoke("discord", "post_message", ctx)
    assert discord.received == [{"embeds": embeds}] and result.output["message_id"] == "1001"


def test_a_message_needs_content_or_embeds(registry) -> None:
    assert registry.config_problems("discord", "post_message", {"username": "ci"}) == [("config", "needs one of: content, embeds")]
    assert registry.config_problems("discord", "post_message", {"embeds": []}) == [("config.embeds", "must have at least 1 items")]
