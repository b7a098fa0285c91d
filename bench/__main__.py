"""Run the benchmark suite: `python3 tasks.py bench` (or `python -m bench`).

Starts everything itself on loopback (fake Slack, ceilings, core + gateway on SQLite and,
when IPAAS_TEST_POSTGRES_URL is set, on PostgreSQL), measures, stops everything, and writes
bench/results/latest.json plus a table. Every figure is the median of --runs runs and is
printed as a ratio to its ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as pyplatform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx

from bench import loadgen, micro
from bench import platform as plat

RESULTS = Path(__file__).resolve().parent / "results"
LUA = str(Path(__file__).resolve().parent / "webhooks.lua")
RUNS_LUA = str(Path(__file__).resolve().parent / "runs.lua")


def sign_lines(secret: str, count: int, prefix: str, with_keys: bool = False) -> str:
    """Pre-signed webhook requests, one unique webhook-id each (as real senders sign)."""
    from standardwebhooks.webhooks import Webhook

    hook = Webhook(secret)
    now = datetime.now(timezone.utc)
    ts = str(int(now.timestamp()))
    fd, path = tempfile.mkstemp(prefix="ipaas-bench-", suffix=".tsv")
    with os.fdopen(fd, "w") as fh:
        for i in range(count):
            body = json.dumps({"t": 0, "n": i}, separators=(",", ":"))
            msg_id = f"{prefix}-{i}"
            key = f"{prefix}-k{i}" if with_keys else ""
            fh.write(f"{msg_id}\t{ts}\t{hook.sign(msg_id, now, body)}\t{key}\t{body}\n")
    return path


def median_of(runs: int, fn: Callable[[int], dict[str, float]], key: str = "rps") -> dict[str, Any]:
    results = [fn(i) for i in range(runs)]
    values = [r[key] for r in results]
    return {"median": statistics.median(values), "runs": values, "errors": sum(r.get("errors", 0) for r in results), "results": results}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def newest_pid(pattern: str) -> int:
    import subprocess

    return int(subprocess.run(["pgrep", "-n", "-f", "--", pattern], capture_output=True, text=True).stdout.split()[-1])


def engine_pids(core_pid: int) -> list[int]:
    import subprocess

    return [int(p) for p in subprocess.run(["pgrep", "-P", str(core_pid)], capture_output=True, text=True).stdout.split()]


def with_cpu(pids: dict[str, int], fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The run's result plus each process's CPU milliseconds per request: the cost of a
    request in that process, whatever else the machine is doing."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = fn()
    for name, pid in pids.items():
        result[f"{name}_cpu_ms"] = (cpu_seconds(pid) - before[name]) * 1000 / max(result["requests"], 1)
    return result


def wrk_webhooks(url: str, path: str, lines: str, duration: int) -> dict[str, float]:
    return loadgen.wrk(url, duration, script=LUA, args=[lines, path])


def signed_sender(secret: str, url: str, prefix: str) -> Callable[[Any, int], Any]:
    from standardwebhooks.webhooks import Webhook

    hook = Webhook(secret)

    async def send(session: Any, i: int) -> int:
        now = datetime.now(timezone.utc)
        # A warm-up request (i < 0) carries no send time: the fake Slack leaves it out of
        # timed counts and latencies.
        body = json.dumps({"t": time.time() if i >= 0 else 0, "n": i}, separators=(",", ":"))
        msg_id = f"{prefix}-{i}"
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": hook.sign(msg_id, now, body), "content-type": "application/json"}
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status

    return send


def slack_stats(slack: str, since: float, timed: bool = False) -> dict[str, Any]:
    return httpx.get(f"{slack}/stats", params={"since": since, "timed": int(timed)}, timeout=30).json()


def wait_deliveries(slack: str, since: float, expected: int, timeout: float = 120, timed: bool = False) -> dict[str, Any]:
    """Stats once `expected` messages arrived since `since`; `timed`: count only messages
    that carry a send time (fixed-rate runs, whose warm-up requests carry none)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = slack_stats(slack, since, timed)
        if stats["count"] >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.25)


def drain_outbox(gateway_url: str, key: str) -> None:
    """Wait until the outbox is empty, so one run's tail does not count in the next."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        depth = httpx.get(f"{gateway_url}/api/queue", headers={"authorization": f"Bearer {key}"}).json()["data"]["depth"]
        if int(depth) == 0:
            return
        time.sleep(0.2)


def measure_platform(args: argparse.Namespace, slack: str, database_url: str | None, label: str, cores: int = 1, only_e2e: bool = False, **extra_env: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        grpc_ports = [plat.free_port() for _ in range(cores)]
        http_port = plat.free_port()
        envs = [plat.platform_env(Path(tmp) / f"c{i}", database_url, grpc_ports[i], http_port, **extra_env) for i in range(cores)]
        with contextlib_exit() as stack:
            core_pids = [stack.enter_context(plat.core(env)).pid for env in envs]
            # The gateway spreads its calls over every replica, as in a deployment.
            gateway_env = {**envs[0], "IPAAS_CORE_TARGET": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in grpc_ports)}
            gw = stack.enter_context(plat.gateway(gateway_env))
            gateway_pid = newest_pid("-m ipaas gateway")
            wf = plat.setup_webhook_workflow(gw, slack)
            path = f"/api/webhooks/{wf['workflow_id']}"
            budget = int(args.duration * 9000)

            def drain() -> None:
                drain_outbox(gw, wf["key"])

            def ingest(i: int, prefix: str, keys: bool = False) -> dict[str, float]:
                drain()  # each run starts with the engine idle, as the first one does
                return wrk_webhooks(gw, path, sign_lines(wf["secret"], budget, f"{label}-{prefix}{i}", with_keys=keys), args.duration)

            if cores == 1 and not only_e2e:
                out["ingest"] = median_of(args.runs, lambda i: ingest(i, "in"))
                drain()  # at a rate it keeps up with, not behind the last run's backlog
                out["ingest_latency"] = asyncio.run(loadgen.fixed_rate(signed_sender(wf["secret"], gw + path, f"{label}-lat"), args.rate, args.duration))
                # A rate the platform keeps up with easily, for comparison.
                drain()
                out["ingest_latency_sustained"] = asyncio.run(loadgen.fixed_rate(signed_sender(wf["secret"], gw + path, f"{label}-slat"), args.sustained_rate, args.duration))
                out["idempotent_ingest"] = median_of(args.runs, lambda i: ingest(i, "idem", keys=True))

                # Webhooks leave keys to the core; the gateway's idempotency store serves API
                # requests: manual runs with and without a key, alternately.
                def runs(i: int, keyed: bool) -> dict[str, float]:
                    drain()
                    return loadgen.wrk(gw, args.duration, script=RUNS_LUA, args=[f"/api/workflows/{wf['workflow_id']}/run", wf["key"], f"{label}-run{i}" if keyed else ""])

                run_pairs = [(runs(i, False), runs(i, True)) for i in range(args.runs)]
                out["runs"] = median_of(args.runs, lambda i: run_pairs[i][0])
                out["keyed_runs"] = median_of(args.runs, lambda i: run_pairs[i][1])
            # End to end: drain, then saturate and time until the fake Slack has them all.
            wait_deliveries(slack, 0, 0)
            time.sleep(1)

            def e2e(i: int) -> dict[str, float]:
                drain()
                time.sleep(0.5)
                # Where the CPU goes, per delivered message (engine processes summed).
                procs = {"gateway": [gateway_pid], "core": core_pids, "engines": [p for c in core_pids for p in engine_pids(c)]}
                before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in procs.items()}
                since = time.time()
                result = wrk_webhooks(gw, path, sign_lines(wf["secret"], budget, f"{label}-e2e{i}"), args.duration)
                accepted = result["requests"] - result["errors"]
                stats = wait_deliveries(slack, since, accepted)
                span = max(stats["last"] - since, 1e-9)
                cpu = {f"{name}_cpu_ms": (sum(cpu_seconds(p) for p in pids) - before[name]) * 1000 / max(stats["count"], 1) for name, pids in procs.items()}
                # wrk does not count requests still in flight when it stops, though they are
                # accepted and delivered: only a shortfall is an error.
                return {"rps": stats["count"] / span, "errors": max(0, accepted - stats["count"]), **cpu}

            out["end_to_end"] = median_of(args.runs, e2e)
            for k in ("gateway_cpu_ms", "core_cpu_ms", "engines_cpu_ms"):
                out["end_to_end"][k] = statistics.median(r[k] for r in out["end_to_end"]["results"])
            if only_e2e:
                return out

            def e2e_latency(rate: float, prefix: str) -> dict[str, Any]:
                drain()
                since = time.time()
                latency = asyncio.run(loadgen.fixed_rate(signed_sender(wf["secret"], gw + path, prefix), rate, args.duration))
                lat = wait_deliveries(slack, since, latency["requests"] - latency["errors"], timed=True)["latencies"]
                return {"rate": rate, "p50_ms": loadgen.percentile(lat, 50) * 1000, "p99_ms": loadgen.percentile(lat, 99) * 1000, "delivered": len(lat), "ingest_p99_ms": latency["p99_ms"]}

            out["end_to_end_latency"] = e2e_latency(args.rate, f"{label}-e2elat")
            out["end_to_end_latency_sustained"] = e2e_latency(args.sustained_rate, f"{label}-e2eslat")
            if cores == 1:
                pids = {"core": core_pids[0], "gateway": gateway_pid}

                def direct(i: int) -> dict[str, float]:
                    drain()  # the engine delivering an earlier run's backlog would tax this one
                    return with_cpu(pids, lambda: asyncio.run(grpc_saturation(grpc_ports[0], wf["workflow_id"], wf["secret"], f"{label}-grpc{i}", args.duration)))

                def via_gateway(i: int) -> dict[str, float]:
                    drain()
                    return with_cpu(pids, lambda: asyncio.run(loadgen.python_saturation(signed_sender(wf["secret"], gw + path, f"{label}-pyhttp{i}"), args.duration)))

                # Alternating, so both arms see the machine in the same moods.
                pairs = [(direct(i), via_gateway(i)) for i in range(args.runs)]
                out["direct_grpc"] = median_of(args.runs, lambda i: pairs[i][0])
                out["gateway_python_client"] = median_of(args.runs, lambda i: pairs[i][1])
                for name in ("direct_grpc", "gateway_python_client"):
                    for k in ("core_cpu_ms", "gateway_cpu_ms"):
                        out[name][k] = statistics.median(r[k] for r in out[name]["results"])
    return out


class contextlib_exit:
    def __enter__(self):  # type: ignore[no-untyped-def]
        import contextlib

        self.stack = contextlib.ExitStack().__enter__()
        return self.stack

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        return self.stack.__exit__(*exc)


async def grpc_saturation(port: int, workflow_id: str, secret: str, prefix: str, duration: float, concurrency: int = 64) -> dict[str, float]:
    """The same signed trigger sent straight to the core over gRPC (no gateway)."""
    import grpc
    from google.api import httpbody_pb2
    from standardwebhooks.webhooks import Webhook

    from ipaas.v1 import executions_pb2, executions_pb2_grpc

    hook = Webhook(secret)
    done = errors = 0
    counter = iter(range(10**9))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = executions_pb2_grpc.ExecutionServiceStub(channel)
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline:
                i = next(counter)
                now = datetime.now(timezone.utc)
                body = json.dumps({"t": 0, "n": i}, separators=(",", ":"))
                msg_id = f"{prefix}-{i}"
                headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": hook.sign(msg_id, now, body)}
                try:
                    await stub.ReceiveWebhook(executions_pb2.ReceiveWebhookRequest(workflow_id=workflow_id, http_body=httpbody_pb2.HttpBody(data=body.encode()), headers=headers))
                except grpc.aio.AioRpcError:
                    errors += 1
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"rps": done / elapsed, "requests": done, "errors": errors}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_soak(seconds: int, rate: float, slack: str) -> dict[str, Any]:
    """Memory over a sustained load the platform keeps up with: RSS at start and end."""
    with tempfile.TemporaryDirectory() as tmp:
        grpc_port, http_port = plat.free_port(), plat.free_port()
        env = plat.platform_env(Path(tmp), None, grpc_port, http_port)
        with plat.core(env) as core, plat.gateway(env) as gw:
            wf = plat.setup_webhook_workflow(gw, slack)
            gateway_pid = newest_pid("-m ipaas gateway")
            path = f"/api/webhooks/{wf['workflow_id']}"
            # Warm up first, so start-up allocations are not counted as growth.
            asyncio.run(loadgen.fixed_rate(signed_sender(wf["secret"], gw + path, "soak-warm"), rate, 10))
            engines = engine_pids(core.pid)
            start = {"core_mb": rss_mb(core.pid), "gateway_mb": rss_mb(gateway_pid), "engines_mb": [rss_mb(p) for p in engines]}
            load = asyncio.run(loadgen.fixed_rate(signed_sender(wf["secret"], gw + path, "soak"), rate, seconds))
            end = {"core_mb": rss_mb(core.pid), "gateway_mb": rss_mb(gateway_pid), "engines_mb": [rss_mb(p) for p in engines]}
    return {"seconds": seconds, "rate": rate, "requests": load["requests"], "errors": load["errors"], "p99_ms": load["p99_ms"], "start": start, "end": end}


def measure_ceilings(args: argparse.Namespace, slack: str) -> dict[str, Any]:
    lines = sign_lines("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", int(args.duration * 30000), "ceiling")
    out = {}
    with plat.uvicorn_app("bench.ceilings:bare_202") as url:
        out["bare_asgi_202"] = median_of(args.runs, lambda i: wrk_webhooks(url, "/x", lines, args.duration))
    with plat.uvicorn_app("bench.ceilings:relay", {"BENCH_SLACK_URL": f"{slack}/services/T1/B1/ceiling"}) as url:
        out["bare_relay_aiohttp"] = median_of(args.runs, lambda i: wrk_webhooks(url, "/x", lines, args.duration))
    return out


def paired_e2e(args: argparse.Namespace, slack: str, label: str, **variant: str) -> dict[str, Any]:
    """End to end with a setting changed against the default, platforms started alternately
    so both arms see the same machine (which drifts by tens of percent over minutes)."""
    one = argparse.Namespace(**{**vars(args), "runs": 1})
    arms: dict[str, list[float]] = {"default": [], "end_to_end": []}
    for i in range(args.runs):
        arms["default"].append(measure_platform(one, slack, None, f"{label}d{i}", only_e2e=True)["end_to_end"]["median"])
        arms["end_to_end"].append(measure_platform(one, slack, None, f"{label}v{i}", only_e2e=True, **variant)["end_to_end"]["median"])
    return {name: {"median": statistics.median(values), "runs": values} for name, values in arms.items()}


ENGINE_PRIORITY_ARMS = {
    "default": {},  # nice 5, batch scheduling
    "nice_10": {"IPAAS_ENGINE_NICE": "10", "IPAAS_ENGINE_SCHED_BATCH": "0"},  # the default before 2026-11-30
    "nice_0": {"IPAAS_ENGINE_NICE": "0", "IPAAS_ENGINE_SCHED_BATCH": "0"},  # the same priority as the core
}


def measure_engine_priority(args: argparse.Namespace, slack: str) -> dict[str, Any]:
    """What the engines' lower CPU priority (IPAAS_ENGINE_NICE, IPAAS_ENGINE_SCHED_BATCH)
    trades: ingest at saturation against ingest and end-to-end latency at --rate, for the
    default and two other settings, started in turn so every arm sees the same machine."""

    def one(arm: str, i: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            grpc_port, http_port = plat.free_port(), plat.free_port()
            env = plat.platform_env(Path(tmp), None, grpc_port, http_port, **ENGINE_PRIORITY_ARMS[arm])
            with plat.core(env), plat.gateway(env) as gw:
                wf = plat.setup_webhook_workflow(gw, slack)
                path = f"/api/webhooks/{wf['workflow_id']}"
                label = f"pr{arm}-{i}"
                ingest = wrk_webhooks(gw, path, sign_lines(wf["secret"], int(args.duration * 9000), label), args.duration)
                drain_outbox(gw, wf["key"])
                since = time.time()
                latency = asyncio.run(loadgen.fixed_rate(signed_sender(wf["secret"], gw + path, label + "-lat"), args.rate, args.duration))
                delivered = wait_deliveries(slack, since, latency["requests"] - latency["errors"], timed=True)["latencies"]
                return {"ingest": ingest["rps"], "ingest_p99_ms": latency["p99_ms"], "e2e_p50_ms": loadgen.percentile(delivered, 50) * 1000, "e2e_p99_ms": loadgen.percentile(delivered, 99) * 1000}

    runs = [{arm: one(arm, i) for arm in ENGINE_PRIORITY_ARMS} for i in range(args.runs)]
    out: dict[str, Any] = {"rate": args.rate}
    for arm in ENGINE_PRIORITY_ARMS:
        out[arm] = {m: statistics.median(r[arm][m] for r in runs) for m in runs[0][arm]} | {"runs": [r[arm] for r in runs], "env": ENGINE_PRIORITY_ARMS[arm]}
    return out


def measure_limiter(args: argparse.Namespace, slack: str) -> dict[str, Any]:
    """The rate limiter's own cost: platforms with limits on (a budget too large to ever
    refuse) and off, started alternately so both arms see the same machine state."""

    def one(limits_on: bool, i: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            grpc_port, http_port = plat.free_port(), plat.free_port()
            extra = {"IPAAS_RATE_LIMITS_OFF": "0", "IPAAS_RATE_PAID": "1000000/1000000"} if limits_on else {}
            env = plat.platform_env(Path(tmp), None, grpc_port, http_port, **extra)
            with plat.core(env), plat.gateway(env) as gw:
                wf = plat.setup_webhook_workflow(gw, slack)
                path = f"/api/webhooks/{wf['workflow_id']}"
                return wrk_webhooks(gw, path, sign_lines(wf["secret"], int(args.duration * 9000), f"rl{int(limits_on)}-{i}"), args.duration)

    runs = [(one(False, i), one(True, i)) for i in range(args.runs)]
    arm = lambda k: {"median": statistics.median(r[k]["rps"] for r in runs), "runs": [r[k]["rps"] for r in runs], "errors": sum(r[k]["errors"] for r in runs)}  # noqa: E731
    return {"unlimited_ingest": arm(0), "rate_limited_ingest": arm(1)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def engine_priority_rows(pr: dict[str, Any]) -> list[tuple[str, float, str, float | None, str]]:
    rows: list[tuple[str, float, str, float | None, str]] = []
    d = pr["default"]
    for arm, name in (("default", "engines' priority: default (nice 5, batch)"), ("nice_10", "engines' priority: nice 10"), ("nice_0", "engines' priority: nice 0 (as the core)")):
        a = pr[arm]
        rows.append((f"{name}: ingest at saturation", a["ingest"], "req/s", ratio(a["ingest"], d["ingest"]), "default"))
        for key, what in (("ingest_p99_ms", "ingest p99"), ("e2e_p50_ms", "end-to-end p50"), ("e2e_p99_ms", "end-to-end p99")):
            rows.append((f"  {what} at {pr['rate']:.0f} req/s", a[key], "ms", None, ""))
    return rows


OVER_CAPACITY = " [over capacity]"


def at_rate(what: str, rate: float, capacity: float) -> str:
    """A fixed-rate row's name, marked when the rate is more than the same run measured at
    saturation (a slow machine): its latency is then mostly time spent queueing."""
    return f"  {what} at {rate:.0f} req/s" + (OVER_CAPACITY if rate > capacity else "")


def report(results: dict[str, Any]) -> list[str]:
    c = results["ceilings"]
    bare, relay = c["bare_asgi_202"]["median"], c["bare_relay_aiohttp"]["median"]
    s = results["sqlite"]
    ingest, e2e = s["ingest"]["median"], s["end_to_end"]["median"]
    rows = [
        ("ceiling: bare ASGI 202 (uvicorn)", bare, "req/s", 1.0, "bare"),
        ("ceiling: bare relay to fake Slack (aiohttp)", relay, "req/s", 1.0, "relay"),
        ("durable ingest, signed webhooks via gateway (SQLite)", ingest, "req/s", ratio(ingest, bare), "bare"),
        *(
            (at_rate(f"ingest latency {p}", s[key]["rate"], ingest), s[key][f"{p}_ms"], "ms", None, "")
            for key in ("ingest_latency", "ingest_latency_sustained")
            for p in ("p50", "p99")
        ),
        ("end-to-end deliveries (SQLite)", e2e, "msg/s", ratio(e2e, relay), "relay"),
        *((f"  CPU per delivered message: {name}", s["end_to_end"][f"{name}_cpu_ms"], "ms", None, "") for name in ("gateway", "core", "engines") if f"{name}_cpu_ms" in s["end_to_end"]),
        *(
            (at_rate(f"end-to-end latency {p}", s[key]["rate"], e2e), s[key][f"{p}_ms"], "ms", None, "")
            for key in ("end_to_end_latency", "end_to_end_latency_sustained")
            for p in ("p50", "p99")
        ),
        ("webhooks with Idempotency-Key (deduped by the core)", s["idempotent_ingest"]["median"], "req/s", ratio(s["idempotent_ingest"]["median"], s["ingest"]["median"]), "ingest"),
        *(
            [
                ("manual runs through the REST API", s["runs"]["median"], "req/s", ratio(s["runs"]["median"], s["ingest"]["median"]), "ingest"),
                ("  with Idempotency-Key (the gateway's store), paired", s["keyed_runs"]["median"], "req/s", ratio(s["keyed_runs"]["median"], s["runs"]["median"]), "runs"),
            ]
            if "runs" in s
            else []
        ),
        ("ingest with rate limiter on", results["limiter"]["rate_limited_ingest"]["median"], "req/s", ratio(results["limiter"]["rate_limited_ingest"]["median"], results["limiter"]["unlimited_ingest"]["median"]), "limiter off"),
        ("direct gRPC trigger (python client)", s["direct_grpc"]["median"], "req/s", None, ""),
        ("via gateway (python client)", s["gateway_python_client"]["median"], "req/s", ratio(s["gateway_python_client"]["median"], s["direct_grpc"]["median"]), "grpc"),
    ]
    overhead = (1 / s["gateway_python_client"]["median"] - 1 / s["direct_grpc"]["median"]) / (1 / s["direct_grpc"]["median"])
    rows.append(("gateway overhead per request vs direct gRPC (throughput)", overhead * 100, "%", None, ""))
    if "core_cpu_ms" in s["direct_grpc"]:
        core_ms, gw_ms = s["direct_grpc"]["core_cpu_ms"], s["gateway_python_client"]["gateway_cpu_ms"]
        rows.append(("  core CPU per direct gRPC trigger", core_ms, "ms", None, ""))
        rows.append(("  core CPU per trigger via gateway", s["gateway_python_client"]["core_cpu_ms"], "ms", None, ""))
        rows.append(("  gateway CPU per trigger", gw_ms, "ms", ratio(gw_ms, core_ms), "core"))
    for key, name in (("engine_in_core", "end-to-end with the engine in the core process"), ("transport_httpx", "end-to-end with httpx's own pool instead of aiohttp's")):
        if key in results:
            t, d = results[key]["end_to_end"]["median"], results[key]["default"]["median"]
            rows.append((f"{name} (paired default: {d:.0f})", t, "msg/s", ratio(t, d), "default"))
    if "engine_priority" in results:
        rows += engine_priority_rows(results["engine_priority"])
    if "postgres_1" in results:
        p1, p2 = results["postgres_1"]["end_to_end"]["median"], results["postgres_2"]["end_to_end"]["median"]
        rows.append(("end-to-end, PostgreSQL, 1 core", p1, "msg/s", ratio(p1, relay), "relay"))
        rows.append(("end-to-end, PostgreSQL, 2 cores", p2, "msg/s", ratio(p2, p1), "1 core"))
    for name, value in results["micro"].items():
        rows.append((f"micro: {name}", value, "µs/op", None, ""))
    lines = [f"{'measure':58} {'value':>12} {'unit':6} {'ratio':>7} to"]
    for name, value, unit, r, base in rows:
        lines.append(f"{name:58} {value:12.1f} {unit:6} {('' if r is None else f'{r:.3f}'):>7} {base}")
    if any(OVER_CAPACITY in row[0] for row in rows):
        lines.append(f"{OVER_CAPACITY.strip()}: the fixed rate is more than this run measured at saturation; the latency is mostly queueing.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per load run")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed rate for latency runs")
    parser.add_argument("--sustained-rate", type=float, default=100.0, help="a second, lower fixed rate the platform keeps up with")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--soak", type=int, default=0, help="seconds of memory soak at --soak-rate (0: skip)")
    parser.add_argument("--soak-rate", type=float, default=50.0)
    parser.add_argument("--only-soak", action="store_true")
    args = parser.parse_args()
    if not loadgen.WRK:
        raise SystemExit("wrk is needed for saturation runs: apt-get install wrk")
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": pyplatform.python_version(), "platform": pyplatform.platform()},
        "settings": vars(args),
        "started": datetime.now(timezone.utc).isoformat(),
        "micro": micro.run_all(),
    }
    with plat.fake_slack() as slack:
        if args.soak:
            results["soak"] = measure_soak(args.soak, args.soak_rate, slack)
            print(json.dumps(results["soak"], indent=2))
        if args.only_soak:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "soak.json").write_text(json.dumps(results, indent=2))
            return
        results["ceilings"] = measure_ceilings(args, slack)
        results["sqlite"] = measure_platform(args, slack, None, "sq")
        results["limiter"] = measure_limiter(args, slack)
        results["engine_priority"] = measure_engine_priority(args, slack)
        # Deliveries in the core process (as before engine processes) against the default.
        results["engine_in_core"] = paired_e2e(args, slack, "ec", IPAAS_ENGINE_PROCESSES="0")
        # The connectors' HTTP transport: aiohttp's pool (the default) against httpx's own.
        results["transport_httpx"] = paired_e2e(args, slack, "hx", IPAAS_HTTP_TRANSPORT="httpx")
        pg = os.environ.get("IPAAS_TEST_POSTGRES_URL")
        if pg and not args.no_postgres:
            for cores in (1, 2):
                url = fresh_postgres(pg)
                results[f"postgres_{cores}"] = measure_platform(args, slack, url, f"pg{cores}", cores=cores)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    table = report(results)
    (RESULTS / "latest.txt").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def fresh_postgres(base: str) -> str:
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base)
    name = f"ipaas_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


if __name__ == "__main__":
    main()
