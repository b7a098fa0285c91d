"""Echo: returns its config as output. The smallest possible connector."""

from ipaas.sdk import Action, ActionResult, Connector, hookimpl


async def echo(ctx):  # type: ignore[no-untyped-def]
    return ActionResult(message="echoed", output=dict(ctx.config))


@hookimpl
def ipaas_register_connectors(register):  # type: ignore[no-untyped-def]
    register(Connector(name="echo", version="1.2.3", description="Echo the config back.", actions=[Action("echo", "Echo.", echo, {"type": "object"})]))
