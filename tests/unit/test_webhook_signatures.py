"""Standard Webhooks verification of the webhook-signature list, with the package's own
signer producing the valid entries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
from standardwebhooks.webhooks import Webhook

from ipaas.triggers import verify_signature
from ipaas.workflow_store import new_webhook_secret

SECRET = new_webhook_secret()
BODY = b'{"a":1}'


def headers(signature: str, msg_id: str = "msg_1") -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(time.time())), "webhook-signature": signature}


def valid(msg_id: str = "msg_1") -> str:
    from datetime import datetime, timezone

    return Webhook(SECRET).sign(msg_id, datetime.now(timezone.utc), BODY.decode())


@pytest.mark.parametrize(
    "before",
    [
        "v1," + base64.b64encode(b"x" * 32).decode(),  # another key's signature
        "v1a,AAAA",  # an asymmetric signature, which this receiver does not use
        "v2",  # no comma
        "v1,a,b",  # two commas
        "v1,abc",  # truncated base64
        "v1," + base64.b64encode(b"x" * 32).decode() + " ",  # a double space follows
    ],
)
def test_any_valid_signature_in_the_list_verifies(before: str) -> None:
    """The spec: the receiver accepts any valid signature and skips what it cannot use. A
    malformed entry first used to void the valid one after it (401)."""
    assert verify_signature([SECRET], BODY, headers(f"{before} {valid()}"))


@pytest.mark.parametrize("signature", ["", " ", "v2", "v1,abc", "v1," + base64.b64encode(b"x" * 32).decode()])
def test_nothing_valid_does_not_verify(signature: str) -> None:
    assert not verify_signature([SECRET], BODY, headers(signature))


def test_the_signature_covers_the_exact_bytes() -> None:
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    h = headers("")
    mac = hmac.new(key, f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + BODY, hashlib.sha256).digest()
    h["webhook-signature"] = "v1," + base64.b64encode(mac).decode()
    assert verify_signature([SECRET], BODY, h)
    assert not verify_signature([SECRET], BODY + b" ", h)
