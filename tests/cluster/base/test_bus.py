from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable

import pytest

from radixserve.cluster.base.bus import (
    KV_EVENTS_TOPIC,
    REGISTRY_TOPIC,
    ChangeKind,
    EventBus,
    InProcessBus,
    Lost,
    RegistryChange,
    Subscription,
    WorkerRecord,
    make_bus,
)

TIMEOUT_S = 2.0
RECORD = WorkerRecord(worker_id="worker-0", address="127.0.0.1:7001", model="smollm2-135m-instruct",
                      incarnation="a1", max_running_requests=64, http_address="127.0.0.1:8001")


def run_with_bus(test: Callable[[EventBus], Awaitable[None]]) -> None:
    """Run ``test`` on a fresh in-process bus inside its own loop, bounded by a timeout, then close the bus."""
    async def main() -> None:
        bus = make_bus()
        try:
            await asyncio.wait_for(test(bus), TIMEOUT_S)
        finally:
            await bus.close()
    asyncio.run(main())


async def take(subscription: Subscription, count: int) -> list[bytes | Lost]:
    return [await anext(subscription) for _ in range(count)]


async def drain(subscription: Subscription) -> list[bytes | Lost]:
    """Everything the subscription holds until it is idle for a moment or ends."""
    items: list[bytes | Lost] = []
    while True:
        try:
            items.append(await asyncio.wait_for(anext(subscription), 0.05))
        except (TimeoutError, StopAsyncIteration):
            return items


def payloads(start: int, stop: int) -> list[bytes]:
    return [f"m{i}".encode() for i in range(start, stop)]


def test_make_bus_default_is_in_process_and_unknown_kind_is_refused() -> None:
    assert isinstance(make_bus(), InProcessBus)
    assert isinstance(make_bus("inprocess"), InProcessBus)
    with pytest.raises(ValueError, match=r"^bus: unknown kind 'redis'"):
        make_bus("redis")


def test_messages_arrive_in_order_and_only_those_published_after_subscribing() -> None:
    async def test(bus: EventBus) -> None:
        await bus.publish(KV_EVENTS_TOPIC, b"before")
        subscription = bus.subscribe(KV_EVENTS_TOPIC)
        for payload in payloads(0, 100):
            await bus.publish(KV_EVENTS_TOPIC, payload)
        assert await take(subscription, 100) == payloads(0, 100)
        assert await drain(subscription) == []
    run_with_bus(test)


def test_every_subscriber_of_a_topic_gets_every_message_and_topics_are_separate() -> None:
    async def test(bus: EventBus) -> None:
        subscriptions = [bus.subscribe("a") for _ in range(3)]
        other = bus.subscribe("b")
        for payload in payloads(0, 5):
            await bus.publish("a", payload)
        await bus.publish("b", b"only-b")
        for subscription in subscriptions:
            assert await take(subscription, 5) == payloads(0, 5)
        assert await drain(other) == [b"only-b"]
    run_with_bus(test)


def test_a_waiting_consumer_wakes_up_on_publish() -> None:
    async def test(bus: EventBus) -> None:
        subscription = bus.subscribe("a")
        waiter = asyncio.create_task(anext(subscription))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await bus.publish("a", b"x")
        assert await waiter == b"x"
    run_with_bus(test)


def test_overflow_drops_the_oldest_and_marks_the_gap_without_blocking_the_publisher() -> None:
    async def test(bus: EventBus) -> None:
        slow = bus.subscribe("a", max_pending=3)
        fast = bus.subscribe("a")
        for payload in payloads(0, 10):
            await asyncio.wait_for(bus.publish("a", payload), 0.1)
        assert await drain(slow) == [Lost(7), *payloads(7, 10)]
        assert await drain(fast) == payloads(0, 10)
    run_with_bus(test)


def test_the_lost_marker_stands_where_the_gap_is() -> None:
    async def test(bus: EventBus) -> None:
        subscription = bus.subscribe("a", max_pending=2)
        for payload in payloads(0, 2):
            await bus.publish("a", payload)
        assert await take(subscription, 1) == payloads(0, 1)
        for payload in payloads(2, 6):  # m1 and m2 and m3 are dropped
            await bus.publish("a", payload)
        assert await drain(subscription) == [Lost(3), *payloads(4, 6)]
        await bus.publish("a", b"m6")
        assert await drain(subscription) == [b"m6"]
    run_with_bus(test)


def test_max_pending_must_be_positive() -> None:
    async def test(bus: EventBus) -> None:
        with pytest.raises(ValueError, match=r"^max_pending: "):
            bus.subscribe("a", max_pending=0)
    run_with_bus(test)


def test_bad_topic_and_payload_are_refused() -> None:
    async def test(bus: EventBus) -> None:
        with pytest.raises(ValueError, match=r"^topic: "):
            bus.subscribe("")
        with pytest.raises(ValueError, match=r"^payload: "):
            await bus.publish("a", "text")  # type: ignore[arg-type]
    run_with_bus(test)


def test_closing_a_subscription_ends_a_waiting_iteration_and_stops_delivery() -> None:
    async def test(bus: EventBus) -> None:
        subscription = bus.subscribe("a")
        other = bus.subscribe("a")
        await bus.publish("a", b"unread")
        received: list[bytes | Lost] = []

        async def consume() -> None:
            async for item in subscription:
                received.append(item)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        subscription.close()
        await consumer
        await bus.publish("a", b"after")
        assert received == [b"unread"]
        assert await drain(subscription) == []
        assert await drain(other) == [b"unread", b"after"]
    run_with_bus(test)


def test_leaving_the_async_with_block_closes_the_subscription() -> None:
    async def test(bus: EventBus) -> None:
        async with bus.subscribe("a") as subscription:
            await bus.publish("a", b"inside")
            assert await take(subscription, 1) == [b"inside"]
        await bus.publish("a", b"outside")
        assert [item async for item in subscription] == []
    run_with_bus(test)


def test_closing_the_bus_ends_every_subscription_and_refuses_further_use() -> None:
    async def test() -> None:
        bus = InProcessBus()
        subscriptions = [bus.subscribe(topic) for topic in ("a", "a", "b")]
        consumers = [asyncio.create_task(drain_until_end(s)) for s in subscriptions]
        await asyncio.sleep(0.01)
        await bus.close()
        assert await asyncio.wait_for(asyncio.gather(*consumers), TIMEOUT_S) == [[], [], []]
        await bus.close()
        with pytest.raises(RuntimeError, match=r"^bus: closed"):
            bus.subscribe("a")
        for call in (bus.publish("a", b"x"), bus.announce(RECORD), bus.withdraw("w"), bus.members()):
            with pytest.raises(RuntimeError, match=r"^bus: closed"):
                await call

    async def drain_until_end(subscription: Subscription) -> list[bytes | Lost]:
        return [item async for item in subscription]

    asyncio.run(test())


def test_announce_and_withdraw_keep_the_registry_and_publish_each_change() -> None:
    async def test(bus: EventBus) -> None:
        changes = bus.subscribe(REGISTRY_TOPIC)
        other = dataclasses.replace(RECORD, worker_id="worker-1", address="127.0.0.1:7002")
        restarted = dataclasses.replace(RECORD, incarnation="b2")
        await bus.announce(RECORD)
        await bus.announce(other)
        await bus.announce(RECORD)  # unchanged: nothing published
        await bus.announce(restarted)
        assert await bus.members() == {"worker-0": restarted, "worker-1": other}
        await bus.withdraw("worker-1")
        await bus.withdraw("worker-1")  # unknown by now: nothing published
        assert await bus.members() == {"worker-0": restarted}
        received = [RegistryChange.from_bytes(item) for item in await drain(changes)]
        assert received == [RegistryChange(ChangeKind.JOINED, RECORD), RegistryChange(ChangeKind.JOINED, other),
                            RegistryChange(ChangeKind.UPDATED, restarted), RegistryChange(ChangeKind.LEFT, other)]
    run_with_bus(test)


def test_members_is_a_copy() -> None:
    async def test(bus: EventBus) -> None:
        await bus.announce(RECORD)
        (await bus.members()).clear()
        assert await bus.members() == {"worker-0": RECORD}
    run_with_bus(test)


def test_worker_record_round_trips_through_bytes() -> None:
    assert WorkerRecord.from_bytes(RECORD.to_bytes()) == RECORD
    ipv6 = dataclasses.replace(RECORD, address="[::1]:50051")
    assert WorkerRecord.from_bytes(ipv6.to_bytes()) == ipv6


def test_registry_change_round_trips_through_bytes() -> None:
    for kind in ChangeKind:
        change = RegistryChange(kind, RECORD)
        assert RegistryChange.from_bytes(change.to_bytes()) == change


BAD_RECORD_FIELDS = [
    ("worker_id", ""), ("worker_id", 3), ("model", ""), ("model", None), ("incarnation", ""),
    ("address", "127.0.0.1"), ("address", ":7001"), ("address", "host:0"), ("address", "host:65536"),
    ("address", "host:-1"), ("address", "host:port"), ("address", 7001),
    ("max_running_requests", 0), ("max_running_requests", 1.0), ("max_running_requests", True),
    ("max_running_requests", "64"), ("metrics_address", "127.0.0.1"), ("http_address", "127.0.0.1"),
    ("http_address", 8001),
]


@pytest.mark.parametrize(("field", "value"), BAD_RECORD_FIELDS)
def test_a_bad_record_field_is_named(field: str, value: object) -> None:
    values = dataclasses.asdict(RECORD) | {field: value}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        WorkerRecord(**values)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        WorkerRecord.from_bytes(json.dumps(values).encode())


def test_missing_unknown_and_malformed_record_fields_are_named() -> None:
    values = dataclasses.asdict(RECORD)
    with pytest.raises(ValueError, match=r"^model: missing"):
        WorkerRecord.from_bytes(json.dumps({k: v for k, v in values.items() if k != "model"}).encode())
    with pytest.raises(ValueError, match=r"^port: unknown field"):
        WorkerRecord.from_bytes(json.dumps(values | {"port": 1}).encode())
    with pytest.raises(ValueError, match=r"^worker_record: not valid JSON"):
        WorkerRecord.from_bytes(b"{")
    with pytest.raises(ValueError, match=r"^worker_record: must be a JSON object"):
        WorkerRecord.from_bytes(b"[]")


def test_a_bad_registry_change_names_the_field() -> None:
    record = dataclasses.asdict(RECORD)
    with pytest.raises(ValueError, match=r"^kind: "):
        RegistryChange.from_bytes(json.dumps({"kind": "crashed", "record": record}).encode())
    with pytest.raises(ValueError, match=r"^record\.address: "):
        RegistryChange.from_bytes(json.dumps({"kind": "left", "record": record | {"address": "x"}}).encode())
    with pytest.raises(ValueError, match=r"^record: must be an object"):
        RegistryChange.from_bytes(json.dumps({"kind": "left", "record": []}).encode())
    with pytest.raises(ValueError, match=r"^record: missing"):
        RegistryChange.from_bytes(json.dumps({"kind": "left"}).encode())
