"""Webhooks that arrive together go to the core in one ReceiveWebhooks call.

A unary gRPC call costs the core about as much CPU as the webhook it carries (measured:
~0.28 ms for a health check against ~0.5 ms for a whole webhook), so the gateway hands over
what it has in hand at once. Nothing waits on a timer: the requests read in one turn of the
event loop leave together at its end, so an idle gateway sends each webhook alone, as soon
as it is read. While `max_inflight` calls are out, newcomers queue and leave with the next
one (a slow core gets bigger batches, not more calls). A batch stays within one gRPC
message however large its bodies (a few near the 1 MiB limit would otherwise fail together).
Every sender still gets its own answer: the core checks and answers each item as
ReceiveWebhook would.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from ipaas.v1 import executions_pb2 as pb
from ipaas.wire import ITEM_FRAMING, MAX_MESSAGE_BYTES

MAX_BATCH = 512  # the core's limit per call
CLOSE_WAIT = 10.0


class OversizedDelivery(ValueError):
    """A webhook that would not fit a gRPC message even alone."""


class WebhookBatcher:
    def __init__(self, send: Callable[[pb.ReceiveWebhooksRequest], Awaitable[pb.ReceiveWebhooksResponse]], max_inflight: int = 4) -> None:
        self._send = send
        self._max_inflight = max_inflight
        self._pending: list[tuple[pb.WebhookDelivery, asyncio.Future[pb.WebhookResult], int]] = []  # with its size on the wire
        self._inflight = 0
        self._scheduled = False
        self._calls: set[asyncio.Task[None]] = set()

    async def submit(self, delivery: pb.WebhookDelivery) -> pb.WebhookResult:
        """The core's answer for this webhook; raises the call's error if the whole call failed,
        OversizedDelivery (sending nothing) if it cannot fit one call."""
        if (size := delivery.ByteSize() + ITEM_FRAMING) > MAX_MESSAGE_BYTES:
            # _take sends an item alone however large: the call would fail on the message
            # limit, and with it the sender's retries, forever.
            raise OversizedDelivery(f"{size - ITEM_FRAMING} bytes")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.WebhookResult] = loop.create_future()
        self._pending.append((delivery, future, size))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self._max_inflight:
            batch = self._take()
            self._inflight += 1
            task = asyncio.create_task(self._call(batch), name="ipaas-webhook-batch")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    def _take(self) -> list[tuple[pb.WebhookDelivery, asyncio.Future[pb.WebhookResult], int]]:
        """The next batch: at least one item, at most MAX_BATCH, within one message."""
        taken = size = 0
        for _, _, item_size in self._pending:
            size += item_size
            if taken and (taken == MAX_BATCH or size > MAX_MESSAGE_BYTES):
                break
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch

    async def _call(self, batch: list[tuple[pb.WebhookDelivery, asyncio.Future[pb.WebhookResult], int]]) -> None:
        try:
            reply = await self._send(pb.ReceiveWebhooksRequest(webhooks=[d for d, _, _ in batch]))
        except Exception as exc:  # every waiting sender hears of it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # cancelled: so are the senders waiting on this call
            for _, future, _ in batch:
                future.cancel()
            raise
        else:
            results: Any = reply.results
            if len(results) != len(batch):
                mismatch = RuntimeError(f"the core answered {len(results)} of {len(batch)} webhooks")
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(mismatch)
            else:
                for (_, future, _), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def close(self) -> None:
        """Wait for the calls already sent (their senders are still waiting for them)."""
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=CLOSE_WAIT)
