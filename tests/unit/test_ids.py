from ipaas.ids import _ALPHABET, new_id


def _value(id_: str) -> int:
    value = 0
    for char in id_.split("_", 1)[1]:
        value = value * 32 + _ALPHABET.index(char)
    return value


def test_ids_made_in_one_millisecond_sort_in_order_and_do_not_give_away_their_neighbours() -> None:
    """Ids made in the same millisecond (a group commit's executions, workflows created
    together) were the previous id plus one, so a neighbour's id, and with it an unsigned
    webhook's URL, could be worked out from one's own (security audit F7)."""
    made = [new_id("wf") for _ in range(2000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    values = [_value(i) for i in made]
    same_ms = [b - a for a, b in zip(values, values[1:]) if a >> 80 == b >> 80]
    assert len(same_ms) > 100, "the machine made too few ids per millisecond to tell"
    assert all(step > 0 for step in same_ms)
    assert sum(step == 1 for step in same_ms) == 0 and len(set(same_ms)) > len(same_ms) * 0.99
