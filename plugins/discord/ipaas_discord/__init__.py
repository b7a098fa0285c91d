"""Discord connector: post a message through a channel webhook."""

from __future__ import annotations

import httpx

from ipaas.sdk import Action, ActionResult, Connector, ExecutionContext, PermanentError, hookimpl, raise_for_status

ALLOWED_HOSTS = ("discord.com", "discordapp.com", "ptb.discord.com", "canary.discord.com", "ptb.discordapp.com", "canary.discordapp.com")


async def post_message(ctx: ExecutionContext) -> ActionResult:
    body: dict = {}
    for optional in ("content", "username", "embeds"):
        if ctx.config.get(optional):
            body[optional] = ctx.config[optional]
    url = ctx.credentials.get("webhook_url")
    if not url:
        raise PermanentError("the credential has no webhook_url")
    # wait=true makes Discord answer 200 with the created message, so later steps get its id.
    # Merged into the URL's own query, which may name a thread (?thread_id=...): httpx's
    # params= would replace it, and the message would land in the parent channel.
    response = await ctx.http.post(httpx.URL(url).copy_merge_params({"wait": "true"}), json=body)
    raise_for_status(response, "Discord")
    output = {"content": body.get("content", "")}
    if response.status_code == 200:
        try:
            message = response.json()
            output["message_id"] = str(message.get("id", ""))
            output["channel_id"] = str(message.get("channel_id", ""))
        except ValueError:
            pass
    ctx.logger.debug("discord.message_posted")  # the engine logs each execution; this adds detail at debug
    return ActionResult(message="message posted", output=output)


CONNECTOR = Connector(
    name="discord",
    version="0.1.0",
    description="Post messages to Discord channels through webhooks.",
    actions=[
        Action(
            name="post_message",
            description="Post a message to the webhook's channel.",
            run=post_message,
            config_schema={
                "type": "object",
                "properties": {
                    "content": {"type": "string", "minLength": 1, "maxLength": 2000},
                    "username": {"type": "string", "maxLength": 80},
                    "embeds": {"type": "array", "minItems": 1, "maxItems": 10},
                },
                # Discord takes a message with content, embeds or both.
                "anyOf": [{"required": ["content"]}, {"required": ["embeds"]}],
                "additionalProperties": False,
            },
        )
    ],
    credential_schema={
        "type": "object",
        "properties": {"webhook_url": {"type": "string", "pattern": "^https?://"}},
        "required": ["webhook_url"],
        "additionalProperties": False,
    },
    allowed_hosts=ALLOWED_HOSTS,
)


@hookimpl
def ipaas_register_connectors(register):  # type: ignore[no-untyped-def]
    register(CONNECTOR)
