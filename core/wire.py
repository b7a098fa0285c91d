"""Sizes on the wire between gateway and core: one gRPC message each way, what a reply
built of many items may spend on them, and how deeply a JSON value in a message may nest."""

from __future__ import annotations

from typing import Any

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # both ends, both directions
# A repeated field's item costs its bytes plus its field tag and length prefix, at most this.
ITEM_FRAMING = 6
# What a reply's items (a page, an execution's steps) may add up to: room is left for the
# rest of the reply.
REPLY_ITEMS_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024

# protobuf's parsers (upb in Python, C++, Java) refuse a message nested more than 100
# messages deep, and a JSON value travels as google.protobuf.Value: each object costs three
# levels (Struct, map entry, Value), each array two. The deepest a reply carries one is
# three messages down (GetExecutionResponse > Execution > StepRun > Struct, level with a
# payload's Value > Struct), so 32 objects reach level 98 and a 33rd would need 101: a
# payload or output nested deeper could be stored but never read back, and broke every
# page of ListExecutions that held it. tests/unit/test_wire.py measures it.
MAX_JSON_DEPTH = 32


# What orjson and Struct.update write as JSON objects and arrays, subclasses included.
_CONTAINERS = (dict, list, tuple)


def nested_deeper_than(value: Any, levels: int) -> bool:
    """Whether value (JSON as Python data) nests objects and arrays more than `levels` deep."""
    # Breadth first over containers only, stopping at the first level past the limit: a wide
    # 1 MiB body costs one pass over its containers and no recursion.
    layer = [value] if isinstance(value, _CONTAINERS) else []
    for _ in range(levels):
        layer = [c for v in layer for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, _CONTAINERS)]
        if not layer:
            return False
    return bool(layer)
