"""OpenWeather connector: current weather for a city or coordinates."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from ipaas.sdk import Action, ActionResult, Connector, ExecutionContext, PermanentError, hookimpl, raise_for_status

DEFAULT_BASE_URL = "https://api.openweathermap.org"


def base_url() -> str:
    return os.environ.get("IPAAS_OPENWEATHER_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


async def current_weather(ctx: ExecutionContext) -> ActionResult:
    params: dict[str, str] = {"units": ctx.config.get("units") or "metric", "appid": str(ctx.credentials.get("api_key", ""))}
    if ctx.config.get("city"):
        params["q"] = ctx.config["city"]
    elif ctx.config.get("lat") is not None and ctx.config.get("lon") is not None:
        params["lat"], params["lon"] = str(ctx.config["lat"]), str(ctx.config["lon"])
    else:
        raise PermanentError("give a city or both lat and lon")
    response = await ctx.http.get(f"{base_url()}/data/2.5/weather", params=params)
    raise_for_status(response, "OpenWeather")
    try:
        data = response.json()
        output = {
            "temperature": data["main"]["temp"],
            "feels_like": data["main"]["feels_like"],
            "humidity": data["main"]["humidity"],
            "wind_speed": data.get("wind", {}).get("speed"),
            "description": (data.get("weather") or [{}])[0].get("description", ""),
            "city": data.get("name", ""),
            "units": params["units"],
        }
    except (ValueError, KeyError, TypeError, IndexError):
        raise PermanentError("OpenWeather answered with an unexpected body") from None
    return ActionResult(message=f"{output['city']}: {output['temperature']}", output=output)


CONNECTOR = Connector(
    name="openweather",
    version="0.1.0",
    description="Current weather from OpenWeather.",
    actions=[
        Action(
            name="current_weather",
            description="Fetch the current weather for a city or coordinates.",
            run=current_weather,
            config_schema={
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1},
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                    "units": {"enum": ["standard", "metric", "imperial"]},
                },
                "anyOf": [{"required": ["city"]}, {"required": ["lat", "lon"]}],
                "additionalProperties": False,
            },
        )
    ],
    credential_schema={
        "type": "object",
        "properties": {"api_key": {"type": "string", "minLength": 8}},
        "required": ["api_key"],
        "additionalProperties": False,
    },
    # The endpoint an operator configured (a caching proxy, say) is allowed beside the
    # default: the guard checks every request against this list.
    allowed_hosts=tuple(dict.fromkeys(h for h in ("api.openweathermap.org", urlsplit(base_url()).hostname) if h)),
)


@hookimpl
def ipaas_register_connectors(register):  # type: ignore[no-untyped-def]
    register(CONNECTOR)
