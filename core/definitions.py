"""Workflow definitions: normalising and validating what a caller sends.

A definition is stored as the plain JSON a REST caller sees (name, trigger, steps, options),
so a version is readable without this code. Validation collects every problem with its field
path (`steps[1].config.text`) instead of stopping at the first.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timezone
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import orjson
from croniter import croniter

from ipaas.errors import FieldViolation, InvalidArgument

TRIGGER_TYPES = ("webhook", "schedule", "manual")
STEP_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")  # \Z: $ also matches before a final newline
MAX_STEPS = 50
MAX_ATTEMPTS_LIMIT = 25
DEFAULT_MAX_ATTEMPTS = 5
MAX_STEP_TIMEOUT = 300
# A stored definition comes back in replies (CreateWorkflow, GetWorkflow, a ListWorkflows
# page), each one gRPC message of at most 4 MiB (ipaas.wire). Measured as its JSON: a number
# like 0 takes 2 bytes there and 11 in a protobuf Struct, so 512 KiB of JSON is at most
# ~2.8 MiB on the wire, which leaves room for the rest of any reply. A request just under
# 4 MiB was stored and then could not be read back (RESOURCE_EXHAUSTED), nor listed.
MAX_DEFINITION_BYTES = 512 * 1024


def _cron_field(names: str = "") -> re.Pattern[str]:
    value = r"\d+" + (f"|{names}" if names else "")
    item = rf"(?:\*|(?:{value})(?:-(?:{value}))?)(?:/\d+)?"
    return re.compile(rf"{item}(?:,{item})*\Z", re.IGNORECASE)


# The five-field cron the API promises: numbers, month and weekday names, *, ranges, lists
# and steps. croniter also takes R (a new random value each time it is built: replicas,
# and every re-plan, would disagree on fire times and so fire twice), H (needs a hash id),
# and Quartz's L, # and ?, which vixie cron does not know: a schedule using them could not
# move to another scheduler. croniter still checks the values (minute 60, month 13).
CRON_FIELDS = (
    _cron_field(),
    _cron_field(),
    _cron_field(),
    _cron_field("jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec"),
    _cron_field("sun|mon|tue|wed|thu|fri|sat"),
)
# Each field's name and how many values it has (minute 0-59, hour 0-23, day 1-31, month 1-12,
# weekday 0-6): the largest step that can mean "every N". croniter takes any step, and a
# larger one (*/61, "every 61 minutes") fires only at the start of its range, which is not
# what it says. OpenBSD's cron likewise caps a step at its field's count of values. No
# seconds field: a cron has five.
CRON_STEP_LIMITS = (("minute", 60), ("hour", 24), ("day of month", 31), ("month", 12), ("day of week", 7))
# Names in the zone database that are not a place: "localtime" is each host's own zone (so
# replicas on different hosts would disagree), "Factory" a placeholder with no offset rules.
HOST_ZONES = frozenset({"localtime", "Factory"})


class Catalog(Protocol):
    """What validation needs to know about installed connectors."""

    def action_problem(self, connector: str, action: str) -> tuple[str, str] | None:
        """(field, description) when the connector or action does not exist, else None."""

    def config_problems(self, connector: str, action: str, config: dict[str, Any]) -> list[tuple[str, str]]:
        """(path inside config, description) for each schema violation."""

    def needs_credentials(self, connector: str) -> bool:
        """Whether the connector's actions need a credential."""


def normalise(definition: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults so stored definitions all have the same shape."""
    trigger = dict(definition.get("trigger") or {})
    trigger.setdefault("type", "")
    if trigger.get("type") == "schedule" and trigger.get("cron"):
        trigger.setdefault("timezone", "UTC")
    options = dict(definition.get("options") or {})
    options.setdefault("strict_templates", False)
    options.setdefault("max_attempts", 0)
    options.setdefault("allow_unsigned_webhooks", False)
    steps = []
    for step in definition.get("steps") or []:
        step = dict(step)
        step.setdefault("config", {})
        step.setdefault("credential_id", "")
        step.setdefault("timeout_seconds", 0)
        steps.append(step)
    return {
        "name": (definition.get("name") or "").strip(),
        "trigger": trigger,
        "steps": steps,
        "options": options,
    }


def max_attempts(definition: dict[str, Any]) -> int:
    return int(definition.get("options", {}).get("max_attempts") or DEFAULT_MAX_ATTEMPTS)


def validate(definition: dict[str, Any], catalog: Catalog) -> list[FieldViolation]:
    """Every problem in a normalised definition, with field paths. Credentials are checked
    by the store, which can see them."""
    out: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        out.append(FieldViolation(field, description))

    _validate_size(definition, bad)
    if not 1 <= len(definition["name"]) <= 200:
        bad("name", "must be 1 to 200 characters")
    elif any(unicodedata.category(c) in ("Cc", "Cf") for c in definition["name"]):
        # Line breaks, terminal escapes and bidi overrides: a name is shown in lists,
        # terminals and logs, where they forge or hide text.
        bad("name", "must not contain control or formatting characters")
    _validate_trigger(definition["trigger"], bad)
    _validate_options(definition["options"], bad)
    steps = definition["steps"]
    if not steps:
        bad("steps", "a workflow needs at least one step")
    if len(steps) > MAX_STEPS:
        bad("steps", f"at most {MAX_STEPS} steps")
    seen: set[str] = set()
    for i, step in enumerate(steps[:MAX_STEPS]):
        _validate_step(f"steps[{i}]", step, seen, catalog, bad)
    return out


def raise_if_invalid(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations)


def _json_size(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except TypeError:  # nested deeper than orjson goes (254 levels): too large as well
        return MAX_DEFINITION_BYTES + 1


def _validate_size(definition: dict[str, Any], bad: Any) -> None:
    size = _json_size(definition)
    if size <= MAX_DEFINITION_BYTES:
        return
    # Name the part that holds most of it (a huge config value, typically).
    path, value, value_size = "", definition, size
    for _ in range(8):
        if isinstance(value, dict):
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
        elif isinstance(value, list) and path:
            children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            break
        if not children:
            break
        sizes = [(_json_size(v), p, v) for p, v in children]
        largest, child_path, child = max(sizes, key=lambda item: item[0])
        if largest * 2 < value_size:  # no single part dominates: name this one
            break
        path, value, value_size = child_path, child, largest
    bad(path or "workflow", f"the workflow is {size} bytes as JSON, more than the {MAX_DEFINITION_BYTES} ({MAX_DEFINITION_BYTES // 1024} KiB) allowed; most of it is here")


def _validate_trigger(trigger: dict[str, Any], bad: Any) -> None:
    kind = trigger.get("type")
    if kind not in TRIGGER_TYPES:
        bad("trigger.type", f"must be one of {', '.join(TRIGGER_TYPES)}")
        return
    cron, interval, tz = trigger.get("cron") or "", int(trigger.get("interval_seconds") or 0), trigger.get("timezone") or ""
    if kind != "schedule":
        for name, value in (("cron", cron), ("interval_seconds", interval), ("timezone", tz)):
            if value:
                bad(f"trigger.{name}", "only applies to schedule triggers")
        return
    if bool(cron) == bool(interval):
        bad("trigger", "a schedule needs exactly one of cron or interval_seconds")
    fields = cron.split()
    if cron and len(fields) == 5 and not all(pattern.match(field) for pattern, field in zip(CRON_FIELDS, fields)):
        bad("trigger.cron", "uses syntax beyond five-field cron (such as R, H, L, # or ?): use numbers, names, *, ranges (1-5), lists (1,15) and steps (*/10)")
    elif cron and (len(fields) != 5 or not croniter.is_valid(cron)):
        bad("trigger.cron", "is not a valid five-field cron expression")
    elif cron and (too_large := _step_too_large(fields)):
        (name, values), step = too_large
        bad("trigger.cron", f"step /{step} in the {name} field is larger than its {values} values: it would fire only at the start of its range; use at most /{values}")
    elif cron and not _fires(cron):
        bad("trigger.cron", "never fires: no date matches it (e.g. 30 February)")
    if interval < 0 or (interval and not 1 <= interval <= 366 * 86400):
        bad("trigger.interval_seconds", "must be between 1 and 31622400")
    if tz:
        if interval:
            bad("trigger.timezone", "only applies to cron schedules")
        elif tz in HOST_ZONES:
            bad("trigger.timezone", f"{tz!r} names no place (the host's own zone, or a placeholder): use an IANA name such as Europe/Paris")
        elif not _valid_zone(tz):
            bad("trigger.timezone", f"unknown time zone {tz!r}: use an IANA name such as Europe/Paris")


def _step_too_large(fields: list[str]) -> tuple[tuple[str, int], str] | None:
    """The first step larger than its field's count of values, with that field."""
    for field, limit in zip(fields, CRON_STEP_LIMITS):
        for item in field.split(","):
            step = item.partition("/")[2].lstrip("0")
            # By length first: int() refuses a string of more than 4,300 digits.
            if step and (len(step) > 3 or int(step) > limit[1]):
                return limit, step
    return None


def _fires(cron: str) -> bool:
    """Whether a well-formed cron has a next fire time. is_valid checks the fields one by
    one, so "0 0 30 2 *" passes it; the scheduler would then fail on it at every tick. The
    zone does not matter here: a date that exists nowhere exists in no zone."""
    try:
        croniter(cron, datetime.now(timezone.utc)).get_next(datetime)
    except Exception:  # CroniterBadDateError, or any other way croniter finds no date
        return False
    return True


def _valid_zone(name: str) -> bool:
    if name not in available_timezones() and name != "UTC":
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _validate_options(options: dict[str, Any], bad: Any) -> None:
    attempts = int(options.get("max_attempts") or 0)
    if not 0 <= attempts <= MAX_ATTEMPTS_LIMIT:
        bad("options.max_attempts", f"must be between 1 and {MAX_ATTEMPTS_LIMIT} (0 for the default)")


def _validate_step(path: str, step: dict[str, Any], seen: set[str], catalog: Catalog, bad: Any) -> None:
    from ipaas.templates import MAX_CONFIG_DEPTH, TemplateError, step_references, validate_template

    earlier = set(seen)
    step_id = step.get("id") or ""
    if not STEP_ID.match(step_id):
        bad(f"{path}.id", "must start with a letter and hold only letters, digits, _ and - (at most 64)")
    elif step_id in seen:
        bad(f"{path}.id", f"duplicate step id {step_id!r}")
    seen.add(step_id)
    timeout = int(step.get("timeout_seconds") or 0)
    if not 0 <= timeout <= MAX_STEP_TIMEOUT:
        bad(f"{path}.timeout_seconds", f"must be between 1 and {MAX_STEP_TIMEOUT} (0 for the default)")
    connector, action = step.get("connector") or "", step.get("action") or ""
    problem = catalog.action_problem(connector, action)
    if problem:
        bad(f"{path}.{problem[0]}", problem[1])
        return
    config = step.get("config") or {}
    if _depth(config) > MAX_CONFIG_DEPTH:  # every render would refuse it
        bad(f"{path}.config", f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        return
    for where, template in _strings(config, f"{path}.config"):
        try:
            errors = validate_template(template)
        except TemplateError as exc:
            errors = [str(exc)]
        for error in errors:
            bad(where, error)
        for referred in [] if errors else step_references(template):
            # A typo, or a step that has not run yet when this one renders: the path could
            # never resolve, and the step would send blanks (or fail on every run, strict).
            if referred not in earlier:
                bad(where, f"refers to step {referred!r}, which is not an earlier step of this workflow")
    templated = {where for where, value in _strings(config, f"{path}.config") if "{{" in value}
    for where, description in catalog.config_problems(connector, action, config):
        full = f"{path}.{where}" if where.startswith("config") else f"{path}.config.{where}" if where else f"{path}.config"
        # A templated value is checked again after rendering; its raw text may not fit the schema.
        if full not in templated:
            bad(full, description)
    if catalog.needs_credentials(connector) and not step.get("credential_id"):
        bad(f"{path}.credential_id", f"connector {connector!r} needs a credential")


def _depth(value: Any, limit: int = 64) -> int:
    """The deepest level a value inside `value` sits at, as rendering counts it ({"a": 1}:
    1; an empty object or list holds none), counted up to `limit` at most."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=-1)


def _strings(value: Any, path: str, depth: int = 0) -> list[tuple[str, str]]:
    if depth > 32:
        return []
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _strings(v, f"{path}.{k}", depth + 1)]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _strings(v, f"{path}[{i}]", depth + 1)]
    return []
