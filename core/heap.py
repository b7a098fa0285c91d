"""The long-lived processes' heap after start-up, kept out of the garbage collector's way.

A full (generation 2) collection walks every tracked object, and by the end of start-up a
process holds ~115,000 that live as long as it does: modules, protobuf descriptors, SQL
metadata, connector schemas. At saturation an engine process ran a full collection every
1.5-3 s, each a 60-260 ms pause that every delivery in flight waited out, and the collector
took ~18 % of its CPU (gc.callbacks timing under the bench's load; the core ~8 %). Frozen
once start-up is done, those objects are left alone: full collections then took 1.5-8 ms.
A frozen object is never collected, so start-up's own garbage is collected first and what
is frozen is what the process keeps anyway.
"""

from __future__ import annotations

import gc


def freeze_after_startup() -> int:
    """Collect start-up's garbage, then freeze what survives; returns how many objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
