"""The OpenWeather connector against a fake OpenWeather API."""

from __future__ import annotations

import pytest
from ipaas_openweather import CONNECTOR

from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import PermanentError, RateLimited
from ipaas.testing.contract import ConnectorContract
from tests.fakes.openweather import API_KEY, FakeOpenWeather


class TestOpenWeatherContract(ConnectorContract):
    connector = CONNECTOR
    action = "current_weather"

    def valid_config(self):  # type: ignore[no-untyped-def]
        return {"city": "Paris"}

    def target(self, base_url, monkeypatch):  # type: ignore[no-untyped-def]
        monkeypatch.setenv("IPAAS_OPENWEATHER_BASE_URL", base_url)
        return {"api_key": "contract-secret-key-123"}


@pytest.fixture
async def weather(monkeypatch):
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(CONNECTOR, "ipaas-openweather")
    async with FakeOpenWeather() as fake:
        monkeypatch.setenv("IPAAS_OPENWEATHER_BASE_URL", fake.base_url)
        yield registry, fake
    await registry.aclose()


async def fetch(registry, config, key=API_KEY):  # type: ignore[no-untyped-def]
    ctx = registry.context("openweather", config, {"api_key": key}, 2.0)
    return await registry.invoke("openweather", "current_weather", ctx)


async def test_city_weather_becomes_output(weather) -> None:
    registry, fake = weather
    result = await fetch(registry, {"city": "Paris", "units": "metric"})
    assert result.output == {"temperature": 21.5, "feels_like": 21.0, "humidity": 40, "wind_speed": 3.6, "description": "clear sky", "city": "Paris", "units": "metric"}
    assert fake.received[0]["q"] == "Paris" and fake.received[0]["appid"] == API_KEY


async def test_coordinates_work(weather) -> None:
    registry, fake = weather
    await fetch(registry, {"lat": 10.5, "lon": 20.25})
    assert (fake.received[0]["lat"], fake.received[0]["lon"]) == ("10.5", "20.25")


async def test_invalid_key_is_permanent_and_not_echoed(weather) -> None:
    registry, _ = weather
    with pytest.raises(PermanentError, match="401") as err:
        await fetch(registry, {"city": "Paris"}, key="wrong-key-abcdef")
    assert "wrong-key-abcdef" not in str(err.value)


async def test_unknown_city_is_permanent(weather) -> None:
    registry, _ = weather
    with pytest.raises(PermanentError, match="city not found"):
        await fetch(registry, {"city": "Atlantis"})


async def test_rate_limit_is_retryable(weather) -> None:
    registry, fake = weather
    fake.fail_next(429, retry_after=60)
    with pytest.raises(RateLimited) as err:
        await fetch(registry, {"city": "Paris"})
    assert err.value.retry_after == 60


def test_config_needs_a_city_or_coordinates() -> None:
    registry = ConnectorRegistry()
    registry.add(CONNECTOR, "ipaas-openweather")
    assert registry.config_problems("openweather", "current_weather", {"units": "metric"})
    assert registry.config_problems("openweather", "current_weather", {"lat": 1.0, "lon": 2.0}) == []
