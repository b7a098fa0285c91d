"""The gateway's webhook batcher: what arrives together leaves together, and every sender
gets its own item's answer (or the whole call's error)."""

from __future__ import annotations

import asyncio

import pytest

from ipaas.wire import MAX_MESSAGE_BYTES
from ipaas.gateway.webhook_batch import MAX_BATCH, OversizedDelivery, WebhookBatcher
from ipaas.v1 import executions_pb2 as pb


def delivery(n: int) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(webhook=pb.ReceiveWebhookRequest(workflow_id=f"wf_{n}"), request_id=f"r{n}")


class Core:
    """Answers each item with its workflow id, after `delay`; records every call."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.calls: list[list[str]] = []
        self.delay = delay
        self.fail = fail
        self.inflight = self.most_inflight = 0

    async def send(self, request: pb.ReceiveWebhooksRequest) -> pb.ReceiveWebhooksResponse:
        self.calls.append([d.webhook.workflow_id for d in request.webhooks])
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise self.fail
            return pb.ReceiveWebhooksResponse(results=[pb.WebhookResult(accepted=pb.ReceiveWebhookResponse(execution_id=d.webhook.workflow_id)) for d in request.webhooks])
        finally:
            self.inflight -= 1


async def test_webhooks_read_in_one_loop_turn_share_one_call() -> None:
    core = Core()
    batcher = WebhookBatcher(core.send)
    results = await asyncio.gather(*(batcher.submit(delivery(n)) for n in range(10)))
    assert [r.accepted.execution_id for r in results] == [f"wf_{n}" for n in range(10)]
    assert core.calls == [[f"wf_{n}" for n in range(10)]]


async def test_a_lone_webhook_leaves_at_once() -> None:
    core = Core()
    batcher = WebhookBatcher(core.send)
    assert (await asyncio.wait_for(batcher.submit(delivery(1)), 1)).accepted.execution_id == "wf_1"
    assert (await asyncio.wait_for(batcher.submit(delivery(2)), 1)).accepted.execution_id == "wf_2"
    assert core.calls == [["wf_1"], ["wf_2"]]


async def test_a_slow_core_gets_bigger_batches_not_more_calls() -> None:
    core = Core(delay=0.05)
    batcher = WebhookBatcher(core.send, max_inflight=2)
    waiting = []
    for n in range(12):
        waiting.append(asyncio.create_task(batcher.submit(delivery(n))))
        await asyncio.sleep(0.01)  # arrivals spread over ~2 core round trips
    results = await asyncio.gather(*waiting)
    assert [r.accepted.execution_id for r in results] == [f"wf_{n}" for n in range(12)]
    assert core.most_inflight == 2
    assert len(core.calls) < 12 and sorted(sum(core.calls, [])) == sorted(f"wf_{n}" for n in range(12))


async def test_batches_stay_within_the_cores_limit() -> None:
    core = Core()
    batcher = WebhookBatcher(core.send)
    await asyncio.gather(*(batcher.submit(delivery(n)) for n in range(MAX_BATCH + 5)))
    assert [len(c) for c in core.calls] == [MAX_BATCH, 5]


async def test_batches_stay_within_one_grpc_message() -> None:
    sizes: list[int] = []

    async def send(request: pb.ReceiveWebhooksRequest) -> pb.ReceiveWebhooksResponse:
        sizes.append(request.ByteSize())
        return pb.ReceiveWebhooksResponse(results=[pb.WebhookResult() for _ in request.webhooks])

    batcher = WebhookBatcher(send)
    body = b"x" * (1024 * 1024 - 100)  # near the gateway's webhook body limit
    big = [pb.WebhookDelivery(webhook=pb.ReceiveWebhookRequest(workflow_id=f"wf_{n}", http_body={"data": body}), request_id=f"r{n}") for n in range(9)]
    await asyncio.gather(*(batcher.submit(d) for d in big), *(batcher.submit(delivery(n)) for n in range(20)))
    assert all(size <= MAX_MESSAGE_BYTES for size in sizes) and len(sizes) >= 3, sizes
    assert sum(sizes) > 9 * len(body)


async def test_a_webhook_too_large_for_one_message_is_refused_not_sent() -> None:
    """Alone in its call it would still pass gRPC's limit: the call would fail (a 502 its
    sender retries forever), and the others that left with it would fail beside it."""
    core = Core()
    batcher = WebhookBatcher(core.send)
    headers = {f"x-pad-{n}": "a" * 100_000 for n in range(45)}  # 4.5 MB
    oversized = pb.WebhookDelivery(webhook=pb.ReceiveWebhookRequest(workflow_id="wf_big", headers=headers), request_id="r")
    refused, *others = await asyncio.gather(batcher.submit(oversized), batcher.submit(delivery(1)), batcher.submit(delivery(2)), return_exceptions=True)
    assert isinstance(refused, OversizedDelivery)
    assert [r.accepted.execution_id for r in others] == ["wf_1", "wf_2"]
    assert core.calls == [["wf_1", "wf_2"]]


async def test_a_failed_call_fails_each_of_its_senders() -> None:
    batcher = WebhookBatcher(Core(fail=ConnectionError("core gone")).send)
    outcomes = await asyncio.gather(*(batcher.submit(delivery(n)) for n in range(3)), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in outcomes)


async def test_a_sender_that_gives_up_does_not_disturb_the_others() -> None:
    core = Core(delay=0.05)
    batcher = WebhookBatcher(core.send)
    quitter = asyncio.create_task(batcher.submit(delivery(0)))
    stayer = asyncio.create_task(batcher.submit(delivery(1)))
    await asyncio.sleep(0.01)
    quitter.cancel()
    assert (await stayer).accepted.execution_id == "wf_1"
    with pytest.raises(asyncio.CancelledError):
        await quitter


async def test_an_answer_of_the_wrong_length_is_an_error_not_a_mix_up() -> None:
    async def short(request: pb.ReceiveWebhooksRequest) -> pb.ReceiveWebhooksResponse:
        return pb.ReceiveWebhooksResponse(results=[pb.WebhookResult()])

    batcher = WebhookBatcher(short)
    outcomes = await asyncio.gather(*(batcher.submit(delivery(n)) for n in range(2)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_a_cancelled_call_cancels_its_senders_instead_of_leaving_them_waiting() -> None:
    core = Core(delay=10)
    batcher = WebhookBatcher(core.send)
    sender = asyncio.create_task(batcher.submit(delivery(1)))
    await asyncio.sleep(0.01)
    for call in list(batcher._calls):
        call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(sender, 1)
