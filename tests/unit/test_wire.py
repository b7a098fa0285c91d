"""MAX_JSON_DEPTH is what protobuf lets a reply carry: a JSON value that deep, in the deepest
place a reply holds one, parses on the client; one level more does not."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, Message

from ipaas.v1 import executions_pb2 as pb
from ipaas.wire import MAX_JSON_DEPTH, nested_deeper_than


def nested(levels: int, kind: str = "object") -> Any:
    """`levels` objects, or one object around arrays (a Struct is an object)."""
    data: Any = "leaf"
    for _ in range(levels if kind == "object" else levels - 1):
        data = {"a": data} if kind == "object" else [data]
    return data if kind == "object" else {"a": data}


def value(data: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(data, v, max_recursion_depth=1000)
    return v


def struct(data: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


# Every reply that carries a stored or rendered JSON value, at the place it carries it.
REPLIES: dict[str, Callable[[Any], Message]] = {
    "GetExecution payload": lambda d: pb.GetExecutionResponse(execution=pb.Execution(payload=value(d))),
    "GetExecution step output": lambda d: pb.GetExecutionResponse(execution=pb.Execution(steps=[pb.StepRun(output=struct(d))])),
    "GetExecution step rendered_config": lambda d: pb.GetExecutionResponse(execution=pb.Execution(steps=[pb.StepRun(rendered_config=struct(d))])),
    "ListExecutions payload": lambda d: pb.ListExecutionsResponse(executions=[pb.Execution(payload=value(d))]),
    "RunWorkflow payload": lambda d: pb.RunWorkflowResponse(execution=pb.Execution(payload=value(d))),
    "DryRun step output": lambda d: pb.DryRunResponse(steps=[pb.DryRunStep(output=struct(d))]),
}


def round_trips(build: Callable[[Any], Message], data: Any) -> bool:
    try:
        message = build(data)
        type(message).FromString(message.SerializeToString())
    except DecodeError:  # building copies the value through the parser, which stops there too
        return False
    return True


@pytest.mark.parametrize("reply", REPLIES)
def test_the_deepest_value_allowed_reaches_the_client_and_one_more_level_would_not(reply: str) -> None:
    build = REPLIES[reply]
    assert round_trips(build, nested(MAX_JSON_DEPTH)), "MAX_JSON_DEPTH is more than a reply can carry"
    assert round_trips(build, nested(MAX_JSON_DEPTH, "array"))
    deepest_place = reply.startswith(("GetExecution", "ListExecutions", "RunWorkflow"))
    if deepest_place:
        assert not round_trips(build, nested(MAX_JSON_DEPTH + 1)), "MAX_JSON_DEPTH could be raised: measure again"


@pytest.mark.parametrize(
    "data,levels,deeper",
    [
        ("text", 0, False),
        ({}, 0, True),
        ({}, 1, False),
        ({"a": 1, "b": []}, 1, True),
        ({"a": 1, "b": []}, 2, False),
        ([1, {"a": ({},)}], 4, False),
        ([1, {"a": ({},)}], 3, True),
        (nested(MAX_JSON_DEPTH), MAX_JSON_DEPTH, False),
        (nested(MAX_JSON_DEPTH + 1, "array"), MAX_JSON_DEPTH, True),
    ],
)
def test_nesting_counts_objects_and_arrays(data: Any, levels: int, deeper: bool) -> None:
    assert nested_deeper_than(data, levels) is deeper


def test_rendered_configs_are_stored_no_deeper_than_a_reply_carries() -> None:
    """A step's rendered config is stored masked, and masking replaces what nests past its
    MAX_DEPTH: that bound keeps a config rendering a deep payload readable."""
    from ipaas import masking

    assert masking.MAX_DEPTH <= MAX_JSON_DEPTH
    assert not nested_deeper_than(masking.mask_value(nested(MAX_JSON_DEPTH + 10)), MAX_JSON_DEPTH)
