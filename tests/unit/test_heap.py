import gc
import weakref

from ipaas import heap


class Node:
    def __init__(self) -> None:
        self.me = self


def test_startup_garbage_is_collected_survivors_frozen_and_young_collections_spaced() -> None:
    threshold = gc.get_threshold()
    cycle = Node()
    gone = weakref.ref(cycle)
    del cycle  # unreachable, but only the collector frees a cycle
    kept = Node()
    try:
        frozen = heap.after_startup()
        assert gone() is None
        assert frozen == gc.get_freeze_count() > 0
        # Frozen: in no generation a collection walks.
        assert not any(o is kept for g in range(3) for o in gc.get_objects(g))
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert any(o is kept for o in gc.get_objects(2))
