"""Loading plugins: entry points, the allow-list, and broken plugins reported, not fatal."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import types
from pathlib import Path

import httpx
import orjson
import pytest

from ipaas.plugin_host import ConnectorRegistry, load_registry, schema_problems
from ipaas.sdk import Action, ActionResult, Connector, RateLimited, RetryableError, hookimpl


async def _ok(ctx):  # type: ignore[no-untyped-def]
    return ActionResult()


def plugin(*connectors: object, fail: Exception | None = None) -> types.SimpleNamespace:
    @hookimpl
    def ipaas_register_connectors(register):  # type: ignore[no-untyped-def]
        if fail:
            raise fail
        for c in connectors:
            register(c)

    return types.SimpleNamespace(ipaas_register_connectors=ipaas_register_connectors)


def connector(name: str = "thing", **kw: object) -> Connector:
    return Connector(name=name, version="1.0", description="d", actions=[Action("go", "Go.", _ok, kw.pop("schema", {"type": "object"}))], **kw)  # type: ignore[arg-type]


def test_built_in_connectors_are_found_by_entry_point() -> None:
    registry = load_registry()
    described = {c["name"]: c for c in registry.describe()}
    assert {"slack", "discord", "openweather"} <= set(described)
    assert described["slack"]["distribution"] == "ipaas-slack"
    assert described["slack"]["actions"][0]["name"] == "send_message"
    assert described["slack"]["credential_schema"]["required"] == ["webhook_url"]


def test_allow_list_restricts_loading() -> None:
    registry = load_registry(allow=frozenset({"slack"}))
    assert set(registry.connectors) == {"slack"}


def test_allow_list_names_that_match_nothing_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    # Before, a typo (slak) silently dropped Slack: nothing said the name matched nothing.
    registry = load_registry(allow=frozenset({"slak", "discord", "mine=ipaas-mine"}))
    assert set(registry.connectors) == {"discord"}
    assert sorted(registry.problems) == [
        ("IPAAS_PLUGINS", "'mine' matches no installed plugin (no entry point or connector of that name)"),
        ("IPAAS_PLUGINS", "'slak' matches no installed plugin (no entry point or connector of that name)"),
    ]
    assert [r.levelname for r in caplog.records if r.getMessage() == "plugins.allow_list_unmatched"] == ["WARNING", "WARNING"]


@pytest.mark.parametrize(
    "bad,reason",
    [
        (connector("Bad-Name"), "lower_snake_case"),
        (connector(schema={"type": "nonsense"}), "invalid config schema"),
        (connector(credential_schema={"required": "webhook_url"}), "invalid credential schema"),
        ("not a connector", "not an ipaas.sdk.Connector"),
    ],
)
def test_invalid_declarations_are_reported_and_left_out(bad: object, reason: str) -> None:
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-bad", plugin(bad)), ("ipaas-good", plugin(connector("good")))])
    assert set(registry.connectors) == {"good"}
    ((dist, why),) = registry.problems
    assert dist == "ipaas-bad" and reason in why


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, distribution: str, entry_point: str, source: str) -> None:
    """A distribution on sys.path, found through its entry point as a pip-installed one is."""
    module = distribution.replace("-", "_")
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[ipaas.connectors]\n{entry_point} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module, None)


SHADOW_SLACK = """
    from ipaas.sdk import Action, ActionResult, Connector, hookimpl

    async def run(ctx):
        return ActionResult(message="captured " + ctx.credentials["webhook_url"])

    @hookimpl
    def ipaas_register_connectors(register):
        register(Connector(name="slack", version="9.9", description="not Slack", actions=[Action("send_message", "d", run)]))
"""


@pytest.mark.parametrize("order", ["first-second", "second-first"])
def test_a_connector_name_two_distributions_provide_loads_neither(order: str) -> None:
    # Before, the first registration won and the second was reported: which one served the
    # name (and got its credentials) depended on the order entry points were listed in.
    offers = [("first", plugin(connector("dup"))), ("second", plugin(connector("dup"), connector("other")))]
    registry = load_registry(load_entrypoints=False, plugins=offers if order == "first-second" else offers[::-1])
    assert set(registry.connectors) == {"other"}
    assert sorted(d for d, _ in registry.problems) == ["first", "second"]
    for _, why in registry.problems:
        assert "'dup'" in why and "first" in why and "second" in why and "none of them is loaded" in why


@pytest.mark.parametrize("allow", [None, frozenset({"slack", "discord"})])
def test_a_plugin_named_like_a_built_in_does_not_take_it_over(allow: frozenset[str] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, an installed package with an entry point named "slack" replaced Slack, even
    # under IPAAS_PLUGINS=slack, when its entry point was listed first, and then received
    # every tenant's decrypted Slack credentials.
    install(tmp_path, monkeypatch, "ipaas-shadow", "slack", SHADOW_SLACK)
    registry = load_registry(allow=allow)
    assert "slack" not in registry.connectors
    assert "discord" in registry.connectors
    rejected = dict(registry.problems)
    assert set(rejected) >= {"ipaas-slack:slack", "ipaas-shadow:slack"}
    assert "ipaas-slack" in rejected["ipaas-shadow:slack"] and "ipaas-shadow" in rejected["ipaas-slack:slack"]


def test_the_allow_list_applies_to_the_connectors_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, only entry-point names were checked: an allowed entry point could register any
    # connector name, one the operator left out or a built-in's.
    install(tmp_path, monkeypatch, "ipaas-mine", "mine", SHADOW_SLACK.replace('name="slack"', 'name="discord"'))
    registry = load_registry(allow=frozenset({"slack", "mine"}))
    assert set(registry.connectors) == {"slack"}
    assert ("ipaas-mine:mine", "registered connector 'discord', which IPAAS_PLUGINS does not allow") in registry.problems


def test_a_pin_in_the_allow_list_names_the_distribution_a_connector_comes_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path, monkeypatch, "ipaas-shadow", "slack", SHADOW_SLACK)
    registry = load_registry(allow=frozenset({"slack=ipaas_Slack", "discord"}))
    assert set(registry.connectors) == {"slack", "discord"}
    assert registry.connectors["slack"].distribution == "ipaas-slack"
    assert ("ipaas-shadow:slack", "not loaded: IPAAS_PLUGINS pins 'slack' to the distribution ipaas_Slack") in registry.problems


def _sync_run(ctx):  # type: ignore[no-untyped-def]
    return ActionResult()


@pytest.mark.parametrize(
    "bad,reason",
    [
        (Connector("thing", "1", "d", [Action("go", "d", _ok)], timeout="10"), "timeout must be a number of seconds between 0 and 300, not str"),  # type: ignore[arg-type]
        (Connector("thing", "1", "d", [{"name": "go"}]), "actions[0] is a dict, not an ipaas.sdk.Action"),  # type: ignore[list-item]
        (Connector("thing", "1", "d", "go"), "actions must be a list of ipaas.sdk.Action, not str"),  # type: ignore[arg-type]
        (Connector(7, "1", "d", [Action("go", "d", _ok)]), "connector name 7 must be lower_snake_case"),  # type: ignore[arg-type]
        (Connector("thing", "1", "d", [Action("go", "d", _ok), Action("go", "d", _ok), Action("stop", "d", _ok), Action("stop", "d", _ok)]), "duplicate action names: go, stop"),
        (connector(schema={"type": "object", "properties": {"to": {"type": "nonsense"}}}), "action 'go': invalid config schema at $.properties.to.type:"),
        (connector(schema=None), "action 'go': config schema must be a JSON Schema object (a dict), not NoneType"),
        (connector(credential_schema={"properties": {"url": {"minLength": "8"}}}), "invalid credential schema at $.properties.url.minLength:"),
        (Connector("thing", "1", "d", [Action("go", "d", _ok, {"type": "object", "properties": {"token": {"type": "string"}}}, secret_fields=("tokn",))]), "action 'go': secret field 'tokn' is not a property of its config schema"),
        (Connector("thing", "1", "d", [Action("go", "d", _ok, {"type": "object", "properties": {"token": {"type": "string"}}}, secret_fields="token")]), "action 'go': secret_fields must be a tuple of field names, not str"),  # type: ignore[arg-type]
        (Connector("thing", "1", "d", [Action("go", "d", _sync_run)]), "action 'go': run must be an async function"),
    ],
)
def test_a_malformed_declaration_is_reported_not_raised(bad: Connector, reason: str) -> None:
    # Before, timeout="10" raised TypeError and a dict for an action AttributeError out of
    # ConnectorRegistry.add; a secret field the schema does not have (so never masked) was
    # accepted; duplicate actions and an invalid schema were reported without saying where.
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-bad", plugin(bad)), ("ipaas-good", plugin(connector("good")))])
    assert set(registry.connectors) == {"good"}
    ((source, why),) = registry.problems
    assert source == "ipaas-bad" and reason in why, why
    direct = ConnectorRegistry()
    direct.add(bad, "ipaas-bad")
    assert direct.connectors == {} and len(direct.problems) == 1


@pytest.mark.parametrize(("raised", "reported"), [(RuntimeError("boom"), "RuntimeError: boom"), (SystemExit("no token"), "SystemExit: no token")])
def test_a_plugin_whose_hook_raises_is_reported(raised: BaseException, reported: str) -> None:
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-crashy", plugin(fail=raised))])
    assert registry.connectors == {}
    assert registry.problems == [("ipaas-crashy", f"ipaas_register_connectors failed: {reported}")]


class Undecorated:
    def ipaas_register_connectors(self, register):  # type: ignore[no-untyped-def]
        register(connector("quiet"))


class Misspelled:
    @hookimpl
    def ipaas_register_connector(self, register):  # type: ignore[no-untyped-def]
        register(connector("quiet"))


class Returns:
    @hookimpl
    def ipaas_register_connectors(self, register):  # type: ignore[no-untyped-def]
        return [connector("quiet")]


@pytest.mark.parametrize(
    "broken,reason",
    [
        (Undecorated(), "registered no connectors: is its hook decorated with @hookimpl and does it call register(...)?"),
        (Misspelled(), "unknown hook 'ipaas_register_connector'"),
        (Returns(), "ipaas_register_connectors returned a list instead of calling register(connector) for each connector"),
    ],
)
def test_a_plugin_whose_hook_is_not_called_as_meant_is_reported(broken: object, reason: str) -> None:
    # Before, each of these loaded nothing and reported nothing: the connector was missing
    # with no word why.
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-quiet", broken), ("ipaas-good", plugin(connector("good")))])
    assert set(registry.connectors) == {"good"}
    ((source, why),) = registry.problems
    assert source == "ipaas-quiet" and reason in why


@pytest.mark.parametrize(
    ("module", "reported"),
    [
        ("raise ImportError('missing dependency: left-pad')\n", "import failed: ImportError: missing dependency: left-pad"),
        # A script's habit; SystemExit is no Exception, so it stopped the core (exit 3, the
        # plugin not named) where the docs promise the core serves without the plugin.
        ("import sys\nsys.exit('MYCHAT_TOKEN is not set')\n", "import failed: SystemExit: MYCHAT_TOKEN is not set"),
    ],
)
def test_a_plugin_that_raises_at_import_is_reported_and_others_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, reported: str) -> None:
    (tmp_path / "ipaas_broken.py").write_text(module)
    dist = tmp_path / "ipaas_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ipaas-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("[ipaas.connectors]\nbroken = ipaas_broken\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ipaas_broken", None)
    registry = load_registry()
    assert ("ipaas-broken:broken", reported) in registry.problems
    assert {"slack", "discord", "openweather"} <= set(registry.connectors)


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_connector_clients_keep_no_cookies_between_requests(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One client serves every tenant: a cookie one upstream sets must not ride along later.
    Reached by host name: aiohttp's jar ignores cookies from IP addresses, which once hid a
    jar under httpx's that kept them."""
    from aiohttp import web

    from ipaas.plugin_host import make_http_client
    from tests.fakes.server import FakeServer

    class CookieSetter(FakeServer):
        def __init__(self) -> None:
            super().__init__()
            self.cookies: list[str | None] = []

        def routes(self) -> list[web.RouteDef]:
            return [web.get("/", self.handle)]

        async def handle(self, request: web.Request) -> web.Response:
            self.cookies.append(request.headers.get("cookie"))
            response = web.Response(text="ok")
            response.set_cookie("session", "tenant-a-secret")
            return response

    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    async with CookieSetter() as upstream:
        client = make_http_client(5.0, allow_insecure=True)
        try:
            for _ in range(2):
                assert (await client.get(upstream.base_url.replace("127.0.0.1", "localhost") + "/")).status_code == 200
            client.cookies = {"planted": "x"}
            assert (await client.get(upstream.base_url.replace("127.0.0.1", "localhost") + "/")).status_code == 200
            assert len(client.cookies) == 0
        finally:
            await client.aclose()
    assert upstream.cookies == [None, None, None]


async def test_connector_clients_parse_each_url_once_and_stay_bounded() -> None:
    import httpx

    from ipaas.plugin_host import ConnectorClient, make_http_client

    client = make_http_client(5.0, allow_insecure=True)
    try:
        url = "https://hooks.example.com/services/T1/B1/x?a=1"
        first, second = client.build_request("POST", url), client.build_request("POST", url, params={"b": "2"})
        assert list(client._parsed) == [url] and client._parsed[url] == first.url, "parsed once, kept"
        plain = httpx.AsyncClient()
        assert (first.url, second.url) == (plain.build_request("POST", url).url, plain.build_request("POST", url, params={"b": "2"}).url), "as httpx builds them"
        assert str(client.build_request("POST", url).url) == url, "params never leak into the shared URL"
        await plain.aclose()
        with pytest.raises(httpx.InvalidURL):
            client.build_request("POST", "http://[::1")
        assert "http://[::1" not in client._parsed
        for i in range(ConnectorClient.MAX_PARSED_URLS + 5):
            client.build_request("GET", f"https://example.com/{i}")
        assert len(client._parsed) <= ConnectorClient.MAX_PARSED_URLS
    finally:
        await client.aclose()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_connector_responses_are_freed_without_the_garbage_collector(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx ties a response and its stream in a reference cycle; a connector's read
    response (with its request and headers) must go as soon as the connector drops it."""
    import gc
    import weakref

    from aiohttp import web

    from ipaas.plugin_host import make_http_client
    from tests.fakes.server import FakeServer

    class Echo(FakeServer):
        def routes(self) -> list[web.RouteDef]:
            return [web.post("/", self.handle)]

        async def handle(self, request: web.Request) -> web.Response:
            return web.json_response({"ok": True, "got": await request.json()})

    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    async with Echo() as upstream:
        client = make_http_client(5.0, allow_insecure=True)
        try:
            await client.post(upstream.base_url + "/", json={"warm": 1})
            gc.collect()
            gc.disable()
            try:
                response = await client.post(upstream.base_url + "/", json={"text": "hi"})
                assert response.status_code == 200 and response.json() == {"ok": True, "got": {"text": "hi"}}
                assert response.content == await response.aread(), "the body stays readable"
                freed = weakref.ref(response)
                del response
                assert freed() is None, "freed by reference counting alone"
            finally:
                gc.enable()
            async with client.stream("POST", upstream.base_url + "/", json={"s": 1}) as streamed:
                assert [chunk async for chunk in streamed.aiter_bytes()] != [], "streaming is untouched"
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "output,reason",
    [
        ({"when": object()}, "not JSON"),
        ({1: "a key JSON objects cannot have"}, "not JSON"),
        ({"body": "x" * (256 * 1024)}, "bytes of output; the limit is 262144"),
        ({"body": orjson.loads("[" * 32 + "]" * 32)}, "nested too deeply"),  # 33 levels with the output's own
    ],
)
async def test_an_output_that_cannot_be_stored_fails_the_step_for_good(output: dict, reason: str) -> None:
    from ipaas.sdk import PermanentError

    async def run(ctx):  # type: ignore[no-untyped-def]
        return ActionResult(output=output)

    thing = Connector(name="thing", version="1.0", description="d", actions=[Action("go", "Go.", run, {"type": "object"})])
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-thing", plugin(thing))])
    with pytest.raises(PermanentError, match=reason):
        await registry.invoke("thing", "go", registry.context("thing", {}, {}, 5))
    await registry.aclose()


async def test_an_output_within_the_limit_passes() -> None:
    async def run(ctx):  # type: ignore[no-untyped-def]
        return ActionResult(output={"body": "x" * 1000, "n": [1, 2.5, None, True]})

    thing = Connector(name="thing", version="1.0", description="d", actions=[Action("go", "Go.", run, {"type": "object"})])
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-thing", plugin(thing))])
    result = await registry.invoke("thing", "go", registry.context("thing", {}, {}, 5))
    assert result.output == {"body": "x" * 1000, "n": [1, 2.5, None, True]}
    await registry.aclose()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_response_larger_than_the_limit_fails_the_step_without_being_held(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream answering with more than MAX_RESPONSE_BYTES (declared, streamed with no
    length, or compressed small and decoded large) fails the step for good; the body is not
    collected in the engine's memory first, and the URL's secret path is not in the error."""
    import gzip

    from aiohttp import web

    from ipaas.plugin_host import MAX_RESPONSE_BYTES, make_http_client
    from ipaas.sdk import PermanentError
    from tests.fakes.server import FakeServer

    too_much = MAX_RESPONSE_BYTES + 1
    bomb = gzip.compress(b"\0" * too_much)

    class Big(FakeServer):
        def __init__(self) -> None:
            super().__init__()
            self.sent: dict[str, int] = {}

        def routes(self) -> list[web.RouteDef]:
            return [web.get("/{kind}/secret-path", self.handle)]

        async def handle(self, request: web.Request) -> web.StreamResponse:
            kind = request.match_info["kind"]
            if kind == "declared":
                return web.Response(body=b"x" * too_much)
            if kind == "gzip":
                return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})
            if kind == "fits":
                return web.Response(body=b"y" * MAX_RESPONSE_BYTES)
            response = web.StreamResponse()  # chunked: no length to refuse up front
            await response.prepare(request)
            chunk, self.sent[kind] = b"z" * 65536, 0
            try:
                while self.sent[kind] < 4 * MAX_RESPONSE_BYTES:
                    await response.write(chunk)
                    self.sent[kind] += len(chunk)
            except (ConnectionResetError, RuntimeError):
                pass  # the client stopped reading, as it should
            return response

    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    async with Big() as upstream:
        client = make_http_client(10.0, allow_insecure=True)
        try:
            for kind in ("declared", "chunked", "gzip"):
                with pytest.raises(PermanentError) as caught:
                    await client.get(f"{upstream.base_url}/{kind}/secret-path")
                assert f"more than {MAX_RESPONSE_BYTES} bytes" in str(caught.value), kind
                assert "secret-path" not in str(caught.value) and "127.0.0.1" in str(caught.value)
            assert upstream.sent["chunked"] < 2 * MAX_RESPONSE_BYTES, "reading stopped near the limit"
            fits = await client.get(f"{upstream.base_url}/fits/secret-path")
            assert len(fits.content) == MAX_RESPONSE_BYTES and fits.text[:1] == "y", "a body at the limit is read whole"
            assert (await client.get(f"{upstream.base_url}/fits/secret-path")).status_code == 200, "the client still works"
        finally:
            await client.aclose()


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_refused_connection_is_a_connect_error_not_a_timeout(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx-aiohttp 0.2 reports every aiohttp connection failure, a refused port or an
    unknown host, as ConnectTimeout; the step's error would send its reader looking for a
    slow network."""
    import socket

    import httpx

    from ipaas.plugin_host import make_http_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once it is closed
    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    client = make_http_client(5.0, allow_insecure=True)
    try:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{closed}/")
        assert not isinstance(caught.value, httpx.TimeoutException)
    finally:
        await client.aclose()


MALFORMED_ANSWERS = {
    "bad_status_line": b"HTTP/1.1 2OO OK\r\n\r\n",
    "bad_header_line": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header: x\r\n\r\nok",
}


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("reply", list(MALFORMED_ANSWERS))
async def test_a_malformed_answer_is_retried_not_blamed_on_the_plugin(transport: str, reply: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad status or header line (a flaky proxy) is the network's fault: retried on both
    transports, as httpx's RemoteProtocolError, and the webhook URL's secret path stays out."""
    import asyncio

    from ipaas_slack import CONNECTOR as SLACK

    from ipaas.plugin_host import ConnectorRegistry
    from ipaas.sdk import RetryableError

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(MALFORMED_ANSWERS[reply])
        await writer.drain()
        writer.close()

    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/services/T000/B000/S3CRETTOKENVALUE"
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(SLACK, "ipaas-slack")
    try:
        with pytest.raises(RetryableError) as caught:
            await registry.invoke("slack", "send_message", registry.context("slack", {"text": "x"}, {"webhook_url": url}, 2))
        assert "S3CRETTOKENVALUE" not in str(caught.value)
    finally:
        await registry.aclose()
        server.close()


async def test_a_schema_violation_never_quotes_the_value() -> None:
    """Schema errors reach API answers, an execution's stored error and logs: a secret field
    or a credential that fails its schema must not appear in them (jsonschema's own messages
    quote the value)."""
    from ipaas.engine.steps import StepRunner
    from ipaas.plugin_host import ConnectorRegistry
    from ipaas.sdk import Action, ActionResult, Connector, PermanentError

    secret = "LIC-7f3a9c2e51d84b06a9e1"

    async def run(ctx: object) -> ActionResult:
        return ActionResult()

    schema = {"type": "object", "properties": {"license": {"type": "string", "pattern": "^LIC-[0-9a-f]{16}$"}, "seats": {"type": "integer", "maximum": 5}}, "required": ["license"], "additionalProperties": False}
    connector = Connector("licensed", "1.0.0", "d", [Action("go", "d", run, config_schema=schema, secret_fields=("license",))], credential_schema=schema)
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(connector, "ipaas-licensed")
    steps = StepRunner(registry, credentials=None)  # type: ignore[arg-type]
    with pytest.raises(PermanentError) as caught:
        await steps.invoke("t", "e", {"id": "s", "connector": "licensed", "action": "go"}, {"license": secret, "seats": 9, "extra": 1}, 5, dry_run=False)
    assert secret not in str(caught.value)
    assert str(caught.value) == "invalid config after rendering: config.extra: is not a known field; config.license: must match the pattern ^LIC-[0-9a-f]{16}$; config.seats: must be at most 5"
    problems = registry.validate_credentials("licensed", {"license": secret})
    assert problems == [("secrets.license", "must match the pattern ^LIC-[0-9a-f]{16}$")]


@pytest.mark.parametrize(
    "fmt,good,bad",
    [
        ("email", "ops@example.com", "not an address"),
        ("date", "2024-02-29", "2023-02-29"),
        ("date-time", "2024-05-01T09:30:00+02:00", "yesterday at noon"),
        ("date-time", "2024-05-01T09:30:00.5Z", "2024-05-01 09:30"),
        ("uri", "https://hooks.example.com/a?b=c", "hooks.example.com/a"),
        ("uri", "mailto:ops@example.com", "https://exa mple.com"),
        ("ipv4", "192.0.2.1", "192.0.2"),
        ("uuid", "123e4567-e89b-12d3-a456-426614174000", "123"),
    ],
)
def test_a_config_field_s_format_is_enforced(fmt: str, good: str, bad: str) -> None:
    # Before, `format` was never checked (the validator had no format checker): a schema's
    # "format": "email" accepted any text, and the action got it.
    schema = {"type": "object", "properties": {"field": {"type": "string", "format": fmt}}}
    assert schema_problems(schema, {"field": good}, "config") == []
    assert schema_problems(schema, {"field": bad}, "config") == [("config.field", f"must be a valid {fmt}")]
    assert schema_problems(schema, {"field": 5}, "config") == [("config.field", "must be of type string")], "a format applies to strings only"


def test_a_format_the_host_cannot_check_is_left_alone() -> None:
    schema = {"type": "object", "properties": {"field": {"format": "made-up"}}}
    assert schema_problems(schema, {"field": "anything"}, "config") == []


@pytest.mark.parametrize(
    "result,reason",
    [
        (ActionResult(message="posted", output="posted"), "thing.go returned an output of type str, not a dict"),  # type: ignore[arg-type]
        (ActionResult(output=[("a", 1)]), "thing.go returned an output of type list, not a dict"),  # type: ignore[arg-type]
        (ActionResult(message=201), "thing.go returned a message of type int, not a str"),  # type: ignore[arg-type]
    ],
)
async def test_a_result_of_the_wrong_type_fails_the_step_naming_the_action(result: ActionResult, reason: str) -> None:
    # It escaped the host (dict("posted") raised ValueError) and the executor: the execution
    # stayed running until its lease ended and the action ran again, up to max_attempts.
    from ipaas.sdk import PermanentError

    async def run(ctx):  # type: ignore[no-untyped-def]
        return result

    thing = Connector(name="thing", version="1.0", description="d", actions=[Action("go", "Go.", run, {"type": "object"})])
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-thing", plugin(thing))])
    with pytest.raises(PermanentError, match=reason):
        await registry.invoke("thing", "go", registry.context("thing", {}, {}, 5))
    await registry.aclose()


@pytest.mark.parametrize("raised", [ZeroDivisionError("division by zero"), SystemExit("no token")])
async def test_an_action_that_raises_fails_the_step_and_the_engine_lives_on(raised: BaseException) -> None:
    # SystemExit is no Exception: it went past the host and the executor and ended the
    # engine process; its lease expired, the step ran again and ended the next engine too.
    from ipaas.sdk import PermanentError

    async def run(ctx):  # type: ignore[no-untyped-def]
        raise raised

    thing = Connector(name="thing", version="1.0", description="d", actions=[Action("go", "Go.", run, {"type": "object"})])
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-thing", plugin(thing))])
    with pytest.raises(PermanentError, match=f"thing.go failed: {type(raised).__name__}: "):
        await registry.invoke("thing", "go", registry.context("thing", {}, {}, 5))
    await registry.aclose()


@pytest.mark.parametrize("given,expected", [("30", 30.0), (" 1.5 ", 1.5), (7, 7.0), ("soon", None), (float("nan"), None), (-3, None), ([30], None), (True, None), (None, None)])
async def test_a_retry_after_of_another_type_is_read_as_seconds_or_dropped(given: object, expected: float | None) -> None:
    # A string (the raw header) reached the retry policy's `retry_after > 0` and raised
    # TypeError outside every handler: the execution stayed running until its lease ended.
    from ipaas.sdk import RetryableError

    async def run(ctx):  # type: ignore[no-untyped-def]
        raise RetryableError("rate limited", retry_after=given)  # type: ignore[arg-type]

    thing = Connector(name="thing", version="1.0", description="d", actions=[Action("go", "Go.", run, {"type": "object"})])
    registry = load_registry(load_entrypoints=False, plugins=[("ipaas-thing", plugin(thing))])
    with pytest.raises(RetryableError) as raised:
        await registry.invoke("thing", "go", registry.context("thing", {}, {}, 5))
    assert raised.value.retry_after == expected
    await registry.aclose()


async def test_a_secret_config_field_is_masked_in_what_the_action_logs_and_raises(caplog: pytest.LogCaptureFixture) -> None:
    """secret_fields were masked in the stored rendered config only: the action's own log
    lines and error messages showed the value."""
    import logging

    from ipaas.engine.steps import StepRunner
    from ipaas.plugin_host import ConnectorRegistry
    from ipaas.sdk import Action, Connector, PermanentError

    secret = "hunter2hunter2"

    async def run(ctx):  # type: ignore[no-untyped-def]
        ctx.logger.warning("calling with %s", ctx.config["token"])
        raise PermanentError(f"upstream rejected {ctx.config['token']}")

    schema = {"type": "object", "properties": {"token": {"type": "string"}, "text": {"type": "string"}}}
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(Connector("secretcfg", "1.0.0", "d", [Action("post", "d", run, config_schema=schema, secret_fields=("token",))]), "ipaas-secretcfg")
    steps = StepRunner(registry, credentials=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING), pytest.raises(PermanentError) as caught:
        await steps.invoke("t", "e", {"id": "s", "connector": "secretcfg", "action": "post"}, {"token": secret, "text": "hi"}, 5, dry_run=False)
    assert secret not in str(caught.value) and "upstream rejected" in str(caught.value)
    assert "calling with" in caplog.text and secret not in caplog.text


@pytest.mark.parametrize(("transport", "resolver_guarded"), [("", True), (" AIOHTTP ", True), ("httpx", False)])
async def test_only_httpx_selects_the_transport_with_a_dns_rebinding_window(transport: str, resolver_guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything but "aiohttp" selected httpx's transport, an empty value and a typo included,
    and with it the separate lookup a DNS answer can change between (docs/operating.md)."""
    from ipaas.plugin_host import make_http_client

    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", transport)
    client = make_http_client(5.0, allow_insecure=False)
    try:
        assert client._transport.resolver_guarded is resolver_guarded
    finally:
        await client.aclose()
    monkeypatch.setenv("IPAAS_HTTP_TRANSPORT", "httpxx")
    with pytest.raises(SystemExit, match="IPAAS_HTTP_TRANSPORT must be aiohttp or httpx"):
        make_http_client(5.0, allow_insecure=False)


async def _status_then_raise_plain(ctx):  # type: ignore[no-untyped-def]
    # A third-party habit: its own status check and a plain RetryableError, no RateLimited.
    for url in ctx.config["urls"]:
        response = await ctx.http.post(url, json={"text": "x"})
    raise RetryableError(f"upstream answered {response.status_code}")


async def _own_retry_after(ctx):  # type: ignore[no-untyped-def]
    await ctx.http.post(ctx.config["urls"][0], json={"text": "x"})
    raise RetryableError("busy", retry_after=3)


async def _httpx_raise_for_status(ctx):  # type: ignore[no-untyped-def]
    (await ctx.http.post(ctx.config["urls"][0], json={"text": "x"})).raise_for_status()


async def _wrapped_from_httpx(ctx):  # type: ignore[no-untyped-def]
    try:
        (await ctx.http.post(ctx.config["urls"][0], json={"text": "x"})).raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise RetryableError("upstream refused") from exc


async def _cause_is_the_first_answer(ctx):  # type: ignore[no-untyped-def]
    # Gives up on the first request's error after a later request was limited.
    first = await ctx.http.post(ctx.config["urls"][0], json={"text": "x"})
    await ctx.http.post(ctx.config["urls"][1], json={"text": "x"})
    try:
        first.raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise RetryableError("first delivery failed") from exc


async def _then_no_answer(ctx):  # type: ignore[no-untyped-def]
    await ctx.http.post(ctx.config["urls"][0], json={"text": "x"})
    try:
        await ctx.http.post(ctx.config["urls"][1], json={"text": "x"})
    except httpx.ConnectError:
        raise RetryableError("upstream is down")  # no cause given: the latest request decides


@pytest.mark.parametrize(
    "run,answers,raised,retry_after",
    [
        pytest.param(_status_then_raise_plain, [429], RateLimited, 7.0, id="plain RetryableError after a 429"),
        pytest.param(_own_retry_after, [429], RateLimited, 3.0, id="its own retry_after wins"),
        pytest.param(_httpx_raise_for_status, [429], RateLimited, 7.0, id="httpx raise_for_status let through"),
        pytest.param(_wrapped_from_httpx, [429], RateLimited, 7.0, id="RetryableError from an HTTPStatusError"),
        pytest.param(_status_then_raise_plain, [500], RetryableError, None, id="a 500"),
        pytest.param(_status_then_raise_plain, [429, 500], RetryableError, None, id="a 429 then a 500"),
        pytest.param(_wrapped_from_httpx, [500], RetryableError, None, id="RetryableError from a 500"),
        pytest.param(_cause_is_the_first_answer, [500, 429], RetryableError, None, id="the cause, a 500, before a 429"),
        pytest.param(_then_no_answer, [429, None], RetryableError, None, id="a 429 then no answer"),
    ],
)
async def test_a_rate_limit_is_recognised_without_the_plugin_saying_so(run, answers: list, raised: type, retry_after: float | None) -> None:  # type: ignore[no-untyped-def]
    """A plugin that raised a plain RetryableError for a 429 (or let httpx's HTTPStatusError
    through) had it counted as a breaker failure, or failed for good: five, from one busy
    target, opened the breaker for every target of the tenant's connector. What the call's
    requests got decides, through the error's cause first, else the latest answer."""
    import socket

    from tests.fakes.slack import FakeSlack

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"  # nothing listens once it is closed
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(Connector("thirdparty", "1.0", "d", [Action("post", "Post.", run)]), "ipaas-thirdparty")
    async with FakeSlack() as upstream:
        for status in answers:
            if status is not None:
                upstream.fail_next(status, retry_after=7 if status == 429 else None)
        urls = [upstream.url if status is not None else closed for status in answers]
        try:
            with pytest.raises(RetryableError) as caught:
                await registry.invoke("thirdparty", "post", registry.context("thirdparty", {"urls": urls}, {"webhook_url": upstream.url}, 5))
        finally:
            await registry.aclose()
    assert type(caught.value) is raised and caught.value.retry_after == retry_after, caught.value
    assert upstream.token not in str(caught.value)


async def _wait_out_then_ask(ctx):  # type: ignore[no-untyped-def]
    # A client library's habit: wait out a 429's Retry-After within the call, then ask again.
    response = await ctx.http.post(ctx.config["urls"][0], json={"text": "x"})
    await asyncio.sleep(float(response.headers.get("retry-after", "0")))
    for url in ctx.config["urls"][1:]:
        await ctx.http.post(url, json={"text": "x"})
    return ActionResult()


@pytest.mark.parametrize(
    "then,raised,retry_after",
    [
        pytest.param([], RateLimited, 7.0, id="timed out waiting out a 429"),
        pytest.param(["black hole"], RetryableError, None, id="timed out on a request after a 429"),
    ],
)
async def test_a_call_that_times_out_waiting_out_a_rate_limit_is_rate_limited(then: list, raised: type, retry_after: float | None) -> None:
    """A plugin that honours Retry-After itself, sleeping within the call, ran into the
    call's timeout: a breaker failure, although the upstream had answered. A request still
    unanswered at the timeout is a failure, whatever came before it."""
    from tests.fakes.slack import FakeSlack

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    black_hole = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    registry = ConnectorRegistry(allow_insecure=True)
    registry.add(Connector("thirdparty", "1.0", "d", [Action("post", "Post.", _wait_out_then_ask)]), "ipaas-thirdparty")
    async with FakeSlack() as upstream:
        upstream.fail_next(429, retry_after=7 if not then else 0)
        urls = [upstream.url] + [f"http://127.0.0.1:{black_hole.sockets[0].getsockname()[1]}/" for _ in then]
        try:
            with pytest.raises(RetryableError, match="timed out after 0.5s") as caught:
                await registry.invoke("thirdparty", "post", registry.context("thirdparty", {"urls": urls}, {}, 0.5))
        finally:
            await registry.aclose()
            black_hole.close()
    assert type(caught.value) is raised and caught.value.retry_after == retry_after, caught.value
