"""Pages cut to one gRPC reply: page_size is a maximum, the token continues after the last
item kept."""

from __future__ import annotations

from google.protobuf import wrappers_pb2

from ipaas.pagination import decode_token, encode_token, within_bytes


def test_a_page_that_fits_is_left_alone() -> None:
    messages = [wrappers_pb2.StringValue(value=v) for v in ("a", "b")]
    assert within_bytes(messages, ["id2", "id1"], "next", key=str, budget=100) == (messages, "next")


def test_a_page_of_large_items_ends_early_and_continues_after_the_last_kept() -> None:
    rows = ["id5", "id4", "id3", "id2", "id1"]
    messages = [wrappers_pb2.StringValue(value="x" * 40) for _ in rows]  # 42 bytes each
    kept, token = within_bytes(messages, rows, "", key=str, budget=100)
    assert len(kept) == 2 and decode_token(token) == "id4"
    # The last page of a listing ends early too: a token, where there was none.
    assert within_bytes(messages[:3], rows[:3], "", key=str, budget=100)[1] == encode_token("id4")


def test_an_item_larger_than_the_budget_still_comes_alone() -> None:
    messages = [wrappers_pb2.StringValue(value="x" * 500), wrappers_pb2.StringValue(value="y")]
    kept, token = within_bytes(messages, [7, 6], "", key=lambda v: str(v), budget=100)
    assert kept == messages[:1] and decode_token(token) == "7"
