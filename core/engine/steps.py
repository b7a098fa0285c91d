"""Running one step: validate the rendered config, decrypt the credential, invoke the
connector. Shared by the executor and by dry runs in "test" mode."""

from __future__ import annotations

from typing import Any

from ipaas import templates
from ipaas.credentials import CredentialStore
from ipaas.errors import NotFound
from ipaas.masking import REDACTED, mask_value
from ipaas.plugin_host import ConnectorRegistry
from ipaas.sdk import ActionResult, PermanentError, RetryableError


class CredentialUnreadable(RetryableError):
    """This process cannot decrypt the step's credential: retried, and not held against the
    connector's circuit breaker, since the upstream was never called."""


class StepRunner:
    def __init__(self, registry: ConnectorRegistry, credentials: CredentialStore) -> None:
        self.registry = registry
        self.credentials = credentials

    def render(self, step: dict[str, Any], ctx: templates.RenderContext) -> templates.RenderResult:
        """The step's config rendered: a field that is one template keeps the value's type,
        turned into text where the action's schema asks for a string (as `{{order.id}}` in
        a message's text). Raises TemplateError."""
        rendered = templates.render_config(step.get("config") or {}, ctx)
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
