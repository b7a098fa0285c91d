"""Runs one claimed execution: its steps in order, each result stored as it finishes, so a
retried execution resumes after its last succeeded step instead of repeating it."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ipaas import logs, templates
from ipaas.credentials import CredentialStore
from ipaas.engine import outbox
from ipaas.engine.breakers import BreakerRegistry, Trial, spread
from ipaas.engine.outcomes import Outcome, OutcomeWriter
from ipaas.engine.retry import RetryPolicy, next_delay
from ipaas.engine.steps import CredentialUnreadable, RendersBusy, RenderThreads, StepRunner
from ipaas.errors import IpaasError
from ipaas.masking import mask_value
from ipaas.sdk import ActionResult, PermanentError, RateLimited, RetryableError
from ipaas.storage.db import Database
from ipaas.storage.tables import Execution, ExecutionStep, utcnow
from ipaas.workflow_store import WorkflowStore

log = logging.getLogger("ipaas.engine")

FINAL = {"succeeded", "failed", "dead", "cancelled"}
NO_CONNECTOR = "none"  # an execution that ended before any step ran


@dataclass(frozen=True)
class EngineLimits:
    step_timeout: float = 30.0
    execution_deadline: float = 900.0
    base_delay: float = 1.0
    max_delay: float = 300.0


class StepFailure(Exception):
    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Executor:
    def __init__(
        self,
        db: Database,
        workflows: WorkflowStore,
        credentials: CredentialStore,
        steps: StepRunner,
        breakers: BreakerRegistry,
        limits: EngineLimits = EngineLimits(),
    ) -> None:
        self.db = db
        self.workflows = workflows
        self.credentials = credentials
        self.steps = steps
        self.breakers = breakers
        self.limits = limits
        self.outcomes = OutcomeWriter(db)
        # Executions this process ended, by final status and the connector of the step they
        # ended on (the last for a success, the failing one otherwise), counted once the
        # outcome is committed: ipaas_core_executions_finished_total.
        self.finished: collections.Counter[tuple[str, str]] = collections.Counter()
        # Renders too heavy for the event loop, which every tenant's executions share.
        self.renders = RenderThreads("ipaas-render")

    def close(self) -> None:
        """Once the dispatcher has stopped: the render threads go."""
        self.renders.close()

    async def run(self, task: outbox.ClaimedTask, owner: str) -> None:
        # Every line about this execution, the connector's own included, says whose it is:
        # before, a delivery's failure could not be traced to its tenant or workflow.
        workflow_id = task.execution.workflow_id if task.execution is not None else None
        with logs.bind(tenant_id=task.tenant_id, workflow_id=workflow_id, execution_id=task.execution_id):
            await self._run(task, owner)

    async def _run(self, task: outbox.ClaimedTask, owner: str) -> None:
        started = time.perf_counter()
        # The claim brought the execution (as it was before the claim, which also marked it
        # running) and its stored steps: no read before the first step runs.
        execution = task.execution
        done_steps = task.steps
        if execution is None or execution.status in FINAL:
            await self.outcomes.record(Outcome(task.execution_id, task.task_id, owner, status=""))
            return
        if execution.max_attempts and execution.attempts >= execution.max_attempts:
            # Claimed again after its last attempt never finished (the process died, or the
            # attempt crashed): running it once more would go past max_attempts, and for
            # ever if the attempt crashes each time. Only that case reaches here: a failed
            # attempt either retries below max_attempts or ends the execution.
            error = f"gave up: attempt {execution.attempts} of {execution.max_attempts} never finished"
            await self.outcomes.give_up(task, owner, error=error, attempts=execution.attempts)
            self.finished["dead", NO_CONNECTOR] += 1  # its workflow is not read to run nothing
            log.warning("execution.dead", extra={"execution_id": execution.id, "attempts": execution.attempts, "error": error})
            return
        definition = await self.workflows.get_pinned(execution.workflow_id, execution.workflow_version)
        remaining = [st for i, st in enumerate(definition["steps"]) if not (done_steps.get(i) and done_steps[i].status == "succeeded")]
        if remaining:
            # An open breaker defers the task before anything is touched: no attempt spent.
            first = remaining[0]
            wait = self.breakers.get(execution.tenant_id, first["connector"]).peek()
            if wait is not None:
                await self._defer_for_breaker(execution, task, owner, wait, first)
                return
        attempt = execution.attempts + 1
        outputs = {row.step_id: row.output or {} for row in done_steps.values() if row.status == "succeeded"}
        strict = bool(definition.get("options", {}).get("strict_templates"))
        connector = NO_CONNECTOR
        try:
            async with asyncio.timeout(self.limits.execution_deadline):
                last = len(definition["steps"]) - 1
                pending: dict[str, Any] | None = None
                for index, step in enumerate(definition["steps"]):
                    previous = done_steps.get(index)
                    if previous is not None and previous.status == "succeeded":
                        continue
                    if step is not remaining[0] and await self._cancelled(execution.id):
                        await self.outcomes.record(Outcome(execution.id, task.task_id, owner, status=""))
                        log.info("execution.cancelled", extra={"execution_id": execution.id, "before_step": step["id"]})
                        return
                    connector = step["connector"]
                    breaker = self.breakers.get(execution.tenant_id, connector)
                    wait = breaker.allow(step.get("timeout_seconds") or self.limits.step_timeout)
                    if wait is not None:
                        await self._defer_for_breaker(execution, task, owner, wait, step)
                        return
                    trial = Trial(breaker)
                    try:
                        output, pending = await self._run_step(execution, index, step, outputs, strict, previous, trial, defer_store=index == last)
                    finally:
                        # A step that ended without an outcome for the breaker (permanent
                        # or template error, the deadline, a cancellation) gives its
                        # half-open slot back; after an outcome this does nothing.
                        trial.release()
                    outputs[step["id"]] = output
        except StepFailure as failure:
            await self._failed(execution, task, owner, attempt, failure, started, connector)
            return
        except RendersBusy as busy:
            # Its tenant's heavy renders (or all the render threads) busy here for longer
            # than is worth waiting in process (RenderThreads): back to the queue without
            # spending an attempt, rather than holding a worker slot to wait.
            await self._defer(execution, task, owner, busy.wait, str(busy), {"connector": connector})
            return
        except TimeoutError:
            await self._failed(execution, task, owner, attempt, StepFailure("execution deadline exceeded", retryable=True), started, connector)
            return
        await self.outcomes.record(Outcome(execution.id, task.task_id, owner, "succeeded", None, pending))
        self.finished["succeeded", connector] += 1
        log.info("execution.finished", extra={"execution_id": execution.id, "status": "succeeded", "attempt": attempt, "duration_ms": _ms_since(started)})

    async def _cancelled(self, execution_id: str) -> bool:
        """A running step finishes; no further step starts once the execution is cancelled."""
        status = await self.db.transaction(lambda conn: conn.execute(select(outbox.EXECUTIONS.c.status).where(outbox.EXECUTIONS.c.id == execution_id)).scalar())
        return status == "cancelled"

    async def _run_step(self, execution: Execution, index: int, step: dict[str, Any], outputs: dict[str, Any], strict: bool, previous: ExecutionStep | None, trial: Trial, defer_store: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The step's output, and its stored result when `defer_store` asks the caller to
        commit it together with the execution's outcome."""
        started = utcnow()
        step_attempts = (previous.attempts if previous else 0) + 1
        record = {
            "execution_id": execution.id,
            "step_index": index,
            "step_id": step["id"],
            "attempts": step_attempts,
            "rendered_config": None,
            "started_at": started,
        }
        try:
            result = await self._invoke_step(execution, step, record, outputs, strict, trial)
        except (StepFailure, SQLAlchemyError, RendersBusy):
            # A database error is left to the lease, as before: the write that would record
            # this failure needs the database too.
            raise
        except Exception as exc:
            # A bug, the engine's or a plugin's past the host's checks. Escaping, it left the
            # execution running until its lease ended, then the step (its upstream call) ran
            # again, up to max_attempts. The step fails for good; only the log has the
            # details (masked there), which may hold what a step must not show.
            log.exception("step.crashed", extra={"execution_id": execution.id, "step_id": step["id"]})
            error = f"internal error ({type(exc).__name__})"
            await self._store_step(record, "failed", error=error, retryable=False)
            raise StepFailure(f"step {step['id']}: {error}", retryable=False) from None
        trial.success()
        values = self._step_values(record, "succeeded", output=result.output or {}, message=result.message, duration_ms=result.duration_ms)
        if defer_store:  # the last step's result commits with the execution's outcome
            return result.output or {}, values
        await self.outcomes.store_step(values)
        return result.output or {}, None

    async def _invoke_step(self, execution: Execution, step: dict[str, Any], record: dict[str, Any], outputs: dict[str, Any], strict: bool, trial: Trial) -> ActionResult:
        """Render the step's config and invoke its action; a failure is stored and raised as
        StepFailure."""
        try:
            rendered = await self.steps.render_fairly(step, templates.RenderContext(trigger=execution.payload, steps=outputs), self.renders, execution.tenant_id)
        except templates.TemplateError as exc:
            # This payload will not render on any attempt (too large, nested too deeply, too
            # much work for its templates, a template refused since it was saved).
            await self._store_step(record, "failed", error=str(exc), retryable=False)
            raise StepFailure(f"step {step['id']}: {exc}", retryable=False) from None
        record["rendered_config"] = self.steps.masked_config(step, rendered.value)
        try:
            if strict and rendered.missing_paths:
                raise StepFailure(f"template paths resolved to nothing: {', '.join(rendered.missing_paths)}", retryable=False)
            timeout = float(step.get("timeout_seconds") or self.limits.step_timeout)
            result: ActionResult = await self.steps.invoke(execution.tenant_id, execution.id, step, rendered.value, timeout, dry_run=False)
        except RetryableError as exc:
            # Neither counts against the breaker (the trial is released): the upstream was
            # never called, or it answered that it is busy (a 429, often for one target
            # only, already honoured through retry_after).
            if not isinstance(exc, (CredentialUnreadable, RateLimited)):
                trial.failure()
            await self._store_step(record, "failed", error=str(exc), retryable=True)
            raise StepFailure(f"step {step['id']}: {exc}", retryable=True, retry_after=exc.retry_after) from None
        except (PermanentError, IpaasError) as exc:
            # Neither a success nor a failure for the breaker (the trial is released). A 4xx
            # does show the upstream reachable, but a PermanentError is also a config that
            # does not validate, a deleted credential, a refused address or a plugin bug,
            # raised before any call: as a success it could close the breaker of an upstream
            # nobody reached, and its full load would land on an upstream still down.
            await self._store_step(record, "failed", error=str(exc), retryable=False)
            raise StepFailure(f"step {step['id']}: {exc}", retryable=False) from None
        except StepFailure as exc:
            await self._store_step(record, "failed", error=str(exc), retryable=exc.retryable)
            raise
        return result

    async def _store_step(self, record: dict[str, Any], status: str, **kwargs: Any) -> None:
        await self.outcomes.store_step(self._step_values(record, status, **kwargs))

    def _step_values(self, record: dict[str, Any], status: str, *, error: str | None = None, retryable: bool = False, output: Any = None, message: str | None = None, duration_ms: int | None = None) -> dict[str, Any]:
        finished = utcnow()
        return {
            **record,
            "status": status,
            "error": mask_value(error) if error else None,
            "retryable": retryable,
            "output": output,
            "message": message,
            "finished_at": finished,
            "duration_ms": duration_ms if duration_ms is not None else int((finished - record["started_at"]).total_seconds() * 1000),
        }

    async def _defer_for_breaker(self, execution: Execution, task: outbox.ClaimedTask, owner: str, wait: float, step: dict[str, Any]) -> None:
        """An open breaker defers the task without spending an attempt or calling upstream."""
        await self._defer(execution, task, owner, wait, f"circuit open for {step['connector']}", {"connector": step["connector"]})

    async def _defer(self, execution: Execution, task: outbox.ClaimedTask, owner: str, wait: float, error: str, extra: dict[str, Any]) -> None:
        """Back to the queue in `wait` seconds, as if this attempt had never started."""
        wait = spread(wait)  # a backlog deferred together comes back spread out, not at once
        run_at = utcnow() + timedelta(seconds=wait)
        # Undo what the claim set: this attempt never started.
        await self.outcomes.requeue(task, owner, run_at, error=error, attempts=execution.attempts, started_at=execution.started_at)
        log.info("execution.deferred", extra={"execution_id": execution.id, **extra, "seconds": round(wait, 3)})

    async def _failed(self, execution: Execution, task: outbox.ClaimedTask, owner: str, attempt: int, failure: StepFailure, started: float, connector: str) -> None:
        if not failure.retryable:
            await self._finish(execution, task, owner, "failed", str(failure), connector)
            log.warning("execution.failed", extra={"execution_id": execution.id, "error": str(failure), "duration_ms": _ms_since(started)})
            return
        policy = RetryPolicy(base_delay=self.limits.base_delay, max_delay=self.limits.max_delay, max_attempts=execution.max_attempts)
        delay = next_delay(policy, attempt, failure.retry_after)
        if delay is None:
            await self._finish(execution, task, owner, "dead", str(failure), connector)
            log.warning("execution.dead", extra={"execution_id": execution.id, "attempts": attempt, "error": str(failure), "duration_ms": _ms_since(started)})
            return
        run_at = utcnow() + timedelta(seconds=delay)
        await self.outcomes.requeue(task, owner, run_at, error=mask_value(str(failure)))
        log.info("execution.retry_scheduled", extra={"execution_id": execution.id, "attempt": attempt, "delay_s": round(delay, 3), "duration_ms": _ms_since(started)})

    async def _finish(self, execution: Execution, task: outbox.ClaimedTask, owner: str, status: str, error: str | None, connector: str) -> None:
        await self.outcomes.record(Outcome(execution.id, task.task_id, owner, status, mask_value(error) if error else None))
        self.finished[status, connector] += 1


def _ms_since(started: float) -> float:
    """This attempt's time in the engine, from its claim to its outcome's commit: the
    `duration_ms` of the execution's last line (the seed's structured log field)."""
    return round((time.perf_counter() - started) * 1000, 1)
