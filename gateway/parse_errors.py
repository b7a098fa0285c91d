"""protobuf's JSON parse errors in the API's words.

json_format.ParseError reads like a Python traceback ("Failed to parse workflow field:
Failed to parse id field: expected string or bytes-like object, got 'int'..."). A caller
needs the field and what is wrong with it, as every other 400 of the API gives them."""

from __future__ import annotations

import re

_NESTED = re.compile(r"Failed to parse (\w+) field: ")
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
    return ".".join(fields) or "body", meaning
