"""The reasons are a documented, stable API: docs/errors.md lists each reason ipaas.reasons
defines and no other, each has AIP-193's shape, and every error class has a default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipaas import errors, reasons
from ipaas.service.status import STATUS_OF

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
# A table row: | `REASON` | gRPC code | HTTP | when | metadata |
_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|$")


def documented() -> dict[str, list[str]]:
    rows = {}
    for line in DOCS.read_text().splitlines():
        if m := _ROW.match(line):
            assert m.group(1) not in rows, f"{m.group(1)} is documented twice"
            rows[m.group(1)] = [cell.strip() for cell in m.groups()[1:]]
    return rows


def test_every_reason_is_documented_and_every_documented_reason_exists() -> None:
    rows = documented()
    assert sorted(reasons.ALL) == sorted(rows), "docs/errors.md and ipaas.reasons differ"


@pytest.mark.parametrize("name", sorted(reasons.ALL))
def test_each_reason_has_aip_193s_shape_and_its_documented_metadata(name: str) -> None:
    reason = reasons.ALL[name]
    assert reason.name == name and getattr(reasons, name) is reason
    assert re.fullmatch(r"[A-Z][A-Z0-9_]+[A-Z0-9]", name) and len(name) <= 63
    metadata = documented()[name][3]
    if reason.resource_type:
        assert "`resourceType`" in metadata, f"{name}: its resourceType is undocumented"
    for key in re.findall(r"`([^`]+)`", metadata):
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]+", key) and len(key) <= 64, f"{name}: {key} is no lowerCamelCase key"


@pytest.mark.parametrize("klass", [errors.IpaasError, *STATUS_OF], ids=lambda k: k.__name__)
def test_every_error_class_has_a_documented_default_reason(klass: type[errors.IpaasError]) -> None:
    default = klass("message").reason
    assert default is reasons.ALL[default.name]
    code = STATUS_OF.get(klass)
    row = documented()[default.name]
    assert row[0] == (code.name if code else "INTERNAL"), f"{klass.__name__}'s default is documented under another code"
    assert klass is errors.IpaasError or "*default*" in row[2], f"{default.name} is not marked as {klass.__name__}'s default"


def test_a_raise_site_names_its_cause_with_ids_clipped() -> None:
    exc = errors.NotFound("workflow wf_1 not found", reasons.WORKFLOW_NOT_FOUND(workflowId="wf_" + "x" * 500))
    assert exc.reason.name == "WORKFLOW_NOT_FOUND" and str(exc) == "workflow wf_1 not found"
    metadata = exc.reason.error_metadata()
    assert metadata["resourceType"] == "workflow" and len(metadata["workflowId"]) == reasons.MAX_METADATA_CHARS
    assert reasons.WORKFLOW_NOT_FOUND.metadata == {}, "binding ids makes a copy: the constant stays bare"
