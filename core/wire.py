"""Sizes on the wire between gateway and core: one gRPC message each way, and what a reply
built of many items may spend on them."""

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # both ends, both directions
# A repeated field's item costs its bytes plus its field tag and length prefix, at most this.
ITEM_FRAMING = 6
# What a reply's items (a page, an execution's steps) may add up to: room is left for the
# rest of the reply.
REPLY_ITEMS_BYTES = MAX_MESSAGE_BYTES - 1024 * 1024
