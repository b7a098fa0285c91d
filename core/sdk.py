"""The public plugin SDK: everything a connector author imports, from one module.

    from ipaas.sdk import Action, ActionResult, Connector, ExecutionContext, hookimpl, raise_for_status

    async def send(ctx: ExecutionContext) -> ActionResult:
        response = await ctx.http.post(ctx.credentials["webhook_url"], json={"text": ctx.config["text"]})
        raise_for_status(response)
        return ActionResult(message="sent")

    @hookimpl
    def ipaas_register_connectors(register):
        register(Connector(name="mychat", version="1.0.0", description="...", actions=[Action("send", "...", send, {...})]))

See docs/writing-a-connector.md.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx

from ipaas.hookspecs import hookimpl
from ipaas.masking import SecretMasker

__all__ = [
    "Action",
    "ActionResult",
    "Connector",
    "ConnectorError",
    "ExecutionContext",
    "PermanentError",
    "RateLimited",
    "RetryableError",
    "hookimpl",
    "raise_for_status",
]

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")  # \Z: $ also matches before a final newline
DEFAULT_TIMEOUT = 10.0


class ConnectorError(Exception):
    """Root of the errors a connector raises. Messages must not contain secrets."""


class RetryableError(ConnectorError):
    """A failure that may pass if tried again later: timeouts, connection errors, 5xx (for
    429 raise its subclass RateLimited). It counts against the connector's circuit breaker,
    unless the host sees it was a 429 (its cause, or else the call's latest answer through
    ctx.http: see docs/writing-a-connector.md).

    Args:
        message: what went wrong, without secrets.
        retry_after: seconds the upstream asked us to wait (Retry-After), if it said. The
            header's own text is read too (seconds or an HTTP-date); anything else is
            dropped.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = _retry_seconds(retry_after)


def _retry_seconds(value: Any) -> float | None:
    """A Retry-After as the retry policy takes it: a non-negative float, or None. Plugins
    pass what they have (the header's text, an int); a str once reached the policy's
    comparison and crashed the attempt outside every handler."""
    if isinstance(value, str):
        from ipaas.engine.retry import parse_retry_after

        return parse_retry_after(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value >= 0 else None  # NaN compares false too


class RateLimited(RetryableError):
    """The upstream is up but asks us to slow down (HTTP 429): retried no sooner than
    `retry_after`, and neither a success nor a failure for the connector's circuit breaker.
    A rate limit is often per target (one webhook, one channel): as a failure, five of them
    blocked every delivery of the tenant's connector, to every target, for a minute.

    Args:
        message: what went wrong, without secrets.
        retry_after: seconds the upstream asked us to wait, as for RetryableError.
    """


class PermanentError(ConnectorError):
    """A failure that will not pass by retrying: bad config, bad credentials, other 4xx."""


@dataclass(frozen=True)
class ActionResult:
    """What an action returns.

    Args:
        status: "succeeded" (an action that fails raises instead).
        message: one line for people, e.g. "message sent".
        output: data later steps read as `{{steps.<id>.<key>}}`.
        duration_ms: filled in by the host.
    """

    message: str = ""
    output: dict[str, Any] = field(default_factory=dict)
    status: str = "succeeded"
    duration_ms: int = 0


ActionFn = Callable[["ExecutionContext"], Awaitable[ActionResult]]


@dataclass(frozen=True)
class Action:
    """One action of a connector.

    Args:
        name: lower_snake_case, unique within the connector.
        description: one sentence.
        run: `async def run(ctx) -> ActionResult`.
        config_schema: JSON Schema (2020-12) of the action's config.
        secret_fields: config fields masked wherever the config is shown.
    """

    name: str
    description: str
    run: ActionFn
    config_schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    secret_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Connector:
    """A connector: a named set of actions sharing one kind of credential.

    Args:
        name: lower_snake_case, unique across installed plugins.
        version: the connector's version.
        description: what it connects to.
        actions: its actions.
        credential_schema: JSON Schema of the credential's secrets; None if it needs none.
        timeout: seconds each call may take (connect, read, write, pool); default 10.
        allowed_hosts: hosts its targets may use (SSRF guard), e.g. ("hooks.slack.com",).
    """

    name: str
    version: str
    description: str
    actions: tuple[Action, ...] | list[Action]
    credential_schema: dict[str, Any] | None = None
    timeout: float = DEFAULT_TIMEOUT
    allowed_hosts: tuple[str, ...] = ()

    def action(self, name: str) -> Action | None:
        return next((a for a in self.actions if a.name == name), None)


@dataclass
class ExecutionContext:
    """What an action gets.

    Args:
        config: the step's config, templates already rendered.
        credentials: the decrypted secrets of the step's credential ({} if none).
        http: a shared httpx.AsyncClient with strict timeouts and the SSRF guard.
        logger: a logger whose records have secrets (patterns and these credentials) masked.
        dry_run: True when run from a dry run in "test" mode.
        timeout: seconds this call may take in all.
    """

    config: dict[str, Any]
    credentials: dict[str, Any]
    http: httpx.AsyncClient
    logger: logging.LoggerAdapter
    dry_run: bool = False
    timeout: float = DEFAULT_TIMEOUT
    tenant_id: str = ""
    execution_id: str = ""
    step_id: str = ""


class MaskingAdapter(logging.LoggerAdapter):
    """Masks the message and extra fields, including exact credential values."""

    def __init__(self, logger: logging.Logger, masker: SecretMasker, extra: dict[str, Any] | None = None) -> None:
        super().__init__(logger, extra or {})
        self.masker = masker

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = {**self.extra, **kwargs.get("extra", {})}
        kwargs["extra"] = self.masker.value(extra)
        return self.masker.text(str(msg)), kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        if args:  # format first, so arguments are masked too
            msg, args = str(msg) % args, ()
        super().log(level, msg, *args, **kwargs)


def _retry_after(response: httpx.Response) -> float | None:
    from ipaas.engine.retry import parse_retry_after

    seconds = parse_retry_after(response.headers.get("retry-after"))
    if seconds is None and "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except ValueError:
            return None
        value = body.get("retry_after") if isinstance(body, dict) else None
        if isinstance(value, (int, float)) and value >= 0:
            seconds = float(value)
    return seconds


def _reason(response: httpx.Response) -> str:
    # Upstream bodies are short error codes ("invalid_payload", {"message": ...}); never the URL.
    text = response.text[:200].strip()
    try:
        body = response.json()
        if isinstance(body, dict):
            text = str(body.get("message") or body.get("error") or text)[:200]
    except ValueError:
        pass
    return text


def raise_for_status(response: httpx.Response, service: str = "upstream") -> None:
    """Classify an HTTP answer: 429 is RateLimited, 408 and 5xx RetryableError (both with
    Retry-After when given), other 4xx permanent, and so is a 3xx: connector clients follow no redirect (it could
    leave the allowed hosts), so nothing was delivered. The message names the status and
    the upstream's reason only, never where a redirect points."""
    status = response.status_code
    if status < 300:
        return
    if status < 400:
        raise PermanentError(f"{service} answered {status}, a redirect, which connectors do not follow: check the target's URL")
    reason = _reason(response)
    message = f"{service} answered {status}" + (f": {reason}" if reason else "")
    if status == 429:
        raise RateLimited(message, retry_after=_retry_after(response))
    if status == 408 or status >= 500:
        raise RetryableError(message, retry_after=_retry_after(response))
    raise PermanentError(message)
