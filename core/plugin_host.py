"""The plugin host: owns the pluggy manager, loads connector plugins from the entry-point
group `ipaas.connectors` (built-in ones exactly like third-party ones), validates what they
declare and invokes their actions under a timeout.

A broken plugin (import error, invalid declaration, duplicate connector name) is recorded
with its distribution and the reason, logged, and left out; loading never raises.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import logging
import re
import time
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Mapping

import aiohttp
import httpx
import jsonschema
import orjson
import pluggy
from cachetools import LRUCache
from httpx_aiohttp import AiohttpTransport
from jsonschema import Draft202012Validator, FormatChecker

from ipaas import hookspecs
from ipaas.engine.retry import parse_retry_after
from ipaas.masking import SecretMasker
from ipaas.netguard import GuardedResolver, GuardedTransport, check_url
from ipaas.settings import HTTP_TRANSPORTS, choice
from ipaas.sdk import NAME, Action, ActionResult, Connector, ConnectorError, ExecutionContext, MaskingAdapter, PermanentError, RateLimited, RetryableError, _retry_after
from ipaas.wire import MAX_JSON_DEPTH, nested_deeper_than

log = logging.getLogger("ipaas.plugins")

# What a plugin's own code may raise, at load or in an action, and the platform survives:
# every Exception, and SystemExit, since `sys.exit("TOKEN is not set")` is a script's habit
# (at import it stopped the core, exit 3, naming no plugin; in an action it ended the engine
# process). KeyboardInterrupt is left to mean Ctrl-C.
PLUGIN_FAILURES = (Exception, SystemExit)

# The action each task is running (a dict entry for the call's length): a loop that a
# plugin blocks is reported naming the connector and the execution (ipaas.loop_watch).
RUNNING_ACTIONS: dict[Any, dict[str, str]] = {}

ENTRY_POINT_GROUP = "ipaas.connectors"
# An action's output is stored with its step and returned by the API (GetExecution carries
# every step of an execution in one gRPC message of at most 4 MiB).
MAX_OUTPUT_BYTES = 256 * 1024
# A connector reads an upstream's answer whole into the engine's memory, which every step in
# flight shares: past this (decoded) size the step fails instead. Streamed reads
# (`client.stream(...)`) are the connector's own to bound.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

# httpx logs every request line with its full URL at INFO, and a webhook URL's path is its
# secret; httpcore's DEBUG traces carry headers. Neither may reach a log.
for _noisy in ("httpx", "httpcore"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def _path(prefix: str, parts: Iterable[Any]) -> str:
    out = prefix
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


_validators: LRUCache[int, tuple[dict[str, Any], Draft202012Validator]] = LRUCache(maxsize=1024)

def _format_checker() -> FormatChecker:
    """jsonschema's 2020-12 format checks, for the formats whose checkers are installed:
    date, email, ipv4, ipv6, uuid, regex, and date-time and uri (rfc3339-validator and
    rfc3986-validator are dependencies for those two). Any other format without a checker is
    accepted, as the specification allows."""
    return Draft202012Validator.FORMAT_CHECKER


FORMATS = _format_checker()


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    """Schemas are connector declarations that live as long as the process: build each
    validator once, not on every step (keyed by identity, checked against id reuse)."""
    hit = _validators.get(id(schema))
    if hit is None or hit[0] is not schema:
        hit = _validators[id(schema)] = (schema, Draft202012Validator(schema, format_checker=FORMATS))
    return hit[1]


# What each JSON Schema keyword asks, in words built from the schema alone. jsonschema's own
# messages quote the value ("'https://hooks.slack.com/services/T0/B0/XYZ' does not match
# ..."), and these descriptions end up in API answers, in an execution's stored error and in
# logs: a credential's secret or a rendered payload's personal data must not.
_RULES: dict[str, Callable[[Any], str]] = {
    "type": lambda v: f"must be of type {' or '.join(v) if isinstance(v, list) else v}",
    "pattern": lambda v: f"must match the pattern {v}",
    "minLength": lambda v: f"must be at least {v} characters long",
    "maxLength": lambda v: f"must be at most {v} characters long",
    "minItems": lambda v: f"must have at least {v} items",
    "maxItems": lambda v: f"must have at most {v} items",
    "uniqueItems": lambda v: "must not repeat an item",
    "minimum": lambda v: f"must be at least {v}",
    "maximum": lambda v: f"must be at most {v}",
    "exclusiveMinimum": lambda v: f"must be greater than {v}",
    "exclusiveMaximum": lambda v: f"must be less than {v}",
    "multipleOf": lambda v: f"must be a multiple of {v}",
    "enum": lambda v: "must be one of " + ", ".join(map(str, v)),
    "const": lambda v: f"must be {v}",
    "format": lambda v: f"must be a valid {v}",
    "minProperties": lambda v: f"must have at least {v} fields",
    "maxProperties": lambda v: f"must have at most {v} fields",
    "anyOf": lambda v: _any_of(v),
    "oneOf": lambda v: "must fit exactly one of the allowed forms",
    "not": lambda v: "has a form that is not allowed",
}


def _any_of(forms: Any) -> str:
    # The common case, "one of these fields is needed", said as such.
    if isinstance(forms, list) and all(isinstance(f, dict) and set(f) == {"required"} for f in forms):
        return "needs one of: " + ", ".join(name for f in forms for name in f["required"])
    return "does not fit any of the allowed forms"


def schema_problems(schema: dict[str, Any], value: Any, prefix: str) -> list[tuple[str, str]]:
    """Schema violations as (field path, description), e.g. ("config.text", "is required").
    No description quotes the value (see _RULES)."""
    problems = []
    for error in _validator(schema).iter_errors(value):
        where = _path(prefix, error.absolute_path)
        if error.validator == "required" and (match := re.match(r"'(.+)' is a required property", error.message)):
            problems.append((f"{where}.{match.group(1)}", "is required"))  # a name from the schema
        elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
            problems.extend((f"{where}.{name[:100]}", "is not a known field") for name in error.instance if name not in known and not any(p.search(name) for p in patterns))
        else:
            rule = _RULES.get(str(error.validator))
            problems.append((where, rule(error.validator_value)[:300] if rule else f"breaks the schema's {error.validator} rule"))
    return sorted(problems)


def declaration_problems(connector: Any) -> list[str]:
    """What is wrong with a connector's declaration, in words that say where. Dataclasses do
    not check their fields' types, so anything may arrive here; a check that still raises
    is reported as a problem rather than escaping the host's loading."""
    if not isinstance(connector, Connector):
        return [f"registered {type(connector).__name__}, not an ipaas.sdk.Connector"]
    try:
        return _declaration_problems(connector)
    except Exception as exc:
        return [f"declaration could not be checked: {type(exc).__name__}: {exc}"]


def _declaration_problems(connector: Connector) -> list[str]:
    problems = []
    if not isinstance(connector.name, str) or not NAME.match(connector.name):
        problems.append(f"connector name {connector.name!r} must be lower_snake_case")
    if not connector.version or not isinstance(connector.version, str):
        problems.append("version is required (a str)")
    timeout = connector.timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        problems.append(f"timeout must be a number of seconds between 0 and 300, not {type(timeout).__name__}")
    elif not 0 < timeout <= 300:
        problems.append("timeout must be between 0 and 300 seconds")
    if not isinstance(connector.allowed_hosts, (tuple, list)) or not all(isinstance(h, str) for h in connector.allowed_hosts):
        problems.append("allowed_hosts must be a tuple of host names")
    if not isinstance(connector.actions, (tuple, list)):
        return problems + [f"actions must be a list of ipaas.sdk.Action, not {type(connector.actions).__name__}"]
    if not connector.actions:
        problems.append("a connector needs at least one action")
    for i, action in enumerate(connector.actions):
        if not isinstance(action, Action):
            problems.append(f"actions[{i}] is a {type(action).__name__}, not an ipaas.sdk.Action")
    actions = [a for a in connector.actions if isinstance(a, Action)]
    names = [a.name for a in actions]
    if repeated := sorted({str(n) for n in names if names.count(n) > 1}):
        problems.append(f"duplicate action names: {', '.join(repeated)}")
    for action in actions:
        problems += _action_problems(action)
    if connector.credential_schema is not None:
        problems += _schema_declaration_problems(connector.credential_schema, "credential schema")
    return problems


def _action_problems(action: Action) -> list[str]:
    problems = []
    if not isinstance(action.name, str) or not NAME.match(action.name):
        problems.append(f"action name {action.name!r} must be lower_snake_case")
    if not inspect.iscoroutinefunction(action.run):
        problems.append(f"action {action.name!r}: run must be an async function")
    schema_problems_found = _schema_declaration_problems(action.config_schema, "config schema")
    problems += [f"action {action.name!r}: {p}" for p in schema_problems_found]
    secret = action.secret_fields
    if not isinstance(secret, (tuple, list)) or not all(isinstance(f, str) for f in secret):
        problems.append(f"action {action.name!r}: secret_fields must be a tuple of field names, not {type(secret).__name__}")
    elif not schema_problems_found:
        # A secret field the schema does not name is a typo: the real field would be shown
        # (and logged) unmasked.
        known = action.config_schema.get("properties")
        known = known if isinstance(known, dict) else {}
        problems += [f"action {action.name!r}: secret field {f!r} is not a property of its config schema" for f in secret if f not in known]
    return problems


def _schema_declaration_problems(schema: Any, what: str) -> list[str]:
    if not isinstance(schema, dict):
        return [f"{what} must be a JSON Schema object (a dict), not {type(schema).__name__}"]
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [f"invalid {what} at {exc.json_path}: {exc.message}"]
    return []


@dataclass
class LoadedConnector:
    connector: Connector
    distribution: str


@dataclass
class ConnectorRegistry:
    allow_insecure: bool = False
    connectors: dict[str, LoadedConnector] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    _clients: dict[str, httpx.AsyncClient] = field(default_factory=dict)

    # -- loading -----------------------------------------------------------------------
    def add(self, connector: Any, distribution: str, source: str | None = None) -> None:
        """Add one connector; `source` (distribution:entry point) names it in a problem."""
        problems = declaration_problems(connector)
        if not problems and connector.name in self.connectors:
            problems = [f"duplicate connector name {connector.name!r} (already provided by {self.connectors[connector.name].distribution})"]
        if problems:
            self.problem(source or distribution, "; ".join(problems))
            return
        self.connectors[connector.name] = LoadedConnector(connector, distribution)

    def problem(self, distribution: str, reason: str, event: str = "plugin.rejected", level: int = logging.ERROR) -> None:
        self.problems.append((distribution, reason))
        log.log(level, event, extra={"distribution": distribution, "reason": reason})

    def get(self, name: str) -> Connector | None:
        loaded = self.connectors.get(name)
        return loaded.connector if loaded else None

    # -- describing and validating -----------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": c.connector.name,
                "version": c.connector.version,
                "description": c.connector.description,
                "distribution": c.distribution,
                "actions": [
                    {"name": a.name, "description": a.description, "config_schema": a.config_schema, "secret_fields": list(a.secret_fields)}
                    for a in c.connector.actions
                ],
                "credential_schema": c.connector.credential_schema or {},
            }
            for c in sorted(self.connectors.values(), key=lambda c: c.connector.name)
        ]

    def action_problem(self, connector: str, action: str) -> tuple[str, str] | None:
        found = self.get(connector)
        if found is None:
            known = ", ".join(sorted(self.connectors)) or "none installed"
            return ("connector", f"unknown connector {connector!r} (installed: {known})")
        if found.action(action) is None:
            return ("action", f"connector {connector!r} has no action {action!r} (has: {', '.join(a.name for a in found.actions)})")
        return None

    def config_problems(self, connector: str, action: str, config: dict[str, Any]) -> list[tuple[str, str]]:
        found = self.get(connector)
        act = found.action(action) if found else None
        return schema_problems(act.config_schema, config, "config") if act else []

    validate_config = config_problems

    def needs_credentials(self, connector: str) -> bool:
        found = self.get(connector)
        return bool(found and found.credential_schema and found.credential_schema.get("required"))

    def validate_credentials(self, connector: str, secrets: dict[str, Any]) -> list[tuple[str, str]]:
        found = self.get(connector)
        if found is None:
            return [("connector", f"unknown connector {connector!r}")]
        if found.credential_schema is None:
            return [("connector", f"connector {connector!r} takes no credentials")]
        problems = schema_problems(found.credential_schema, secrets, "secrets")
        for key, value in secrets.items():
            if isinstance(value, str) and key.endswith("url") and not any(p[0] == f"secrets.{key}" for p in problems):
                try:
                    check_url(value, found.allowed_hosts, self.allow_insecure)
                except PermanentError as exc:
                    problems.append((f"secrets.{key}", str(exc)))
        return problems

    def secret_fields(self, connector: str, action: str) -> tuple[str, ...]:
        found = self.get(connector)
        act = found.action(action) if found else None
        return act.secret_fields if act else ()

    # -- invoking ----------------------------------------------------------------------
    def http_client(self, connector: Connector) -> httpx.AsyncClient:
        client = self._clients.get(connector.name)
        if client is None:
            client = self._clients[connector.name] = make_http_client(connector.timeout, self.allow_insecure, allowed_hosts=connector.allowed_hosts)
        return client

    def context(self, connector: str, config: dict[str, Any], credentials: dict[str, Any], timeout: float | None = None, secret_fields: Iterable[str] = (), **fields: Any) -> ExecutionContext:
        """`secret_fields`: the action's config fields whose values are masked, with the
        credentials', in what the action logs and in the errors it raises."""
        found = self.get(connector)
        if found is None:
            raise PermanentError(f"connector {connector!r} is not installed")
        secret_config = {k: config[k] for k in secret_fields if isinstance(config, dict) and k in config}
        masker = SecretMasker([*_leaves(credentials), *_leaves(secret_config)])
        logger = MaskingAdapter(logging.getLogger(f"ipaas.connector.{connector}"), masker, {k: v for k, v in fields.items() if v})
        return ExecutionContext(
            config=config,
            credentials=credentials,
            http=self.http_client(found),
            logger=logger,
            timeout=timeout or found.timeout,
            **fields,
        )

    async def invoke(self, connector: str, action: str, ctx: ExecutionContext) -> ActionResult:
        """Run an action; the call is abandoned at ctx.timeout. Errors come out classified:
        RetryableError or PermanentError, with masked messages."""
        found = self.get(connector)
        act = found.action(action) if found else None
        if act is None:
            raise PermanentError(f"{connector}.{action} is not installed")
        # The context's logger already holds a masker for these credentials.
        masker = ctx.logger.masker if isinstance(ctx.logger, MaskingAdapter) else SecretMasker(_leaves(ctx.credentials))
        started = time.perf_counter()
        task = asyncio.current_task()
        RUNNING_ACTIONS[task] = {"connector": connector, "action": action, "tenant_id": ctx.tenant_id, "execution_id": ctx.execution_id, "step_id": ctx.step_id}
        answers = _CallAnswers()
        watching = _CALL_ANSWERS.set(answers)
        try:
            async with asyncio.timeout(ctx.timeout):
                result = await act.run(ctx)
        except TimeoutError:
            # A call whose latest answer was a 429 (a request still in flight at the
            # timeout is cut and counts as no answer) timed out waiting out the rate limit
            # itself, as client libraries do: the upstream answered, so not a failure.
            limited, wait = _limited_answer(answers.last)
            if limited:
                raise RateLimited(f"{connector}.{action} timed out after {ctx.timeout:g}s, waiting out a rate limit (429)", wait) from None
            raise RetryableError(f"{connector}.{action} timed out after {ctx.timeout:g}s") from None
        except RetryableError as exc:
            # A rate limit stays one, or becomes one (see _rate_limit): the engine keeps it
            # out of the connector's breaker.
            limited, wait = _rate_limit(exc, answers.last)
            kind = RateLimited if limited else RetryableError
            raise kind(masker.text(str(exc)), exc.retry_after if exc.retry_after is not None else wait) from None
        except httpx.HTTPStatusError as exc:
            # httpx's response.raise_for_status(), let through: a 429 is the upstream's
            # answer, not a plugin bug to fail for good. Only the host is named: a webhook
            # URL's path is its secret.
            if exc.response.status_code != 429:
                raise _crashed(connector, action, exc, masker) from None
            raise RateLimited(f"{connector}.{action}: {exc.request.method} {exc.request.url.host} answered 429", _answer_retry_after(exc.response)) from None
        except PermanentError as exc:
            raise PermanentError(masker.text(str(exc))) from None
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise RetryableError(f"{connector}.{action}: {type(exc).__name__}: {masker.text(str(exc))}") from None
        except ConnectorError as exc:
            raise PermanentError(masker.text(str(exc))) from None
        except asyncio.CancelledError:
            raise
        except PLUGIN_FAILURES as exc:
            raise _crashed(connector, action, exc, masker) from None
        finally:
            _CALL_ANSWERS.reset(watching)
            RUNNING_ACTIONS.pop(task, None)
        if not isinstance(result, ActionResult):
            raise PermanentError(f"{connector}.{action} returned {type(result).__name__}, not an ActionResult")
        duration = int((time.perf_counter() - started) * 1000)
        message, output = _checked(f"{connector}.{action}", result)
        _check_output(f"{connector}.{action}", output)
        return ActionResult(message=message, output=output, status=result.status, duration_ms=duration)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def _crashed(connector: str, action: str, exc: BaseException, masker: SecretMasker) -> PermanentError:
    # A plugin bug: retrying will not fix it, and it must not crash the engine.
    log.warning("plugin.crashed", extra={"connector": connector, "action": action, "error": masker.text(repr(exc))})
    return PermanentError(f"{connector}.{action} failed: {type(exc).__name__}: {masker.text(str(exc))}")


def _checked(name: str, result: ActionResult) -> tuple[str, dict[str, Any]]:
    """The result's message and output, if their types are what the step's row stores. A
    dataclass does not check its fields: `output="posted"` made dict() raise here, outside
    the handlers above, and the execution stayed running until its lease ended and the
    action ran again."""
    output, message = result.output, result.message
    if output is not None and not isinstance(output, Mapping):
        raise PermanentError(f"{name} returned an output of type {type(output).__name__}, not a dict")
    if message is not None and not isinstance(message, str):
        raise PermanentError(f"{name} returned a message of type {type(message).__name__}, not a str")
    return message or "", dict(output or {})


def _check_output(name: str, output: dict[str, Any]) -> None:
    """An output that cannot be stored fails its step for good. Left to the database, it
    would fail every write of the outcome, and the execution would be claimed again at each
    lease's end, forever."""
    try:
        size = len(orjson.dumps(output))  # as the database stores it
    except TypeError as exc:
        raise PermanentError(f"{name} returned an output that is not JSON: {exc}") from None
    if size > MAX_OUTPUT_BYTES:
        raise PermanentError(f"{name} returned {size} bytes of output; the limit is {MAX_OUTPUT_BYTES}")
    # An upstream's JSON passed on as output could nest deeper than a reply carries
    # (ipaas.wire): stored, it made its execution unreadable.
    if nested_deeper_than(output, MAX_JSON_DEPTH):
        raise PermanentError(f"{name} returned an output nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)")


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [str(value)] if value not in (None, "") and not isinstance(value, bool) else []


class NoCookies(CookieJar):
    """A connector's client serves every tenant: a cookie set by one tenant's upstream must
    never ride along on another tenant's request, so none is kept."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: Any) -> None:
        return None


class _NeverKept(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        # httpx builds urllib request/response adapters for the jar on every response
        # (~20 us, measured), only for NoCookies to drop the result.
        return None


class _CallAnswers:
    """What the latest request one action call sent through its connector client came to:
    the response (read or not), or None when it got none (a connection error, a timeout)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: httpx.Response | None = None


# The _CallAnswers of the action call running in this task (set by ConnectorRegistry.invoke;
# a task the action starts inherits it). The client is shared by every call of a connector,
# so what one call received can only be told apart through the call's context.
_CALL_ANSWERS: contextvars.ContextVar[_CallAnswers | None] = contextvars.ContextVar("ipaas_call_answers", default=None)


def _rate_limit(exc: BaseException, last: httpx.Response | None) -> tuple[bool, float | None]:
    """Whether a call that failed with `exc` was rate limited, and the wait the upstream
    asked for. A plugin need not say so with RateLimited: a plain RetryableError for a 429
    was a breaker failure, and five of them, from one busy target, blocked every target of
    the tenant's connector.

    The error's own cause chain decides when it names an HTTP outcome (RateLimited, httpx's
    HTTPStatusError, or a request that got no answer); otherwise the latest answer the call
    received does. Not any 429 the call received: a 429 followed by a 500, or by a
    connection error, failed on the second, which says the upstream is unwell."""
    cause: BaseException | None = exc
    for _ in range(32):  # a chain is short; this bounds a cyclic one
        if cause is None:
            break
        if isinstance(cause, RateLimited):
            return True, cause.retry_after
        if isinstance(cause, httpx.HTTPStatusError):
            limited = cause.response.status_code == 429
            return limited, _answer_retry_after(cause.response) if limited else None
        if isinstance(cause, httpx.HTTPError):
            return False, None
        cause = cause.__cause__
    return _limited_answer(last)


def _limited_answer(last: httpx.Response | None) -> tuple[bool, float | None]:
    if last is not None and last.status_code == 429:
        return True, _answer_retry_after(last)
    return False, None


def _answer_retry_after(response: httpx.Response) -> float | None:
    try:
        return _retry_after(response)  # the header, or a JSON body's retry_after
    except httpx.ResponseNotRead:  # streamed, and not read (or not to the end)
        return parse_retry_after(response.headers.get("retry-after"))


class ConnectorClient(httpx.AsyncClient):
    """httpx's AsyncClient, as connectors see it, with cookies never kept (see NoCookies),
    the URLs it is given parsed once (see _merge_url) and read responses freed at once (see
    send)."""

    MAX_PARSED_URLS = 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._never_kept = _NeverKept(NoCookies())
        self._parsed: dict[str, httpx.URL] = {}

    def _merge_url(self, url: httpx.URL | str) -> httpx.URL:
        # A connector posts to the same few URLs (a credential's webhook URL) again and
        # again; httpx parses the string on every request (~2.5 % of an engine's CPU, py-spy).
        # httpx.URL is immutable, so a parsed one can be shared.
        if not isinstance(url, str):
            return super()._merge_url(url)
        parsed = self._parsed.get(url)
        if parsed is None:
            parsed = super()._merge_url(url)
            if len(self._parsed) >= self.MAX_PARSED_URLS:
                self._parsed.clear()
            self._parsed[url] = parsed
        return parsed

    async def send(self, request: httpx.Request, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        answers = _CALL_ANSWERS.get()
        try:
            response = await super().send(request, stream=True, **kwargs)
        except BaseException:
            if answers is not None:
                answers.last = None
            raise
        if answers is not None:
            answers.last = response
        if stream:
            return response
        try:
            body = await _read_at_most(response, MAX_RESPONSE_BYTES)
        finally:
            await response.aclose()
        # What httpx's own aread() keeps; reading through it could not stop at the limit.
        response._content = body
        # httpx binds a response's stream to the response (a reference cycle), so every
        # response, with its request, headers and aiohttp's response, waited for the garbage
        # collector: ~40 objects a request, and most of an engine's collections. Read and
        # closed, it needs no stream; a plain one over the body breaks the cycle.
        response.stream = httpx.ByteStream(body)
        return response

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return self._never_kept

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        return None


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, or PermanentError once it passes `limit` (the host alone is named:
    a webhook URL's path is its secret)."""
    declared = response.headers.get("content-length", "")
    # A declared length is the decoded one only when the body is not encoded.
    too_large = declared.isdigit() and int(declared) > limit and "content-encoding" not in response.headers
    chunks, size = [], 0
    if not too_large:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                too_large = True
                break
            chunks.append(chunk)
    if too_large:
        raise PermanentError(f"{response.request.method} {response.request.url.host}: the response holds more than {limit} bytes")
    return b"".join(chunks)


def make_http_client(timeout: float, allow_insecure: bool, max_connections: int = 200, allowed_hosts: Iterable[str] = ()) -> httpx.AsyncClient:
    """The client connectors get: strict timeouts on connect, read, write and pool waits,
    the SSRF guard on every request (public addresses, https, the connector's allowed_hosts
    when it declares any), no redirects (a redirect could leave the allowed hosts).

    Authors always see httpx's API. Underneath, aiohttp's pool (httpx-aiohttp) replaces
    httpcore's, which costs more CPU under concurrency (encode/httpx#3215): the bench measured
    1.26-1.31x the end-to-end deliveries. IPAAS_HTTP_TRANSPORT=httpx selects httpx's own.
    """
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    inner: httpx.AsyncBaseTransport
    # Checked at start-up too (EngineSettings); anything but "httpx" used to select httpx,
    # an empty value and a typo included, and its DNS-rebinding window with it.
    aiohttp_pool = choice(os.environ, "IPAAS_HTTP_TRANSPORT", HTTP_TRANSPORTS, "aiohttp") == "aiohttp"
    if aiohttp_pool:
        inner = aiohttp_transport(limits, guard_dns=not allow_insecure)
    else:
        inner = httpx.AsyncHTTPTransport(limits=limits)
    return ConnectorClient(
        transport=GuardedTransport(inner, allow_insecure, resolver_guarded=aiohttp_pool, allowed_hosts=allowed_hosts),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"user-agent": "simple-ipaas"},
    )


class _AiohttpTransport(AiohttpTransport):
    """httpx-aiohttp's transport with its errors named as httpx's own transport names them.

    httpx-aiohttp 0.2 reports every aiohttp connection failure (a refused port, an unknown
    host) as ConnectTimeout, which sends a step's reader looking for a slow network, and
    lets aiohttp's ClientResponseError for a malformed answer (a bad status or header line
    from a flaky proxy) through unmapped, which the host took for a plugin's crash and
    failed for good. httpx's own transport calls them ConnectError and RemoteProtocolError,
    both retried."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            if isinstance(exc.__cause__, aiohttp.ClientConnectorError):
                raise httpx.ConnectError(str(exc), request=request) from exc.__cause__
            raise
        except aiohttp.ClientResponseError as exc:  # no HTTP status raises it here
            raise httpx.RemoteProtocolError(f"malformed answer: {exc.message}", request=request) from exc


def aiohttp_transport(limits: httpx.Limits, guard_dns: bool) -> httpx.AsyncBaseTransport:
    """httpx-aiohttp's transport over a pool whose resolver is the SSRF guard (see netguard)."""
    transport = _AiohttpTransport(limits=limits)

    def session() -> aiohttp.ClientSession:
        # Built on first use, inside the event loop, as httpx-aiohttp builds its own.
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=transport.ssl_context,
            resolver=GuardedResolver() if guard_dns else None,
        )
        # aiohttp's session has its own cookie jar under httpx's: it would keep a cookie one
        # tenant's upstream set and send it with another tenant's request (see NoCookies).
        # The dummy jar also spares every request the jar's filtering.
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    transport.client = session
    return transport


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("ipaas")
    pm.add_hookspecs(hookspecs)
    return pm


def _distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: ipaas_Slack is ipaas-slack


@dataclass(frozen=True)
class AllowList:
    """IPAAS_PLUGINS: connector names, each optionally pinned to the distribution it must
    come from (`slack=ipaas-slack`). It applies to the entry points loaded (by name, so a
    plugin left out is never imported) and to the connectors they register: an allowed entry
    point cannot bring in a connector the list leaves out, nor, when pinned, a listed one."""

    names: frozenset[str]
    pins: Mapping[str, str]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        names, pins = set(), {}
        for entry in entries:
            name, _, distribution = (part.strip() for part in entry.partition("="))
            names.add(name)
            if distribution:
                pins[name] = distribution
        return cls(frozenset(names), pins)

    def refusal(self, name: str, distribution: str) -> str | None:
        if name not in self.names:
            return f"registered connector {name!r}, which IPAAS_PLUGINS does not allow"
        pin = self.pins.get(name)
        if pin is not None and _distribution_key(pin) != _distribution_key(distribution):
            return f"not loaded: IPAAS_PLUGINS pins {name!r} to the distribution {pin}"
        return None


def load_registry(settings: Any = None, *, allow: Iterable[str] | None = None, load_entrypoints: bool = True, plugins: Iterable[tuple[str, object]] = (), allow_insecure: bool | None = None) -> ConnectorRegistry:
    """Load plugins from the entry-point group (restricted by the allow-list, see AllowList)
    plus any `plugins` given as (distribution, module-or-object) pairs (tests register
    throwaway plugins that way). Never raises for a broken plugin.

    A connector name offered by more than one plugin is loaded from none of them: whichever
    came first would otherwise depend on the order entry points are listed in, and the one
    that won would receive every tenant's credentials for that connector."""
    if settings is not None:
        allow = settings.plugins if allow is None else allow
        allow_insecure = settings.allow_insecure_targets if allow_insecure is None else allow_insecure
    allowed = None if allow is None else AllowList.parse(allow)
    registry = ConnectorRegistry(allow_insecure=bool(allow_insecure))
    pm = _plugin_manager()
    candidates: list[tuple[str, str, object]] = []  # (source, distribution, plugin)
    found: set[str] = set()  # entry-point and connector names, for the allow-list's check
    if load_entrypoints:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.dist.name if ep.dist else "")):
            found.add(ep.name)
            distribution = ep.dist.name if ep.dist else ep.name
            source = f"{distribution}:{ep.name}"
            if allowed is not None:
                if ep.name not in allowed.names:
                    continue
                if refusal := allowed.refusal(ep.name, distribution):
                    registry.problem(source, refusal)
                    continue
            try:
                candidates.append((source, distribution, ep.load()))
            except PLUGIN_FAILURES as exc:  # any import-time failure of a third-party plugin
                registry.problem(source, f"import failed: {type(exc).__name__}: {exc}")
    candidates += [(distribution, distribution, plugin) for distribution, plugin in plugins]
    offers: dict[str, list[tuple[Connector, str, str]]] = {}

    def offer(connector: Any, source: str, distribution: str) -> None:
        found.add(getattr(connector, "name", None))
        if problems := declaration_problems(connector):
            registry.problem(source, "; ".join(problems))
        elif allowed is not None and (refusal := allowed.refusal(connector.name, distribution)):
            registry.problem(source, refusal)
        else:
            offers.setdefault(connector.name, []).append((connector, distribution, source))

    for source, distribution, plugin in candidates:
        try:
            pm.register(plugin, name=f"{source}:{id(plugin)}")
        except Exception as exc:
            registry.problem(source, f"not a valid plugin: {exc}")
            continue
        try:
            # A misspelled hook marked @hookimpl is only caught here; registered alone it
            # would be ignored. Unregistered, it does not fail the next plugin's check.
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(plugin)
            registry.problem(source, f"not a valid plugin: {exc}")
            continue
        registered = 0

        def register(connector: Any, source: str = source, distribution: str = distribution) -> None:
            nonlocal registered
            registered += 1
            offer(connector, source, distribution)

        for impl in pm.hook.ipaas_register_connectors.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                returned = impl.function(register=register)
            except PLUGIN_FAILURES as exc:
                registry.problem(source, f"ipaas_register_connectors failed: {type(exc).__name__}: {exc}")
                break
            if returned is not None:
                # pluggy collects return values, and the host has no use for them: a hook
                # returning its connectors would otherwise load nothing, silently.
                registry.problem(source, f"ipaas_register_connectors returned a {type(returned).__name__} instead of calling register(connector) for each connector")
                break
        else:
            if not registered:
                registry.problem(source, "registered no connectors: is its hook decorated with @hookimpl and does it call register(...)?")
    for name, offered in sorted(offers.items()):
        if len(offered) == 1:
            connector, distribution, source = offered[0]
            registry.add(connector, distribution, source)
            continue
        sources = sorted({source for _, _, source in offered})
        for source in sources:
            provided = f"by {' and '.join(sources)}" if len(sources) > 1 else f"more than once by {source}"
            registry.problem(source, f"connector name {name!r} is provided {provided}; none of them is loaded (uninstall one, or pin it in IPAAS_PLUGINS as {name}=<distribution>)")
    for name in sorted(allowed.names - found if allowed is not None else ()):
        # A typo (slak) would otherwise leave the connector out with no word why.
        registry.problem("IPAAS_PLUGINS", f"{name!r} matches no installed plugin (no entry point or connector of that name)", "plugins.allow_list_unmatched", logging.WARNING)
    if registry.allow_insecure:
        log.warning("plugins.insecure_targets", extra={"detail": "IPAAS_ALLOW_INSECURE_TARGETS is on: connectors may reach http and private addresses"})
    log.info("plugins.loaded", extra={"connectors": sorted(registry.connectors), "problems": len(registry.problems)})
    return registry
