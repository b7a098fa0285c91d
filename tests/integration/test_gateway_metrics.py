"""The gateway's GET /metrics over real HTTP, in front of a real core, read with
prometheus_client's own parser (what Prometheus reads)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipaas.gateway.app import create_app
from ipaas.settings import Settings
from tests.conftest import core_with, free_port, gateway_for
from tests.fakes.slack import FakeSlack

FAST = {"IPAAS_RETRY_BASE_DELAY": "0.01", "IPAAS_POLL_INTERVAL": "0.05"}


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of GET /metrics, by name and labels."""
    response = await http.get("/metrics", headers={"authorization": ""})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(autouse=True)
def fresh_expositions(monkeypatch):
    """These tests scrape before and after a few requests, within a second: rendered anew
    each time (the once-a-second rendering has a test of its own)."""
    monkeypatch.setattr("ipaas.gateway.metrics.EXPOSITION_TTL", 0.0)


@pytest.fixture
async def stack(tmp_path):
    async with FakeSlack() as slack, core_with(tmp_path, **FAST) as core, gateway_for(core.target, tmp_path, IPAAS_RATE_FREE="1/3") as url:
        paid = await core.new_tenant(tier="paid")
        free = await core.new_tenant(tier="free", name="small")
        async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {paid.key}"}, timeout=10) as http:
            cred = await http.post("/api/credentials", json={"connector": "slack", "name": "team", "secrets": {"webhook_url": slack.url}})
            assert cred.status_code == 201, cred.text
            http.workflow = {  # type: ignore[attr-defined]
                "name": "orders",
                "trigger": {"type": "manual"},
                "steps": [{"id": "notify", "connector": "slack", "action": "send_message", "config": {"text": "hi"}, "credential_id": cred.json()["data"]["id"]}],
            }
            yield http, paid, free


async def test_requests_are_counted_by_route_template_with_no_ids(stack) -> None:
    http, paid, free = stack
    created = await http.post("/api/workflows", json=http.workflow)
    assert created.status_code == 201, created.text
    wf_id = created.json()["data"]["workflow"]["id"]
    before = await scrape(http)
    for _ in range(3):
        assert (await http.get(f"/api/workflows/{wf_id}")).status_code == 200
    assert (await http.get("/api/workflows/wf_doesnotexist")).status_code == 404
    assert (await http.get("/api/nowhere/secret-path-value")).status_code == 404
    assert (await http.request("PROPFIND", "/api/workflows")).status_code == 405
    after = await scrape(http)

    one = "/api/workflows/{id}"
    assert value(after, "ipaas_gateway_requests_total", route=one, method="GET", status="200") - value(before, "ipaas_gateway_requests_total", route=one, method="GET", status="200") == 3
    assert value(after, "ipaas_gateway_requests_total", route=one, method="GET", status="404") - value(before, "ipaas_gateway_requests_total", route=one, method="GET", status="404") == 1
    assert value(after, "ipaas_gateway_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(after, "ipaas_gateway_requests_total", route="unmatched", method="other", status="405") == 1
    assert value(after, "ipaas_gateway_requests_total", route="/api/workflows", method="POST", status="201") == 1
    # The scrape before this one is counted too, under its own path.
    assert value(after, "ipaas_gateway_requests_total", route="/metrics", method="GET", status="200") >= 1
    assert value(after, "ipaas_gateway_request_duration_seconds_count", route=one) - value(before, "ipaas_gateway_request_duration_seconds_count", route=one) == 4
    assert value(after, "ipaas_gateway_request_duration_seconds_sum", route=one) > value(before, "ipaas_gateway_request_duration_seconds_sum", route=one)

    text = (await http.get("/metrics")).text
    for secret in (wf_id, "wf_doesnotexist", "secret-path-value", "PROPFIND", paid.tenant_id, paid.key, free.tenant_id):
        assert secret not in text, secret
    routes = {dict(labels)["route"] for (name, labels) in after if name == "ipaas_gateway_requests_total"}
    assert all(r == "unmatched" or r.startswith("/") and "wf_" not in r for r in routes), routes


async def test_metrics_are_not_rate_limited_and_count_429s(stack) -> None:
    http, paid, free = stack
    statuses = []
    async with httpx.AsyncClient(base_url=http.base_url, headers={"authorization": f"Bearer {free.key}"}, timeout=10) as small:
        for _ in range(6):  # a budget of 3
            statuses.append((await small.get("/api/workflows")).status_code)
        assert 429 in statuses, statuses
        # The same tenant's key on /metrics, past its budget: still answered, never limited.
        for _ in range(10):
            scraped = await small.get("/metrics")
            assert scraped.status_code == 200 and "x-ratelimit-remaining" not in scraped.headers
    samples = await scrape(http)
    assert value(samples, "ipaas_gateway_rate_limited_total", tier="free") == statuses.count(429)
    assert value(samples, "ipaas_gateway_requests_total", route="/api/workflows", method="GET", status="429") == statuses.count(429)


async def test_idempotent_replays_are_counted(stack) -> None:
    http, paid, free = stack
    body = http.workflow
    first = await http.post("/api/workflows", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    assert value(await scrape(http), "ipaas_gateway_idempotent_replays_total") == 0
    again = await http.post("/api/workflows", json=body, headers={"Idempotency-Key": "k-1"})
    assert again.headers["x-idempotency-replay"] == "true"
    assert value(await scrape(http), "ipaas_gateway_idempotent_replays_total") == 1
    assert "k-1" not in (await http.get("/metrics")).text


async def test_metrics_answer_get_and_head_only_raw_and_without_a_key(stack) -> None:
    http, paid, free = stack
    async with httpx.AsyncClient(base_url=http.base_url, timeout=10) as anonymous:
        got = await anonymous.get("/metrics")
        assert got.status_code == 200 and got.text.startswith("# HELP") and "success" not in got.text
        assert "x-request-id" in got.headers
        head = await anonymous.head("/metrics")
        assert head.status_code == 200 and head.content == b""
        posted = await anonymous.post("/metrics")
        assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
        # OpenMetrics for a scraper that prefers it (Prometheus does).
        om = await anonymous.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


async def test_many_scrapes_in_a_second_render_the_metrics_once(stack, monkeypatch) -> None:
    """/metrics needs no key and no rate limit applies, and each rendering cost ~3.5 ms of
    CPU (about 29 ordinary requests): a loop of anonymous scrapes was an amplifier. Within a
    second, scrapes get the same rendered bytes (per format); after it, a fresh one."""
    from ipaas.gateway import metrics

    monkeypatch.setattr(metrics, "EXPOSITION_TTL", 1.0)
    renders: list[str] = []
    choose = metrics.choose_encoder

    def counted(accept: str):
        encode, content_type = choose(accept)
        return (lambda registry: renders.append(content_type) or encode(registry)), content_type

    monkeypatch.setattr(metrics, "choose_encoder", counted)
    http, paid, free = stack
    async with httpx.AsyncClient(base_url=http.base_url, timeout=10) as anonymous:
        first = await anonymous.get("/metrics")
        others = [await anonymous.get("/metrics") for _ in range(50)]
        om = [await anonymous.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}) for _ in range(5)]
        assert len(renders) == 2, len(renders)  # one per format
        await asyncio.sleep(1.05)
        later = await anonymous.get("/metrics")
    assert all(r.status_code == 200 and r.content == first.content for r in others)
    assert all(r.text.endswith("# EOF\n") for r in om)
    assert len(renders) == 3 and later.content != first.content, "a second later, rendered anew (the 51 scrapes counted)"


async def test_core_call_failures_are_counted(tmp_path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # no core listens there
    async with gateway_for(nowhere, tmp_path) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.get("/api/workflows", headers={"authorization": "Bearer ipk_somekey"})
        assert answer.status_code == 503, answer.text
        samples = await scrape(http)
        assert value(samples, "ipaas_gateway_core_call_failures_total", code="UNAVAILABLE") == 1
        assert value(samples, "ipaas_gateway_core_call_failures_total", code="INTERNAL") == 0  # listed at 0, so rate() works
        assert ("ipaas_gateway_core_call_failures_total", frozenset({("code", "INTERNAL")})) in samples


async def test_metrics_can_be_turned_off(tmp_path) -> None:
    async with core_with(tmp_path) as core, gateway_for(core.target, tmp_path, IPAAS_METRICS="0") as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.get("/metrics")
        assert answer.status_code == 404 and answer.json()["error"]["reason"] == "ROUTE_NOT_FOUND"
        assert (await http.get("/health/live")).status_code == 200


def test_a_misspelt_metrics_setting_stops_the_gateway(tmp_path) -> None:
    settings = Settings.from_env({"IPAAS_DATA_DIR": str(tmp_path), "IPAAS_METRICS": "nope"})
    with pytest.raises(SystemExit, match="IPAAS_METRICS"):
        create_app(settings)
