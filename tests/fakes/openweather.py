"""A fake OpenWeather current-weather API: 401 for a bad key, 404 for an unknown city, 429."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes.server import FakeServer, serve_forever

API_KEY = "0123456789abcdef0123456789abcdef"
CITIES = {"paris": (48.85, 2.35, 21.5), "london": (51.51, -0.13, 14.0), "tokyo": (35.68, 139.69, 26.0)}


class FakeOpenWeather(FakeServer):
    def failure(self, status: int, retry_after: float | None, body: Any, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        defaults = {429: {"cod": 429, "message": "Your account is temporary blocked due to exceeding of requests limitation"}}
        return super().failure(status, retry_after, body or defaults.get(status, {"cod": status, "message": "error"}), headers)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/data/2.5/weather", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        if (failure := await self.before()) is not None:
            return failure
        q = request.query
        if q.get("appid") != API_KEY:
            return web.json_response({"cod": 401, "message": "Invalid API key. Please see https://openweathermap.org/faq#error401 for more info."}, status=401)
        if "q" in q:
            name = q["q"].split(",")[0].strip()
            city = CITIES.get(name.lower())
            if city is None:
                return web.json_response({"cod": "404", "message": "city not found"}, status=404)
        elif "lat" in q and "lon" in q:
            name, city = "Somewhere", (float(q["lat"]), float(q["lon"]), 18.0)
        else:
            return web.json_response({"cod": "400", "message": "Nothing to geocode"}, status=400)
        self.received.append(dict(q))
        temp = city[2] if q.get("units", "standard") == "metric" else round(city[2] * 9 / 5 + 32, 2) if q.get("units") == "imperial" else round(city[2] + 273.15, 2)
        return web.json_response(
            {
                "coord": {"lon": city[1], "lat": city[0]},
                "weather": [{"id": 800, "main": "Clear", "description": "clear sky", "icon": "01d"}],
                "main": {"temp": temp, "feels_like": temp - 0.5, "humidity": 40, "pressure": 1015},
                "wind": {"speed": 3.6, "deg": 200},
                "name": name.title(),
                "cod": 200,
            }
        )


if __name__ == "__main__":
    serve_forever(FakeOpenWeather())
