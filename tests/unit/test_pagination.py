"""Page tokens: bound to the listing that issued them (AIP-158), and pages cut to one gRPC
reply (page_size is a maximum, the token continues after the last item kept)."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import wrappers_pb2

from ipaas.errors import InvalidArgument
from ipaas.pagination import Page, PageRequest, within_bytes
from ipaas.v1 import executions_pb2, tenants_pb2, workflows_pb2


def _first(request, tenant="tn_a") -> PageRequest:  # type: ignore[no-untyped-def]
    return PageRequest.of(request, tenant)


def _token(request, key: str, tenant="tn_a") -> str:  # type: ignore[no-untyped-def]
    return _first(request, tenant).token_after(key)


def _refused(request, tenant="tn_a") -> InvalidArgument:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as err:
        PageRequest.of(request, tenant)
    assert [v.field for v in err.value.violations] == ["page_token"]
    return err.value


def test_a_token_continues_after_its_key_when_only_page_size_changes() -> None:
    token = _token(executions_pb2.ListExecutionsRequest(status="failed", page_size=3), "ex_5")
    again = PageRequest.of(executions_pb2.ListExecutionsRequest(status="failed", page_size=50, page_token=token), "tn_a")
    assert (again.after, again.size) == ("ex_5", 50)
    assert token.isascii() and "=" not in token and "ex_5" not in token


@pytest.mark.parametrize(
    "replayed, tenant",
    [
        (executions_pb2.ListExecutionsRequest(status="succeeded"), "tn_a"),  # another filter value
        (executions_pb2.ListExecutionsRequest(status="failed", workflow_id="wf_1"), "tn_a"),  # a filter added
        (executions_pb2.ListExecutionsRequest(), "tn_a"),  # the filter dropped
        (executions_pb2.ListExecutionsRequest(status="failed"), "tn_b"),  # another tenant
        (workflows_pb2.ListWorkflowsRequest(), "tn_a"),  # another list method
    ],
)
def test_a_token_replayed_with_another_listing_is_refused(replayed, tenant: str) -> None:  # type: ignore[no-untyped-def]
    replayed.page_token = _token(executions_pb2.ListExecutionsRequest(status="failed"), "ex_5")
    assert "another listing" in str(_refused(replayed, tenant))


def test_api_key_tokens_are_bound_to_their_tenant_id() -> None:
    token = _token(tenants_pb2.ListApiKeysRequest(tenant_id="tn_a"), "key_9", tenant=None)
    assert PageRequest.of(tenants_pb2.ListApiKeysRequest(tenant_id="tn_a", page_token=token), None).after == "key_9"
    _refused(tenants_pb2.ListApiKeysRequest(tenant_id="tn_b", page_token=token), None)


@pytest.mark.parametrize("token", ["!!garbage", "AAAA", base64.urlsafe_b64encode(b"wf_01HZX").decode().rstrip("="), "x" * 200])
def test_malformed_and_old_format_tokens_are_refused(token: str) -> None:
    _refused(workflows_pb2.ListWorkflowsRequest(page_token=token))


@pytest.mark.parametrize("key", ["0", "2147483648", "v3", "-1"])
def test_a_version_token_must_hold_a_version(key: str) -> None:
    request = workflows_pb2.ListWorkflowVersionsRequest(id="wf_1")
    request.page_token = _token(request, key)
    with pytest.raises(InvalidArgument) as err:
        _first(request).version_after()
    assert [v.field for v in err.value.violations] == ["page_token"]


def test_a_negative_page_size_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        _first(workflows_pb2.ListWorkflowsRequest(page_size=-1))
    assert [v.field for v in err.value.violations] == ["page_size"]


def _page(rows: list, next_token: str = "") -> Page:  # type: ignore[type-arg]
    return Page(rows, next_token, _first(workflows_pb2.ListWorkflowsRequest(page_size=len(rows))))


def test_a_page_that_fits_is_left_alone() -> None:
    messages = [wrappers_pb2.StringValue(value=v) for v in ("a", "b")]
    assert within_bytes(messages, _page(["id2", "id1"], "next"), key=str, budget=100) == (messages, "next")


def test_a_page_of_large_items_ends_early_and_continues_after_the_last_kept() -> None:
    rows = ["id5", "id4", "id3", "id2", "id1"]
    messages = [wrappers_pb2.StringValue(value="x" * 40) for _ in rows]  # 42 bytes each
    page = _page(rows)
    kept, token = within_bytes(messages, page, key=str, budget=100)
    assert len(kept) == 2 and token == page.request.token_after("id4")
    # The last page of a listing ends early too: a token, where there was none.
    assert within_bytes(messages[:3], _page(rows[:3]), key=str, budget=100)[1] == page.request.token_after("id4")


def test_an_item_larger_than_the_budget_still_comes_alone() -> None:
    messages = [wrappers_pb2.StringValue(value="x" * 500), wrappers_pb2.StringValue(value="y")]
    page = _page([7, 6])
    kept, token = within_bytes(messages, page, key=lambda v: str(v), budget=100)
    assert kept == messages[:1] and token == page.request.token_after("7")
