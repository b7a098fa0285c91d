r"""Template data mapping: `{{user.name}}` in any string of a step's config.

Paths:
- `user.name`, `order.items.0.name` — dotted paths into the trigger payload (the seeds' form);
  integer segments index lists; a final `#` gives the length (`items.#`), like gjson.
- `trigger.<path>` — the payload, explicitly; `steps.<id>.<path>` — an earlier step's output.
  These prefixes win over payload keys of the same name.
- `$...` — a full JSONPath (python-jsonpath) evaluated against the trigger payload, without
  regular expressions: `match()`, `search()` and `=~ /.../` are refused when the workflow is
  saved. Python's `re` backtracks, so a pattern like `(a+)+b` against a crafted payload runs
  for seconds to hours on the engine's event loop, where no timeout can interrupt it.

JSONPath costs are bounded the same way, for any payload. A filter may only read the item it
tests by name or index (`@.qty`, `@['a b'][0]`, `#`), compare with literals, combine with
`&&`, `||`, `!` and call functions on such values (`length(@.name) > 3`). A query from the
root (`$`), a descendant (`@..x`) or a list of nodes (`@.*`) inside a filter runs once per
item it tests: `{{$..[?count($..*) > 0]}}` was quadratic in the payload, and nested, cubic
(a 1.8 KB payload held an engine for 21 s). A query as a selector (`$.a[$.b]`) runs once per
node too, and `&` compares its two sides' results pairwise: both are refused as well.
What stays (`$..name`, `[*]`, slices, filters) is linear in the payload per segment, but
segments and templates multiply, so a render also has a work budget: MAX_TEMPLATE_WORK
nodes made or tested by all of one config's JSONPaths together, past which the step fails
for good (TemplateError).

Rendering only looks up dict keys and list indexes: it never evaluates code nor touches
Python attributes, so `{{__class__}}` is just a key that is not there. Strings stay strings:
scalars render as text, objects and lists as JSON, null as empty. A missing path renders
empty and is reported, so strict workflows can fail the step naming it.

Numbers render as JavaScript's Number.prototype.toString writes them (what n8n and a
JSON-minded reader expect): the shortest digits that read back as the same double, `2.0` as
`2`, `1e-7` as `1e-7`, `1e21` as `1e+21`. Integers are written with every digit (a webhook's
12345678901234567890 stays exact). The payload holds numbers, not their spelling: `19.90`
arrives as 19.9 and renders `19.9`; send a string to keep a format.

A literal `{{` is written `{{"{{"}}` (or `{{'{{'}}`), as in Go templates and Jinja:
`{{"{{"}}name}}` renders `{{name}}`. A `}}` outside a template is text already. A backslash
escape (Handlebars' `\{{`) was not chosen: in a JSON config it must be typed `\\{{`, and it
would have changed the meaning of any existing text with a backslash before `{{`; the quoted
form was only ever a lookup of a key named `"{{"`, quotes included.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from jsonpath import JSONPathEnvironment, JSONPathMatch
from jsonpath.exceptions import JSONPathNameError, JSONPathSyntaxError
from jsonpath.filter import (
    CurrentKey,
    FilterExpression,
    FilterExpressionLiteral,
    FunctionExtension,
    InfixExpression,
    ListLiteral,
    Nil,
    PrefixExpression,
    RelativeFilterQuery,
    Undefined,
)
from jsonpath.parse import Parser
from jsonpath.path import CompoundJSONPath, JSONPath

_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)
_LITERAL_BRACES = ('"{{"', "'{{'")  # {{"{{"}}: the one escape, a literal "{{"
MAX_TEMPLATES_PER_STRING = 1000
MAX_PATH_LENGTH = 512
MAX_CONFIG_DEPTH = 32
# What one step's config may render to in all: a thousand copies of a 1 MiB payload in one
# string would otherwise be built in the engine's memory.
MAX_RENDERED_CHARS = 1024 * 1024
_MISSING = object()
# Nodes all of one config's JSONPaths may make or test: 0.4 to 1.2 s of python-jsonpath on
# our 2-core machines (2 to 6 µs a node). A webhook of 1 MiB has 60,000 to 80,000
# containers, so a step can still scan it twice with `$..name` or filter all its items; a
# path that reads by name and index costs about ten (_PATH_COST).
MAX_TEMPLATE_WORK = 200_000
# What one JSONPath evaluation costs before it visits a node (~20 µs), so 10,000 cheap
# `{{$.a}}` in one config count too.
_PATH_COST = 10
# What a render may spend on the engine's event loop, which every tenant's executions share:
# 1,000 nodes are 2 to 10 ms. A render that needs more stops there (RenderTooHeavy) and the
# engine renders it again, with MAX_TEMPLATE_WORK, in a thread (engine/steps.py). Nearly
# every config spends under a hundred.
INLINE_TEMPLATE_WORK = 1_000
_WORK = "ipaas.work"  # where a render's _Budget rides in python-jsonpath's filter context
# A list index: ASCII digits only. str.isdigit() also takes "²" (which int() refuses) and
# "٣" (which int() reads as 3).
_INDEX = re.compile(r"-?[0-9]+")


class TemplateError(ValueError):
    """A template that cannot be compiled (bad JSONPath, too many placeholders)."""


@dataclass
class RenderContext:
    trigger: Any = None
    steps: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderResult:
    value: Any
    missing_paths: tuple[str, ...]


@dataclass(frozen=True)
class _Path:
    text: str
    root: str  # "trigger" | "steps"
    segments: tuple[str, ...]
    compiled: Any = None  # a compiled JSONPath for `$` paths


_NO_REGEX = "regular expressions (match, search, =~) are not allowed in templates"


class _WorkExceeded(Exception):
    """A render spent its work budget (see _Budget.spend_work)."""


class RenderTooHeavy(Exception):
    """A render spent the smaller work budget it was given (render_config's `work`): not a
    TemplateError, since with the full budget it may well succeed."""


_FILTER_READS = "a filter may only read the item it tests by name or index (@.a, @[0], #) and compare it with literals"


class _CostedFilter(FilterExpression):
    """A filter expression that spends the render's work budget each time it tests an item:
    a filter that matches nothing makes no node, yet it costs its size for every item."""

    __slots__ = ("cost",)

    def __init__(self, expression: Any, cost: int) -> None:
        super().__init__(expression)
        self.cost = cost

    def evaluate(self, context: Any) -> bool:
        context.extra_context[_WORK].spend_work(self.cost)
        return super().evaluate(context)


def _filter_cost(expr: Any, token: Any) -> int:
    """What testing one item costs; raises on anything but the whitelist (see the module's
    docstring): each part here costs at most its length, whatever the payload."""
    if isinstance(expr, InfixExpression):
        return 1 + _filter_cost(expr.left, token) + _filter_cost(expr.right, token)
    if isinstance(expr, PrefixExpression):
        return 1 + _filter_cost(expr.right, token)
    if isinstance(expr, FunctionExtension):
        return 1 + sum(_filter_cost(arg, token) for arg in expr.args)
    if isinstance(expr, RelativeFilterQuery) and expr.path.singular_query():
        return 1 + len(expr.path.segments)
    if isinstance(expr, ListLiteral):  # its items are literals (the parser's list_item_map)
        return 1 + len(expr.items)
    if isinstance(expr, (FilterExpressionLiteral, Nil, Undefined, CurrentKey)):
        return 1
    # $..x, $.a, @..x, @.*, @[?...], _.x: each runs a query once per item the filter tests.
    raise JSONPathSyntaxError(f"{_FILTER_READS}; {expr} would run once per item tested", token=token)


class _ParserWithoutRegex(Parser):
    def parse_regex(self, stream: Any) -> Any:  # a `/pattern/` literal, the operand of =~
        raise JSONPathSyntaxError(_NO_REGEX, token=stream.current())

    def parse_filter_selector(self, stream: Any, *, keys: bool = False) -> Any:
        token = stream.current()
        selector = super().parse_filter_selector(stream, keys=keys)
        inner = selector.expression.expression
        selector.expression = _CostedFilter(inner, _filter_cost(inner, token))
        return selector

    def parse_singular_query_selector(self, stream: Any) -> Any:  # $.a[$.b]: a query per node
        raise JSONPathSyntaxError("a query inside a selector ($.a[$.b]) is not allowed in templates", token=stream.current())


class _Match(JSONPathMatch):
    """A match that spends the render's work budget for each node it makes. It leaves out
    the normalized path and the children python-jsonpath keeps for each node: findall reads
    neither, and the path is every ancestor's key again, so long keys above a wide list made
    gigabytes of strings from a 1 MiB payload."""

    __slots__ = ()

    def new_child(self, obj: object, key: int | str) -> JSONPathMatch:
        # A node found by `..` is yielded up through one generator per level above it: 90
        # levels down, a node costs about twice what it does near the top.
        self._filter_context[_WORK].spend_work(1 + len(self.parts) // 50)
        return _Match(filter_context=self._filter_context, obj=obj, parent=self, path="", parts=self.parts + (key,), root=self.root)

    def add_child(self, *children: JSONPathMatch) -> None:
        pass


class _Environment(JSONPathEnvironment):
    """python-jsonpath without the filters that run a regular expression (see the module's
    docstring): the functions are not registered and a regex literal does not parse."""

    parser_class = _ParserWithoutRegex
    match_class = _Match

    def setup_function_extensions(self) -> None:
        super().setup_function_extensions()
        for name in ("match", "search"):
            self.function_extensions.pop(name, None)

    def validate_function_extension_signature(self, token: Any, args: list[Any]) -> list[Any]:
        if token.value in ("match", "search"):  # a clearer answer than "not defined"
            raise JSONPathNameError(_NO_REGEX, token=token)
        return super().validate_function_extension_signature(token, args)


# Without caching: it only helps queries from the root, which filters may not hold, and its
# per-node copy of the expression would run around _CostedFilter.
_JSONPATH = _Environment(filter_caching=False)


def _find(compiled: JSONPath | CompoundJSONPath, data: Any, budget: _Budget) -> list[Any]:
    """compiled.findall(data), spending budget. JSONPath.finditer makes its first node a plain
    JSONPathMatch whatever the environment's match_class, so the segments run from here. A
    payload that is a string stays one: findall parsed it as JSON again for every template
    (as dotted paths never did)."""
    budget.spend_work(_PATH_COST)
    paths = [compiled] if isinstance(compiled, JSONPath) else [compiled.path, *(p for _, p in compiled.paths)]
    context = {_WORK: budget}
    found: list[Any] = []
    for path in paths:
        matches: Any = [_Match(filter_context=context, obj=[data] if path.pseudo_root else data, parent=None, path="$", parts=(), root=data)]
        for segment in path.segments:
            matches = segment.resolve(matches)
        found.extend(match.obj for match in matches)
    return found


def _compile_path(text: str) -> _Path:
    if not text:
        raise TemplateError("empty template '{{}}'")
    if len(text) > MAX_PATH_LENGTH:
        raise TemplateError(f"template path longer than {MAX_PATH_LENGTH} characters")
    if text.startswith("$"):
        try:
            compiled = _JSONPATH.compile(text)
        except Exception as exc:  # python-jsonpath raises several syntax error types
            # Its text goes on with a drawing of the path under a caret: the first line is
            # the reason, and the path is quoted already.
            reason = str(exc).split("\n", 1)[0]
            raise TemplateError(f"invalid JSONPath {text!r}: {reason}") from None
        if isinstance(compiled, CompoundJSONPath) and any(op != _JSONPATH.union_token for op, _ in compiled.paths):
            # An intersection compares every result of one side with every one of the other.
            raise TemplateError(f"invalid JSONPath {text!r}: the intersection operator & is not allowed in templates")
        return _Path(text, "trigger", (), compiled)
    segments = tuple(text.split("."))
    if any(s == "" for s in segments):
        raise TemplateError(f"invalid path {text!r}: empty segment")
    if segments[0] == "steps":
        return _Path(text, "steps", segments[1:])
    if segments[0] == "trigger":
        return _Path(text, "trigger", segments[1:])
    return _Path(text, "trigger", segments)


@lru_cache(maxsize=4096)
def compile_template(template: str) -> tuple[str | _Path, ...]:
    """Literal text and paths, in order. Cached: configs are rendered once per execution."""
    parts: list[str | _Path] = []
    position = 0
    for count, match in enumerate(_TEMPLATE.finditer(template), start=1):
        if count > MAX_TEMPLATES_PER_STRING:
            raise TemplateError(f"more than {MAX_TEMPLATES_PER_STRING} templates in one string")
        if match.start() > position:
            _append_text(parts, template[position : match.start()])
        if match.group(1) in _LITERAL_BRACES:
            _append_text(parts, "{{")
        else:
            parts.append(_compile_path(match.group(1)))
        position = match.end()
    if position < len(template):
        _append_text(parts, template[position:])
    return tuple(parts)


def _append_text(parts: list[str | _Path], text: str) -> None:
    # One text part however many escapes it holds, so a string of text alone is still one
    # str part (render_config's test for "one template and nothing else").
    if parts and isinstance(parts[-1], str):
        parts[-1] += text
    else:
        parts.append(text)


def validate_template(template: str) -> list[str]:
    """Problems with a template, empty when it compiles."""
    try:
        compile_template(template)
    except TemplateError as exc:
        return [str(exc)]
    return []


def template_paths(template: str) -> list[str]:
    return [p.text for p in compile_template(template) if isinstance(p, _Path)]


def step_references(template: str) -> list[str]:
    """The step ids a template reads the output of ({{steps.<id>...}}); `{{steps}}` alone
    reads them all and names none."""
    return [p.segments[0] for p in compile_template(template) if isinstance(p, _Path) and p.root == "steps" and p.segments]


def _walk(value: Any, segments: tuple[str, ...]) -> Any:
    for i, segment in enumerate(segments):
        if segment == "#" and i == len(segments) - 1:
            return len(value) if isinstance(value, (list, dict, str)) else _MISSING
        if isinstance(value, dict):
            value = value.get(segment, _MISSING)
        elif isinstance(value, list) and _INDEX.fullmatch(segment):
            index = int(segment)
            value = value[index] if -len(value) <= index < len(value) else _MISSING
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _resolve(path: _Path, ctx: RenderContext, budget: _Budget) -> Any:
    if path.compiled is not None:
        try:
            found = _find(path.compiled, ctx.trigger, budget)
        except _WorkExceeded:
            if budget.work_limit < MAX_TEMPLATE_WORK:
                raise RenderTooHeavy from None
            raise TemplateError(
                f"templates visit too much of the payload: more than {MAX_TEMPLATE_WORK} nodes by {{{{{path.text}}}}}"
                " (use fewer `..` and filters, or a smaller payload)"
            ) from None
        except Exception:
            return _MISSING
        if not found:
            return _MISSING
        return found[0] if len(found) == 1 else found
    root = ctx.steps if path.root == "steps" else ctx.trigger
    if not path.segments:
        return root if root is not None else _MISSING
    return _walk(root, path.segments)


def as_text(value: Any) -> str:
    """A value as a template writes it into text: strings as they are, null as nothing,
    numbers as JavaScript writes them, booleans, objects and lists as JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, float):
        return number_text(value)
    if isinstance(value, (bool, dict, list)):
        try:
            return orjson.dumps(value).decode()
        except TypeError:  # orjson refuses nesting deeper than 254 levels
            raise TemplateError("a value is nested too deeply to render as JSON") from None
    return str(value)


def number_text(value: float) -> str:
    """A double as ECMAScript's Number::toString writes it. str() wrote Python's spelling:
    "2.0" for a whole number the REST API gives as 2, "1e-07", "1e+16", "inf"."""
    if value == 0:
        return "0"  # -0 too, as in JavaScript
    text = repr(value)
    if "e" not in text and "n" not in text:
        # Fixed notation (1e-4 <= |value| < 1e16), which JavaScript writes alike but for a
        # whole number's ".0": the common case, kept as fast as str() was.
        return text[:-2] if text.endswith(".0") else text
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    sign = "-" if value < 0 else ""
    # repr gives the shortest digits that read back as the same double (as JavaScript
    # picks them); only where the point goes and when to use an exponent differ.
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    # value = 0.<digits> × 10^point
    point = len(whole) + int(exponent or 0) - (len(whole) + len(fraction) - len(digits))
    digits = digits.rstrip("0")
    if len(digits) <= point <= 21:
        return sign + digits + "0" * (point - len(digits))
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    shown = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{shown}e{'+' if point > 0 else '-'}{abs(point - 1)}"


class _Budget:
    """Characters a render may still produce, and JSONPath work it may still do."""

    __slots__ = ("left", "work", "work_limit")

    def __init__(self, chars: int, work: int | None = None) -> None:
        self.left = chars
        # Read at each render, not bound at import: tests lower or raise it.
        self.work = self.work_limit = MAX_TEMPLATE_WORK if work is None else min(work, MAX_TEMPLATE_WORK)

    def spend_work(self, nodes: int) -> None:
        self.work -= nodes
        if self.work < 0:
            raise _WorkExceeded

    def spend(self, chars: int) -> None:
        self.left -= chars
        if self.left < 0:
            raise TemplateError(f"the rendered config would be longer than {MAX_RENDERED_CHARS} characters")


def render(template: str, ctx: RenderContext, budget: _Budget | None = None) -> RenderResult:
    if "{{" not in template:
        return RenderResult(template, ())
    budget = budget or _Budget(MAX_RENDERED_CHARS)
    out: list[str] = []
    missing: list[str] = []
    for part in compile_template(template):
        if isinstance(part, str):
            text = part
        else:
            try:
                value = _resolve(part, ctx, budget)
                if value is _MISSING:
                    missing.append(part.text)
                    continue
                text = as_text(value)
            except (TemplateError, RenderTooHeavy):
                raise
            except Exception as exc:
                # A bug here must fail the step for good (the executor's answer to a
                # TemplateError), not crash the attempt and leave the execution running.
                raise TemplateError(f"template {{{{{part.text}}}}} could not be rendered ({type(exc).__name__})") from None
        budget.spend(len(text))
        out.append(text)
    return RenderResult("".join(out), tuple(missing))


def render_config(config: Any, ctx: RenderContext, work: int | None = None) -> RenderResult:
    """Render every string in a nested config (keys are left alone); returns a new structure.
    Raises TemplateError when the strings rendered would exceed MAX_RENDERED_CHARS or their
    JSONPaths MAX_TEMPLATE_WORK; RenderTooHeavy when `work`, a smaller budget, runs out."""
    missing: list[str] = []
    rendered = _render_nested(config, ctx, missing, 0, _Budget(MAX_RENDERED_CHARS, work))
    return RenderResult(rendered, tuple(dict.fromkeys(missing)))


def _render_nested(value: Any, ctx: RenderContext, missing: list[str], depth: int, budget: _Budget) -> Any:
    # A function of its own, not a closure: a nested function that calls itself is a
    # reference cycle (function <-> cell) that kept each step's context for the collector.
    if depth > MAX_CONFIG_DEPTH:
        raise TemplateError(f"config nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(value, str):
        if "{{" in value and len(parts := compile_template(value)) == 1 and not isinstance(parts[0], str):
            return _render_whole(parts[0], ctx, missing, budget)
        result = render(value, ctx, budget)
        missing.extend(result.missing_paths)
        return result.value
    if isinstance(value, dict):
        return {k: _render_nested(v, ctx, missing, depth + 1, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_nested(v, ctx, missing, depth + 1, budget) for v in value]
    return value


def _render_whole(path: _Path, ctx: RenderContext, missing: list[str], budget: _Budget) -> Any:
    """A string that is one template and nothing else ("{{loc.lat}}") gives the value with
    its own type, so number, boolean, list and object fields can be filled from a payload;
    as text, "48.85" failed a number field's schema on every run. Where the connector's schema
    asks for a string, the step runner turns it back into text (StepRunner.render). A path
    that finds nothing gives "", as inside text."""
    try:
        value = _resolve(path, ctx, budget)
    except (TemplateError, RenderTooHeavy):
        raise
    except Exception as exc:
        raise TemplateError(f"template {{{{{path.text}}}}} could not be rendered ({type(exc).__name__})") from None
    if value is _MISSING:
        missing.append(path.text)
        return ""
    budget.spend(len(as_text(value)))  # the same cap as the value written out as text
    return value
