"""JSON log lines: masked everywhere (message, extra fields, nested values, exceptions and
tracebacks) and carrying the request context."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ipaas.logs import bind, configure_logging

SLACK = "https://hooks.slack.com/services/T0AAAA/B0BBBB/SuperSecretToken123"


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = configure_logging("DEBUG", stream)
    yield stream
    logging.getLogger().removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_json_with_a_request_id(captured) -> None:
    logging.getLogger("t").info("plain.event")
    with bind(request_id="req-1", tenant_id="tn_1", workflow_id="wf_1", execution_id="ex_1"):
        logging.getLogger("t").info("bound.event", extra={"attempt": 2})
    first, second = lines(captured)
    assert first["event"] == "plain.event" and first["request_id"] == "-"
    assert (second["request_id"], second["tenant_id"], second["workflow_id"], second["execution_id"]) == ("req-1", "tn_1", "wf_1", "ex_1")
    assert second["attempt"] == 2 and second["level"] == "info"


def test_secrets_are_masked_in_message_extra_nested_and_exceptions(captured) -> None:
    log = logging.getLogger("t")
    log.warning("posting to %s", SLACK)
    log.info("step.config", extra={"config": {"webhook_url": SLACK, "list": [{"token": "abc123"}], "text": f"see {SLACK}"}})
    try:
        raise RuntimeError(f"upstream refused {SLACK} with api_key=topsecret99")
    except RuntimeError:
        log.exception("step.failed")
    output = captured.getvalue()
    assert "SuperSecretToken123" not in output
    assert "topsecret99" not in output
    assert "abc123" not in output
    records = lines(captured)
    assert records[2]["exc_type"] == "RuntimeError"
    assert "Traceback" in records[2]["traceback"]


def test_ordinary_fields_survive(captured) -> None:
    logging.getLogger("t").info("execution.finished", extra={"execution_id": "ex_01jd3k4m5n6p7q8r9s0t1v2w3x", "duration_ms": 1234, "status": "succeeded"})
    (record,) = lines(captured)
    assert record["execution_id"] == "ex_01jd3k4m5n6p7q8r9s0t1v2w3x"
    assert record["duration_ms"] == 1234 and record["status"] == "succeeded"
