"""Numbers in the API's free-form JSON (payloads, step configs, outputs, credentials).

They travel as protobuf Struct, which holds every number as a double. Two consequences:
- past 2^53 an integer silently becomes another one (2^60 + 1 arrives as 2^60, and renders
  as 1.152921504606847e+18). An order id changed in transit is lost data, so the gateway
  refuses such a body with the field named; the sender can send the number as a string, as
  Google's JSON mapping does for int64;
- every whole number comes back as a float: a payload's 1 would render as "1.0" in a
  message and as 1.0 in a REST answer. Both ends turn whole doubles back into ints."""

from __future__ import annotations

import re
from typing import Any

EXACT = 2**53 - 1  # the largest integer every double can hold, with all below it
# orjson reads an integer literal outside [-2^63, 2^64) as a float: past 2^53 either way,
# so a float that large may be such an integer, which only the JSON text can tell.
_INT64_FLOAT = 2.0**63
# A string (skipped: numbers inside it are text) or an integer literal, not the digits of a
# fraction or an exponent. One character per step inside a string: linear on any input.
_STRING_OR_INTEGER = re.compile(rb'"(?:[^"\\]|\\.)*"|(?<![0-9.eE+-])-?[0-9]+(?![0-9.eE])')


def _big_integer_literals(text: bytes) -> set[float]:
    """The values, as orjson reads them, of the integer literals in text past 64 bits."""
    found = set()
    for match in _STRING_OR_INTEGER.finditer(text):
        token = match.group()
        if not token.startswith(b'"') and len(token) >= 19 and abs(number := int(token)) >= 2**63:
            found.add(float(number))
    return found


def inexact_integer(data: Any, text: bytes | None = None) -> str | None:
    """The path (a.b[2].c) of the first integer past ±EXACT in data, or None. `text`, the
    JSON data was read from, finds the integers orjson turned into floats."""
    big_literals: set[float] | None = None
    # A loop over an explicit stack: orjson reads 1,024 levels, deeper than Python recursion.
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        elif type(value) is int and not -EXACT <= value <= EXACT:
            return path
        elif type(value) is float and text is not None and abs(value) >= _INT64_FLOAT:
            if big_literals is None:  # rare: only a number this large pays for the scan
                big_literals = _big_integer_literals(text)
            if value in big_literals:
                return path
    return None


def integral(value: Any) -> Any:
    """value with every whole double within ±2^53 as an int."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value
