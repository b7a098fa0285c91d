"""Definition limits that protect replies: the largest definition allowed still reads back."""

from __future__ import annotations

import orjson
from google.protobuf import struct_pb2

from ipaas.definitions import MAX_DEFINITION_BYTES
from ipaas.wire import REPLY_ITEMS_BYTES


def test_the_largest_definition_allowed_fits_in_a_reply() -> None:
    # The worst case: small numbers take 2 bytes of JSON ("0,") and 11 in a protobuf Struct.
    zeros = [0] * ((MAX_DEFINITION_BYTES - 1024) // 2)
    step = {"id": "notify", "connector": "slack", "action": "send_message", "credential_id": "cred_1", "timeout_seconds": 0, "config": {"text": "hi", "blocks": zeros}}
    definition = {"name": "big", "trigger": {"type": "manual"}, "steps": [step], "options": {"strict_templates": False, "max_attempts": 0}}
    assert len(orjson.dumps(definition)) <= MAX_DEFINITION_BYTES
    # All of it as a Struct: more than the Workflow message (whose fields are tagged, not
    # named) takes for it; it must fit a ListWorkflows page, the tightest reply.
    wire = struct_pb2.Struct()
    wire.update(definition)
    assert wire.ByteSize() < REPLY_ITEMS_BYTES
