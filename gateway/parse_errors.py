"""protobuf's JSON parse errors in the API's words.

json_format.ParseError reads like a Python traceback ("Failed to parse workflow field:
Failed to parse id field: expected string or bytes-like object, got 'int'..."). A caller
needs the field and what is wrong with it, as every other 400 of the API gives them."""

from __future__ import annotations

import re
from typing import Any

from ipaas.wire import nested_deeper_than

_NESTED = re.compile(r"Failed to parse (\w+) field: ")
# "... at Workflow.options.max_attempts.": the path after the parsed message's type.
_AT = re.compile(r" at \w+\.([\w.]+?)\.?$")
_UNKNOWN = re.compile(r'Message type "[\w.]+" has no field named "([^"]+)"')
# What protobuf's wording means, first match wins; anything else is "is not valid".
_MEANINGS = (
    ("must be in []", "must be a list"),
    ("must be in a dict", "must be a JSON object"),
    ("object is not iterable", "must be a JSON object"),
    ("expected string", "must be a string"),
    ("invalid literal for int", "must be an integer"),
    ("Couldn't parse integer", "must be an integer"),
    ("out of range", "is out of range"),
    ("Expected true or false", "must be true or false"),
)


def describe(message: str) -> tuple[str, str]:
    """(field path, what is wrong) for a ParseError's message."""
    fields = []
    while m := _NESTED.match(message):
        fields.append(m.group(1))
        message = message[m.end():]
    if unknown := _UNKNOWN.match(message):
        return ".".join([*fields, unknown.group(1)]), "is not a field of this request"
    meaning = next((said for words, said in _MEANINGS if words in message), "is not valid")
    if at := _AT.search(message):  # some errors name the whole path instead of nesting
        return at.group(1), meaning
    return ".".join(fields) or "body", meaning


# Messages whose JSON form is not an object: anything goes where they are expected.
_NOT_OBJECTS = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue", "google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask"} | {f"google.protobuf.{w}Value" for w in ("Bool", "Int32", "Int64", "UInt32", "UInt64", "Float", "Double", "String", "Bytes")}


def shape_problem(descriptor: Any, data: Any, prefix: str = "") -> tuple[str, str] | None:
    """(field path, problem) for a message field given something other than an object, which
    protobuf's parser reports confusingly ("trigger": "manual" read as the fields m, a,
    n...); None when the shapes fit (the parser checks the rest)."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None or field.message_type is None or field.message_type.full_name in _NOT_OBJECTS or field.message_type.GetOptions().map_entry:
            continue
        where = f"{prefix}{field.name}"
        if field.is_repeated and not isinstance(value, list):
            return where, "must be a list"
        items = value if field.is_repeated else [value]
        for item in items:
            if not isinstance(item, dict):
                return where, "must be a JSON object"
            if (found := shape_problem(field.message_type, item, f"{where}.")) is not None:
                return found
    return None


# Free-form JSON: where a body's nesting is the caller's to choose.
_FREE_FORM = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}


def nested_too_deeply(descriptor: Any, data: Any, levels: int, prefix: str = "") -> str | None:
    """The path (steps[0].config) of the first free-form JSON field of data nested more
    than `levels` deep, or None. Maps are not walked: no request has a map of messages."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None or field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        where = f"{prefix}{field.name}"
        items = [(f"{where}[{i}]", item) for i, item in enumerate(value)] if field.is_repeated and isinstance(value, list) else [(where, value)]
        for path, item in items:
            if field.message_type.full_name in _FREE_FORM:
                if nested_deeper_than(item, levels):
                    return path
            elif (found := nested_too_deeply(field.message_type, item, levels, f"{path}.")) is not None:
                return found
    return None
