"""Structured JSON logging: one object per line, secrets masked on every record, and the
request context (request_id, tenant_id, workflow_id, execution_id) on every line.

Events are names (`log.info("execution.finished", extra={...})`), fields go in `extra`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import traceback
from datetime import datetime, timezone
from typing import Any, Iterator, TextIO

import orjson

from ipaas.masking import mask_text, mask_value

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("ipaas_log_context", default={})

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def current_context() -> dict[str, Any]:
    return dict(_context.get())


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields to every log line inside the block (and the tasks it starts)."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def _default(value: Any) -> str:
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": mask_text(record.getMessage()),
            "request_id": "-",
        }
        entry.update(mask_value(_context.get()))
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}
        if extra:
            entry.update(mask_value(extra))
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            entry["exc_type"] = exc_type.__name__
            entry["exc"] = mask_text(str(exc))
            entry["traceback"] = mask_text("".join(traceback.format_exception(exc_type, exc, tb)))
        return orjson.dumps(entry, default=_default).decode()


_HANDLER_NAME = "ipaas-json"


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Install (once) a JSON handler on the root logger; every record through it is masked."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic says at INFO which plugins it set up (seven lines), in every process that
    # checks the schema, each engine process too: routine, not news. Its migration lines stay.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # Our lines carry no source file, thread or process fields, so the record need not
    # collect them (the logging HOWTO's "Optimization" switches; findCaller alone was ~6 us of
    # a ~36 us record).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return handler
