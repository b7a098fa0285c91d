"""Dry runs: render every step against a sample payload ("preview") or really run them
("test"). Nothing is written: no execution, no outbox task, no version."""

from __future__ import annotations

import time
from typing import Any

from ipaas import templates
from ipaas.engine.steps import RenderThreads, StepRunner
from ipaas.errors import InvalidArgument, IpaasError
from ipaas.sdk import PermanentError, RetryableError
from ipaas.service.convert import from_value
from ipaas.v1 import executions_pb2 as pb
from ipaas.workflow_store import WorkflowStore

MODES = ("preview", "test")


class DryRunner:
    def __init__(self, workflows: WorkflowStore, steps: StepRunner) -> None:
        self.workflows = workflows
        self.steps = steps
        # Heavy renders run here, off the event loop that serves every tenant: one may take
        # about a second before templates.MAX_TEMPLATE_WORK refuses it. Not the engine's:
        # a preview's caller waits for its answer, so it queues instead of being deferred.
        self._renders = RenderThreads("ipaas-dryrun-render")

    def close(self) -> None:
        """Stop the render threads when the core stops (RenderThreads.close)."""
        self._renders.close()

    async def _definition(self, tenant_id: str, request: pb.DryRunRequest) -> dict[str, Any]:
        if request.workflow_id and request.HasField("workflow"):
            raise InvalidArgument.field("workflow", "give either workflow or workflow_id, not both")
        if request.workflow_id:
            # The store reads 0 as the current version and any other number as a version's
            # own: a negative one was answered NOT_FOUND, as if the workflow were missing.
            if request.version < 0:
                raise InvalidArgument.field("version", "must be 1 or more, or 0 for the current version")
            return (await self.workflows.get(tenant_id, request.workflow_id, request.version)).definition
        if not request.HasField("workflow"):
            raise InvalidArgument.field("workflow", "give a workflow definition or a workflow_id")
        from ipaas.service.convert import definition_from_proto

        return await self.workflows._validated(tenant_id, definition_from_proto(request.workflow))

    async def run(self, tenant_id: str, request: pb.DryRunRequest) -> pb.DryRunResponse:
        mode = request.mode or "preview"
        if mode not in MODES:
            raise InvalidArgument.field("mode", f"must be one of {', '.join(MODES)}")
        definition = await self._definition(tenant_id, request)
        payload = from_value(request.payload, "payload") if request.HasField("payload") else None
        strict = bool(definition.get("options", {}).get("strict_templates"))
        outputs: dict[str, Any] = {}
        results: list[pb.DryRunStep] = []
        ok, stopped = True, False
        for step in definition["steps"]:
            if stopped:
                results.append(pb.DryRunStep(step_id=step["id"], status="skipped", message="an earlier step failed"))
                continue
            result = await self._step(tenant_id, step, payload, outputs, strict, mode)
            results.append(result)
            if result.status in ("failed", "invalid"):
                ok, stopped = False, True
        return pb.DryRunResponse(ok=ok, steps=results, mode=mode)

    async def _step(self, tenant_id: str, step: dict[str, Any], payload: Any, outputs: dict[str, Any], strict: bool, mode: str) -> pb.DryRunStep:
        from ipaas.service.convert import to_struct

        started = time.perf_counter()
        out = pb.DryRunStep(step_id=step["id"])
        try:
            context = templates.RenderContext(trigger=payload, steps=outputs)
            rendered = await self.steps.render_fairly(step, context, self._renders)
        except templates.TemplateError as exc:
            out.status, out.message = "failed", str(exc)
            return out
        out.rendered_config.CopyFrom(to_struct(self.steps.masked_config(step, rendered.value)))
        # In preview, later steps' references to earlier outputs cannot resolve: not a failure.
        missing = [p for p in rendered.missing_paths if mode == "test" or not p.startswith("steps.")]
        out.missing_paths.extend(rendered.missing_paths)
        problems = self.steps.config_problems(step, rendered.value)
        if mode == "preview":
            problems = [p for p in problems if not _reads_step_output(step.get("config") or {}, p[0])]
        if strict and missing:
            out.status, out.message = "failed", f"template paths resolved to nothing: {', '.join(missing)}"
        elif problems:
            out.status, out.message = "failed", "; ".join(f"{f}: {d}" for f, d in problems)
        elif mode == "preview":
            out.status, out.message = "ok", "rendered and valid; nothing was called"
        else:
            try:
                timeout = float(step.get("timeout_seconds") or 30)
                result = await self.steps.invoke(tenant_id, "dry-run", step, rendered.value, timeout, dry_run=True)
            except (RetryableError, PermanentError, IpaasError) as exc:
                out.status, out.message, out.retryable = "failed", str(exc), isinstance(exc, RetryableError)
            else:
                out.status, out.message = "succeeded", result.message
                out.output.CopyFrom(to_struct(result.output))
                outputs[step["id"]] = result.output
        out.duration_ms = int((time.perf_counter() - started) * 1000)
        return out


def _reads_step_output(config: dict[str, Any], field: str) -> bool:
    """Whether a config field's raw value reads an earlier step's output (unknown in preview)."""
    key = field.removeprefix("config.").split(".", 1)[0].split("[", 1)[0]
    return "{{" in str(config.get(key, "")) and "steps." in str(config.get(key, ""))
