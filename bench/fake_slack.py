"""A fast fake Slack for benchmarks: answers "ok", records arrival times, serves stats.

The message text is the sender's send time (epoch seconds), so end-to-end latency is the
arrival time minus that."""

from __future__ import annotations

import argparse
import time

import orjson
from aiohttp import web

arrivals: list[tuple[float, float]] = []


async def hook(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    try:
        sent = float(body.get("text", "0"))
    except ValueError:
        sent = 0.0
    arrivals.append((time.time(), sent))
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    since = float(request.query.get("since", "0"))
    timed = request.query.get("timed") == "1"  # only messages that carry their send time
    rows = [(a, s) for a, s in arrivals if a >= since and (s or not timed)]
    return web.json_response({"count": len(rows), "first": rows[0][0] if rows else 0, "last": rows[-1][0] if rows else 0, "latencies": [a - s for a, s in rows if s]})


async def reset(request: web.Request) -> web.Response:
    arrivals.clear()
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.add_routes([web.post("/services/{a}/{b}/{c}", hook), web.get("/stats", stats), web.post("/reset", reset)])
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
