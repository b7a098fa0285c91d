"""The SSRF guard: which addresses are refused, and that a refused target is never connected
to. Requests go through the real connector client to a real server on loopback; a name's
answers come from a resolver the test controls where the system's DNS cannot give them."""

from __future__ import annotations

import socket

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from ipaas.netguard import GuardedResolver, check_url, forbidden_address
from ipaas.plugin_host import make_http_client
from ipaas.sdk import PermanentError
from tests.fakes.server import FakeServer

class Counter(FakeServer):
    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        await self.before()
        return web.Response(text="reached")


class Answers(AbstractResolver):
    """DNS as the test says: name -> addresses, and how often each name was asked."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET6 if ":" in a else socket.AF_INET, proto=0, flags=0) for a in self.table[host]]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "fd00:ec2::254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1", "fe80::1%eth0", "240.0.0.1",
     # 6to4 addresses embedding the metadata service, loopback and a private host
     "2002:a9fe:a9fe::1", "2002:7f00:1::1", "2002:a00:1::1"],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert forbidden_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "2002:5db8:d822::1"])
def test_public_addresses_are_not(address: str) -> None:
    assert not forbidden_address(address)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.slack.com/x", "must use https"),
        ("https://evil.example/x", "is not one of hooks.slack.com"),
        ("ftp://hooks.slack.com/x", "http(s) URL"),
        ("https:///nohost", "http(s) URL"),
    ],
)
def test_check_url_refuses_bad_targets(url: str, message: str) -> None:
    with pytest.raises(PermanentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_url(url, ("hooks.slack.com",), allow_insecure=False)


def test_check_url_refuses_private_literals_on_an_empty_allow_list() -> None:
    with pytest.raises(PermanentError, match="not public"):
        check_url("https://10.0.0.5/hook", (), allow_insecure=False)
    check_url("https://hooks.slack.com/x", ("hooks.slack.com",), allow_insecure=False)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "2130706433", "0x7f000001"])  # the last two: 127.0.0.1 spelt as numbers
async def test_the_connector_client_never_connects_to_loopback(host: str, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    async with Counter() as upstream:
        client = make_http_client(5.0, allow_insecure=False)
        try:
            # aiohttp refuses a decimal IPv4 as non-canonical before any resolver: also fine.
            with pytest.raises((PermanentError, httpx.UnsupportedProtocol), match="public address|canonical"):
                await client.get(f"https://{host}:{upstream.port}/")
            with pytest.raises(PermanentError, match="must use https"):
                await client.get(f"http://example.com:{upstream.port}/")
        finally:
            await client.aclose()
        assert upstream.requests == 0


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_every_request_stays_on_the_connectors_allowed_hosts(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only credentials saved with a *url field: a URL from a step's config or another
    credential field is refused too, before any lookup or connection."""
    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    client = make_http_client(5.0, allow_insecure=False, allowed_hosts=("hooks.slack.com",))
    try:
        for url in ("https://1.1.1.1/", "https://example.com/x", "https://hooks.slack.com.evil.example/"):
            with pytest.raises(PermanentError, match="is not one of hooks.slack.com"):
                await client.get(url)
    finally:
        await client.aclose()


async def test_the_resolver_refuses_a_name_with_any_private_answer() -> None:
    guard = GuardedResolver(Answers({"mixed.test": ["93.184.216.34", "10.0.0.7"], "public.test": ["93.184.216.34"]}))
    with pytest.raises(PermanentError, match="mixed.test resolves to a non-public address"):
        await guard.resolve("mixed.test", 443)
    assert [a["host"] for a in await guard.resolve("public.test", 443)] == ["93.184.216.34"]


async def test_the_checked_answer_is_the_address_connected_to() -> None:
    """No second lookup after the check (the rebinding window): the pool connects to what
    the guarded resolver answered. Here loopback counts as public so the connect can be seen;
    "hooks.test" exists only in the test's resolver."""
    async with Counter() as upstream:
        answers = Answers({"hooks.test": ["127.0.0.1"], "rebound.test": ["127.0.0.1"]})
        guard = GuardedResolver(answers, forbidden=lambda address: address != "127.0.0.1")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=guard)) as session:
            async with session.get(f"http://hooks.test:{upstream.port}/") as response:
                assert await response.text() == "reached"
            answers.table["rebound.test"] = ["10.9.9.9"]
            with pytest.raises(PermanentError):
                await session.get(f"http://rebound.test:{upstream.port}/")
        assert upstream.requests == 1 and answers.asked == ["hooks.test", "rebound.test"]


async def test_insecure_mode_lets_tests_reach_loopback() -> None:
    async with Counter() as upstream:
        client = make_http_client(5.0, allow_insecure=True)
        try:
            assert (await client.get(upstream.base_url + "/")).text == "reached"
        finally:
            await client.aclose()


async def test_the_default_client_checks_in_its_pools_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connector client's pool asks the guard, once per name (aiohttp caches answers),
    rather than a lookup per request beside the pool's own."""
    answers = Answers({"hooks.test": ["10.0.0.1"]})
    monkeypatch.setattr("ipaas.netguard.DefaultResolver", lambda: answers)
    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", "aiohttp")
    client = make_http_client(5.0, allow_insecure=False)
    try:
        with pytest.raises(PermanentError, match="hooks.test resolves to a non-public address"):
            await client.post("https://hooks.test/services/x", json={"text": "hi"})
    finally:
        await client.aclose()
    assert answers.asked == ["hooks.test"]
