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
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ipaas import templates
from ipaas.credentials import CredentialStore
from ipaas.errors import NotFound
from ipaas.masking import REDACTED, mask_value
from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import ActionResult, PermanentError, RetryableError

T = TypeVar("T")
# A guess at how long a heavy render takes, for lining up a tenant's deferred renders until
# this process has timed one of that tenant's: about what MAX_TEMPLATE_WORK costs (0.2 to
# 0.9 s).
FIRST_HEAVY_SECONDS = 0.5
# A heavy render that cannot start at once waits in process for its turn when that turn is
# expected within SHORT_WAIT (a few moderate renders of its tenant ahead of it), but never
# longer than LONGEST_WAIT: past it, it gives its place back and is deferred after all.
SHORT_WAIT = 0.15
LONGEST_WAIT = 0.3
# Renders of one tenant that may wait in process at once (each holds a worker slot).
MOST_WAITING = 8
_TENANTS_TIMED = 1024  # tenants whose render time is kept (the least recently timed go)


class CredentialUnreadable(RetryableError):
    """This process cannot decrypt the step's credential: retried, and not held against the
    connector's circuit breaker, since the upstream was never called."""


class RendersBusy(Exception):
    """A heavy render was not started: its tenant's turn (or a render thread) is not
    expected soon enough to wait for it in process. `wait` is when to ask again."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"heavy template renders busy, again in {wait:.1f} s")
        self.wait = wait


# How often the GIL changes hands while a heavy render runs in a thread, instead of
# CPython's 5 ms: the event loop waits up to that long for the GIL each time it wakes, and a
# delivery wakes it dozens of times. bench/heavy_renders.py, another tenant's median
# latency while one tenant renders near the work budget at 5 a second (alone: 69 ms):
# 0.80 s at 5 ms, 0.31 s at 1 ms, 0.19 s at 0.2 ms. Only while a render runs: each
# hand-over costs a few µs.
RENDER_SWITCH_INTERVAL = 0.0002


class _SwitchOften:
    """sys.setswitchinterval(RENDER_SWITCH_INTERVAL) while any render thread is rendering,
    the process's own interval again once none is (it is process-wide)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rendering = 0
        self._saved = 0.0

    def __enter__(self) -> None:
        with self._lock:
            if self._rendering == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, RENDER_SWITCH_INTERVAL))
            self._rendering += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._rendering -= 1
            if self._rendering == 0:
                sys.setswitchinterval(self._saved)


_SWITCH_OFTEN = _SwitchOften()


class RenderThreads:
    """A few threads for renders too heavy for the event loop. A pool of its own, so renders
    cannot take the default executor's threads (DNS lookups), and small: each busy thread
    takes a share of the GIL from the loop.

    run(..., tenant=...) also bounds what one tenant can hold: one heavy render under way
    per tenant, `threads + queued` in all. A render that cannot start at once waits in
    process for its turn (its tenant's renders, then the other tenants' in turn for a free
    thread) when that turn is expected within `short_wait`: the renders ahead of it times
    what its tenant's renders took here lately (not timed yet: no wait is assumed), and at
    most `most_waiting` of a tenant's renders wait so. A wait longer than expected ends at
    `longest_wait`. Otherwise it raises RendersBusy with a wait that lines the tenant's
    refused renders up one render's time apart (each engine for itself): the executor
    defers the execution until then instead of holding a worker slot, and a backlog comes
    back about once each, not every second. So a tenant's moderate renders (a few ms each)
    queue for a few ms, while one whose renders take most of the work budget holds at most
    `most_waiting` worker slots `longest_wait` once, before its first render is timed."""

    def __init__(
        self,
        name: str,
        threads: int = 2,
        queued: int = 2,
        short_wait: float = SHORT_WAIT,
        longest_wait: float = LONGEST_WAIT,
        most_waiting: int = MOST_WAITING,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._threads = threads
        self._most = threads + queued
        self._short_wait = short_wait
        self._longest_wait = longest_wait
        self._most_waiting = most_waiting
        self._under_way = 0  # renders given to the pool (or granted a turn and about to be)
        self._tenants: dict[str, float] = {}  # tenants with a heavy render under way: since when
        # Renders waiting in process for their turn, per tenant in order; the tenants in
        # the order they are served a free thread (round-robin).
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._turns: dict[str, float] = {}  # the latest wait handed to each refused tenant
        self._timed: dict[str, float] = {}  # what each tenant's heavy renders take here, lately
        self._seconds: float | None = None  # what a heavy render takes here, lately (any tenant)
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, tenant: str | None = None) -> T:
        """fn(*args) in a thread. Without a tenant (a dry run, whose caller waits for its
        answer) it queues behind the others, unbounded."""
        if self._closed:
            raise RendersBusy(1.0)  # stopping: the execution goes back to the queue
        if tenant is None:
            self._under_way += 1
        elif not self._admit(tenant):
            await self._wait_turn(tenant)
        return await self._start(fn, args, tenant)

    async def _start(self, fn: Callable[..., T], args: tuple[Any, ...], tenant: str | None) -> T:
        """Hand fn to the pool; the caller holds a place (counted in _under_way)."""
        if self._closed:  # closed while it waited for its turn
            self._release(tenant, None)
            raise RendersBusy(1.0)
        loop = asyncio.get_running_loop()
        spent: list[float] = []

        def timed() -> T:  # the render's own time, not its time in the pool's queue
            began = time.monotonic()
            try:
                with _SWITCH_OFTEN:
                    return fn(*args)
            finally:
                spent.append(time.monotonic() - began)

        future = self._pool.submit(timed)
        # Released when the thread is done, not when the caller stops waiting: a cancelled
        # execution's render still runs to the end of its budget.
        future.add_done_callback(lambda _: _call_soon(loop, self._release, tenant, spent[0] if spent else None))
        return await asyncio.wrap_future(future)

    def _admit(self, tenant: str) -> bool:
        """True: the render may start now. False: it waits for its turn. Else RendersBusy."""
        if tenant not in self._tenants and tenant not in self._waiting and self._under_way < self._most:
            self._take(tenant)
            return True
        if len(self._waiting.get(tenant, ())) >= self._most_waiting or self._expected_wait(tenant) > self._short_wait:
            raise RendersBusy(self._next_turn(tenant))
        return False

    def _expected_wait(self, tenant: str) -> float:
        """Until a render of `tenant` asked for now would start: its tenant's renders ahead
        of it, and the thread it needs. A time not measured yet counts as none."""
        seconds = self._timed.get(tenant, 0.0)
        own = len(self._waiting.get(tenant, ())) * seconds
        if (since := self._tenants.get(tenant)) is not None:  # what is left of the one under way
            own += max(0.0, seconds - (time.monotonic() - since))
        # A thread frees about every render's time / threads; waiting renders go first.
        releases = self._under_way + sum(len(q) for q in self._waiting.values()) - self._most + 1
        pool = max(0, releases) * (self._seconds or 0.0) / self._threads
        return max(own, pool)

    async def _wait_turn(self, tenant: str) -> None:
        """Until _wake grants `tenant`'s next turn to this render. Cancelled, or out of
        time, it gives its place (or the turn just granted) back."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(turn)
        try:
            async with asyncio.timeout(self._longest_wait):
                await turn
        except TimeoutError:
            if not _granted(turn):
                self._leave(tenant, turn)
                raise RendersBusy(self._next_turn(tenant)) from None
            # Its turn came as the wait ran out: it goes on.
        except BaseException:
            if _granted(turn):
                self._release(tenant, None)
            else:
                self._leave(tenant, turn)
            raise

    def _leave(self, tenant: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is not None:
            with contextlib.suppress(ValueError):  # _wake already dropped it
                queue.remove(turn)
            if not queue:
                del self._waiting[tenant]

    def _take(self, tenant: str) -> None:
        self._under_way += 1
        self._tenants[tenant] = time.monotonic()

    def _wake(self) -> None:
        """Grant turns: each waiting tenant with no render under way its next render, in
        turn, while a place in the pool is free."""
        for tenant in list(self._waiting):
            if self._under_way >= self._most:
                return
            if tenant in self._tenants:
                continue
            queue = self._waiting.pop(tenant)
            while queue and queue[0].done():  # cancelled, its waiter not yet resumed
                queue.popleft()
            if queue:
                queue.popleft().set_result(None)
                self._take(tenant)
            if queue:
                self._waiting[tenant] = queue  # last in turn for the next free thread

    def _next_turn(self, tenant: str) -> float:
        now = time.monotonic()
        if len(self._turns) > 1024:  # turns gone by are forgotten
            self._turns = {t: at for t, at in self._turns.items() if at > now}
        seconds = max(self._timed.get(tenant, FIRST_HEAVY_SECONDS), 0.05)
        # After the render under way and those waiting in process.
        turn = max(self._turns.get(tenant, now), now + len(self._waiting.get(tenant, ())) * seconds) + seconds
        self._turns[tenant] = turn
        return turn - now

    def _release(self, tenant: str | None, spent: float | None) -> None:
        self._under_way -= 1
        if tenant is not None:
            self._tenants.pop(tenant, None)
        if spent is not None:  # rendered (or failed), not cancelled in the pool's queue
            self._seconds = spent if self._seconds is None else 0.8 * self._seconds + 0.2 * spent
            if tenant is not None:
                last = self._timed.pop(tenant, None)
                # Half the last time, half the new: a tenant whose renders got cheaper
                # stops being deferred after a few.
                self._timed[tenant] = spent if last is None else (last + spent) / 2
                if len(self._timed) > _TENANTS_TIMED:
                    del self._timed[next(iter(self._timed))]
        self._wake()

    def close(self) -> None:
        """Stop the threads when the process stops: renders still queued are dropped, and
        one under way is not waited for (it ends within the work budget, about a second).
        A render waiting for its turn is refused as busy when it comes."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def _granted(turn: asyncio.Future[None]) -> bool:
    return turn.done() and not turn.cancelled() and turn.exception() is None


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
