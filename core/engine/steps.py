"""Running one step: render and validate its config, decrypt the credential, invoke the
connector. Shared by the executor and by dry runs.

Rendering happens on the event loop while it is cheap, which is nearly always (a few µs).
A render past templates.INLINE_TEMPLATE_WORK (a few ms) starts again with the whole work
budget in a RenderThreads thread, so the loop keeps serving every other tenant meanwhile:
the GIL's switch interval hands it back every few milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ipaas import templates
from ipaas.credentials import CredentialStore
from ipaas.errors import NotFound
from ipaas.masking import REDACTED, mask_value
from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import ActionResult, PermanentError, RetryableError

T = TypeVar("T")
# A guess at how long a heavy render takes, until this process has timed one: about what
# MAX_TEMPLATE_WORK costs (0.2 to 0.9 s).
FIRST_HEAVY_SECONDS = 0.5


class CredentialUnreadable(RetryableError):
    """This process cannot decrypt the step's credential: retried, and not held against the
    connector's circuit breaker, since the upstream was never called."""


class RendersBusy(Exception):
    """A heavy render was not started: its tenant has one under way in this process, or all
    the render threads and their queue are taken. `wait` is when to ask again."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"heavy template renders busy, again in {wait:.1f} s")
        self.wait = wait


class RenderThreads:
    """A few threads for renders too heavy for the event loop. A pool of its own, so renders
    cannot take the default executor's threads (DNS lookups), and small: each busy thread
    takes a share of the GIL from the loop.

    run(..., tenant=...) also bounds what one tenant can hold: one heavy render under way
    per tenant, `threads + queued` in all. Beyond that it raises RendersBusy at once, with
    a wait that lines the tenant's refused renders up one render's time apart (each engine
    for itself): the executor defers the execution until then instead of holding a worker
    slot, and a backlog comes back about once each, not every second."""

    def __init__(self, name: str, threads: int = 2, queued: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._most = threads + queued
        self._under_way = 0
        self._tenants: set[str] = set()  # tenants with a heavy render under way
        self._turns: dict[str, float] = {}  # the latest wait handed to each refused tenant
        self._seconds = FIRST_HEAVY_SECONDS  # what a heavy render takes here, lately
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, tenant: str | None = None) -> T:
        """fn(*args) in a thread. Without a tenant (a dry run, whose caller waits for its
        answer) it queues behind the others, unbounded."""
        if self._closed:
            raise RendersBusy(1.0)  # stopping: the execution goes back to the queue
        if tenant is not None:
            self._admit(tenant)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        future = self._pool.submit(fn, *args)
        self._under_way += 1
        # Released when the thread is done, not when the caller stops waiting: a cancelled
        # execution's render still runs to the end of its budget.
        future.add_done_callback(lambda _: _call_soon(loop, self._release, tenant, started))
        return await asyncio.wrap_future(future)

    def _admit(self, tenant: str) -> None:
        if tenant in self._tenants or self._under_way >= self._most:
            raise RendersBusy(self._next_turn(tenant))
        self._tenants.add(tenant)

    def _next_turn(self, tenant: str) -> float:
        now = time.monotonic()
        if len(self._turns) > 1024:  # turns gone by are forgotten
            self._turns = {t: at for t, at in self._turns.items() if at > now}
        turn = max(self._turns.get(tenant, now), now) + self._seconds
        self._turns[tenant] = turn
        return turn - now

    def _release(self, tenant: str | None, started: float) -> None:
        self._under_way -= 1
        if tenant is not None:
            self._tenants.discard(tenant)
        self._seconds = max(0.8 * self._seconds + 0.2 * (time.monotonic() - started), 0.05)

    def close(self) -> None:
        """Stop the threads when the process stops: renders still queued are dropped, and
        one under way is not waited for (it ends within the work budget, about a second)."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to count
        loop.call_soon_threadsafe(fn, *args)


class StepRunner:
    def __init__(self, registry: ConnectorRegistry, credentials: CredentialStore) -> None:
        self.registry = registry
        self.credentials = credentials

    async def render_fairly(self, step: dict[str, Any], ctx: templates.RenderContext, threads: RenderThreads, tenant: str | None = None) -> templates.RenderResult:
        """render(), on the loop while it stays within INLINE_TEMPLATE_WORK, else again in
        full in one of `threads` (see the module's docstring). Raises TemplateError as
        render() does, and RendersBusy for a tenant's render not started."""
        try:
            return self.render(step, ctx, templates.INLINE_TEMPLATE_WORK)
        except templates.RenderTooHeavy:
            pass  # out of the except clause: the thread need not keep this traceback
        return await threads.run(self.render, step, ctx, tenant=tenant)

    def render(self, step: dict[str, Any], ctx: templates.RenderContext, work: int | None = None) -> templates.RenderResult:
        """The step's config rendered: a field that is one template keeps the value's type,
        turned into text where the action's schema asks for a string (as `{{order.id}}` in
        a message's text). Raises TemplateError, and RenderTooHeavy past `work` when given."""
        rendered = templates.render_config(step.get("config") or {}, ctx, work)
        found = self.registry.get(step["connector"])
        action = found.action(step["action"]) if found else None
        schema = action.config_schema if action else None
        return templates.RenderResult(_text_where_declared(rendered.value, schema), rendered.missing_paths)

    def masked_config(self, step: dict[str, Any], config: Any) -> Any:
        """The config as it may be shown or stored: secret fields and secret shapes masked."""
        secret = set(self.registry.secret_fields(step["connector"], step["action"]))
        if isinstance(config, dict) and secret:
            config = {k: (REDACTED if k in secret else v) for k, v in config.items()}
        return mask_value(config)

    def config_problems(self, step: dict[str, Any], config: Any) -> list[tuple[str, str]]:
        if (problem := self.registry.action_problem(step["connector"], step["action"])) is not None:
            return [problem]
        return self.registry.config_problems(step["connector"], step["action"], config)

    async def invoke(self, tenant_id: str, execution_id: str, step: dict[str, Any], config: Any, timeout: float, dry_run: bool) -> ActionResult:
        problems = self.config_problems(step, config)
        if problems:
            raise PermanentError("invalid config after rendering: " + "; ".join(f"{f}: {d}" for f, d in problems))
        secrets: dict[str, Any] = {}
        if step.get("credential_id"):
            try:
                secrets = await self.credentials.secrets(tenant_id, step["credential_id"])
            except NotFound:
                raise PermanentError(f"credential {step['credential_id']} no longer exists") from None
            except ValueError as exc:
                # The key that encrypted it is not configured in this process: a replica
                # left behind by a key rotation. Retried, another replica or this one once
                # updated can run it; failed for good, it would need replaying by hand.
                raise CredentialUnreadable(f"credential {step['credential_id']}: {exc} here (every replica needs the same IPAAS_SECRET_KEYS)") from None
        ctx = self.registry.context(
            step["connector"],
            config,
            secrets,
            timeout,
            secret_fields=self.registry.secret_fields(step["connector"], step["action"]),
            dry_run=dry_run,
            tenant_id=tenant_id,
            execution_id=execution_id,
            step_id=step["id"],
        )
        return await self.registry.invoke(step["connector"], step["action"], ctx)


def _text_where_declared(value: Any, schema: Any) -> Any:
    """value with what the schema declares a string written as text (templates.as_text)."""
    if not isinstance(schema, dict):
        return value
    if schema.get("type") == "string":
        return value if isinstance(value, str) else templates.as_text(value)
    if isinstance(value, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        extra = schema.get("additionalProperties")
        return {k: _text_where_declared(v, properties.get(k, extra)) for k, v in value.items()}
    if isinstance(value, list):
        return [_text_where_declared(v, schema.get("items")) for v in value]
    return value
