"""The ``EventBus`` contract, run against both backends: ``InProcessBus`` and ``RedisBus`` on a real redis-server.

A shared bus learns registry changes by reading the registry, so changes arrive within a poll interval rather
than at once: each test waits for a change before making the next one. The Redis-only fault behaviour is in
test_redis_bus.py; the ``Subscription`` queue itself is tested directly, at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conditions import until
from redis_server import bus_config, local_redis  # noqa: F401  (a fixture)

from radixserve.cluster.base.bus import (ChangeKind, EventBus, InProcessBus, Lost, RegistryChange, Subscription,
                                         WorkerRecord)
from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.base.redis_bus import RedisBus
from radixserve.cluster.control.redis_server import LocalRedisServer

TIMEOUT_S = 5.0
WORKER_TTL_S = 0.4  # the Redis bus's grace before a missing record leaves, and its tombstones' life
SHORT_TTL_S = 0.3  # a record's TTL that a test waits out
RECORD = WorkerRecord(worker_id="worker-0", address="127.0.0.1:7001", model="smollm2-135m-instruct",
                      incarnation="a1", max_running_requests=64, http_address="127.0.0.1:8001")
OTHER = dataclasses.replace(RECORD, worker_id="worker-1", address="127.0.0.1:7002")


@dataclass
class Backend:
    """How to make a bus of one backend and how long to wait for it."""

    name: str
    make: Callable[[float], EventBus]  # worker_ttl_s -> a bus with a registry and logs of its own
    settle_s: float  # a change not seen within this is not coming

    def run(self, test: Callable[[EventBus], Awaitable[None]], worker_ttl_s: float = WORKER_TTL_S) -> None:
        """Run ``test`` on a new bus in its own loop, bounded by ``TIMEOUT_S``, then close the bus."""
        async def main() -> None:
            bus = self.make(worker_ttl_s)
            try:
                await asyncio.wait_for(test(bus), TIMEOUT_S)
            finally:
                await bus.close()
        asyncio.run(main())


def _redis_backend(server: LocalRedisServer) -> Backend:
    return Backend("redis", lambda worker_ttl_s: RedisBus(bus_config(server, worker_ttl_s=worker_ttl_s)),
                   settle_s=0.4)


@pytest.fixture(params=["inprocess", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "inprocess":
        return Backend("inprocess", lambda _: InProcessBus(), settle_s=0.05)
    return _redis_backend(request.getfixturevalue("local_redis"))


async def take(subscription: Subscription, count: int) -> list[bytes | Lost]:
    return [await asyncio.wait_for(anext(subscription), TIMEOUT_S) for _ in range(count)]


async def changes(subscription: Subscription, count: int) -> list[RegistryChange]:
    return [RegistryChange.from_bytes(item) for item in await take(subscription, count)]  # type: ignore[arg-type]


async def drain(subscription: Subscription, idle_s: float) -> list[bytes | Lost]:
    """Everything the subscription holds until it is idle for ``idle_s`` or ends."""
    items: list[bytes | Lost] = []
    while True:
        try:
            items.append(await asyncio.wait_for(anext(subscription), idle_s))
        except (TimeoutError, StopAsyncIteration):
            return items


def payloads(start: int, stop: int) -> list[bytes]:
    return [f"m{i}".encode() for i in range(start, stop)]


# ---- registry ---------------------------------------------------------------------------------------------


def test_announce_and_withdraw_publish_joined_updated_and_left(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        watcher = bus.watch_registry()
        restarted = dataclasses.replace(RECORD, incarnation="b2")
        await bus.announce(RECORD)
        assert await changes(watcher, 1) == [RegistryChange(ChangeKind.JOINED, RECORD)]
        await bus.announce(OTHER)
        assert await changes(watcher, 1) == [RegistryChange(ChangeKind.JOINED, OTHER)]
        await bus.announce(RECORD)  # unchanged: only renewed, so the next change is the update
        await bus.announce(restarted)
        assert await changes(watcher, 1) == [RegistryChange(ChangeKind.UPDATED, restarted)]
        assert await bus.members() == {"worker-0": restarted, "worker-1": OTHER}
        await bus.withdraw("worker-1")
        assert await changes(watcher, 1) == [RegistryChange(ChangeKind.LEFT, OTHER)]
        await bus.withdraw("worker-1")  # unknown by now
        await bus.announce(restarted)
        assert await drain(watcher, backend.settle_s) == []
        assert await bus.members() == {"worker-0": restarted}
    backend.run(test)


def test_members_is_a_copy(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        assert await bus.members() == {}
        await bus.announce(RECORD)
        (await bus.members()).clear()
        assert await bus.members() == {"worker-0": RECORD}
    backend.run(test)


def test_a_renewal_replaces_the_expiry_and_a_record_that_is_not_renewed_leaves(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        watcher = bus.watch_registry()
        await bus.announce(RECORD, ttl_s=SHORT_TTL_S)
        await bus.announce(RECORD, ttl_s=30.0)  # a heartbeat, at once: the short expiry no longer applies
        await bus.announce(OTHER)  # no TTL: stays
        assert {c.record for c in await changes(watcher, 2)} == {RECORD, OTHER}
        # Must wait out the short TTL (and the Redis bus's grace): a record it still governed would leave by then.
        assert await drain(watcher, SHORT_TTL_S + backend.settle_s) == []
        await bus.announce(RECORD, ttl_s=SHORT_TTL_S)  # the last renewal
        assert await changes(watcher, 1) == [RegistryChange(ChangeKind.LEFT, RECORD)]
        assert await bus.members() == {"worker-1": OTHER}
    backend.run(test)


def test_a_withdrawn_worker_leaves_at_once_even_with_a_long_ttl(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        watcher = bus.watch_registry()
        await bus.announce(RECORD, ttl_s=30.0)
        await changes(watcher, 1)
        await bus.withdraw(RECORD.worker_id)
        # The whole test is bounded by TIMEOUT_S, below the 10 s grace and the 30 s TTL: only the withdrawal
        # can make it leave in time.
        assert await changes(watcher, 1) == [RegistryChange(ChangeKind.LEFT, RECORD)]
        assert await bus.members() == {}
    backend.run(test, worker_ttl_s=10.0)


def test_two_watchers_see_the_same_changes(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        first, second = bus.watch_registry(), bus.watch_registry()
        await bus.announce(RECORD)
        joined = [RegistryChange(ChangeKind.JOINED, RECORD)]
        assert (await changes(first, 1), await changes(second, 1)) == (joined, joined)
        await bus.withdraw(RECORD.worker_id)
        left = [RegistryChange(ChangeKind.LEFT, RECORD)]
        assert (await changes(first, 1), await changes(second, 1)) == (left, left)
    backend.run(test)


# ---- KV event logs ----------------------------------------------------------------------------------------


def test_a_follower_gets_the_retained_entries_then_the_live_ones_in_order(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        for payload in payloads(0, 5):
            await bus.append_kv("worker-0", payload)
        follower = bus.follow_kv("worker-0")
        assert await take(follower, 5) == payloads(0, 5)
        for payload in payloads(5, 50):
            await bus.append_kv("worker-0", payload)
        assert await take(follower, 45) == payloads(5, 50)
        await bus.append_kv("worker-1", b"elsewhere")
        assert await drain(follower, backend.settle_s) == []
    backend.run(test)


def test_live_batches_appended_in_one_call_arrive_in_order_after_a_snapshot(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        await bus.append_kv("worker-0", b"snapshot", snapshot=True)
        follower = bus.follow_kv("worker-0")
        await bus.append_kv_live("worker-0", payloads(0, 20))
        await bus.append_kv_live("worker-0", [])
        await bus.append_kv_live("worker-0", payloads(20, 25))
        assert await take(follower, 26) == [b"snapshot", *payloads(0, 25)]
        assert await bus.kv_log_length("worker-0") == 26
        with pytest.raises(ValueError, match="^payload"):
            await bus.append_kv_live("worker-0", [b"ok", "text"])  # type: ignore[list-item]
    backend.run(test)


def test_a_snapshot_lets_the_log_drop_what_precedes_the_previous_snapshot(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        await bus.append_kv("worker-0", b"a")
        await bus.append_kv("worker-0", b"s1", snapshot=True)  # the first snapshot drops nothing
        await bus.append_kv("worker-0", b"b")
        assert await bus.kv_log_length("worker-0") == 3
        await bus.append_kv("worker-0", b"s2", snapshot=True)  # keeps from s1 on
        await bus.append_kv("worker-0", b"c")
        assert await take(bus.follow_kv("worker-0"), 4) == [b"s1", b"b", b"s2", b"c"]
        assert await bus.kv_log_length("worker-0") == 4
    backend.run(test)


def _retained(snapshots: list[bool]) -> list[bytes]:
    """The model: append i is ``b"<i>"``; the log keeps everything from the second-to-last snapshot on."""
    marks = [i for i, snapshot in enumerate(snapshots) if snapshot]
    start = marks[-2] if len(marks) >= 2 else 0
    return [str(i).encode() for i in range(start, len(snapshots))]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(snapshots=st.lists(st.booleans(), max_size=20))
def test_a_new_follower_gets_exactly_what_the_model_retains(backend: Backend, snapshots: list[bool]) -> None:
    async def test(bus: EventBus) -> None:
        for i, snapshot in enumerate(snapshots):
            await bus.append_kv("worker-0", str(i).encode(), snapshot=snapshot)
        expected = _retained(snapshots)
        assert await bus.kv_log_length("worker-0") == len(expected)
        assert await take(bus.follow_kv("worker-0"), len(expected)) == expected
    backend.run(test)


def test_every_follower_gets_every_entry_and_a_closed_one_is_forgotten(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        first, second = bus.follow_kv("worker-0"), bus.follow_kv("worker-0")
        for payload in payloads(0, 3):
            await bus.append_kv("worker-0", payload)
        assert await take(first, 3) == payloads(0, 3)
        assert await take(second, 3) == payloads(0, 3)
        first.close()
        late = bus.follow_kv("worker-0")
        await bus.append_kv("worker-0", b"m3")
        assert await take(second, 1) == [b"m3"]
        assert await take(late, 4) == payloads(0, 4)
        assert [item async for item in first] == []
    backend.run(test)


def test_leaving_the_async_with_block_closes_the_follower(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        async with bus.follow_kv("worker-0") as follower:
            await bus.append_kv("worker-0", b"inside")
            assert await take(follower, 1) == [b"inside"]
        await bus.append_kv("worker-0", b"outside")
        assert [item async for item in follower] == []
    backend.run(test)


def test_kv_log_length_counts_the_retained_entries(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        assert await bus.kv_log_length("never-written") == 0
        for payload in payloads(0, 7):
            await bus.append_kv("worker-0", payload)
        assert await bus.kv_log_length("worker-0") == 7
        assert await bus.kv_log_length("worker-1") == 0
    backend.run(test)


# ---- route log --------------------------------------------------------------------------------------------


def test_a_route_follower_gets_every_entry_appended_after_it_started_in_order_and_none_before(
        backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        await bus.append_routes(b"before")
        first = await bus.follow_routes()
        for payload in payloads(0, 30):
            await bus.append_routes(payload)
        second = await bus.follow_routes()
        await bus.append_routes(b"m30")
        assert await take(first, 31) == payloads(0, 31)
        assert await take(second, 1) == [b"m30"]
        first.close()
        await bus.append_routes(b"m31")
        assert await take(second, 1) == [b"m31"]
        assert [item async for item in first] == []
        await bus.append_kv("worker-0", b"a batch")
        assert await drain(second, backend.settle_s) == []
    backend.run(test)


# ---- load -------------------------------------------------------------------------------------------------


def test_load_documents_are_replaced_kept_apart_by_kind_and_expire(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        assert await bus.loads("worker") == {}
        await bus.put_load("worker", "worker-0", b"old", ttl_s=10.0)
        await bus.put_load("worker", "worker-0", b"new", ttl_s=10.0)
        await bus.put_load("worker", "worker-1", b"short", ttl_s=0.1)
        await bus.put_load("router", "router-0", b"r", ttl_s=10.0)
        assert await bus.loads("worker") == {"worker-0": b"new", "worker-1": b"short"}
        assert await bus.loads("router") == {"router-0": b"r"}
        async def expired() -> bool:
            return await bus.loads("worker") == {"worker-0": b"new"}
        await until(expired, "worker-1's document to expire")
        await bus.put_load("worker", "worker-1", b"back", ttl_s=10.0)
        assert await bus.loads("worker") == {"worker-0": b"new", "worker-1": b"back"}
    backend.run(test)


# ---- arguments and closing --------------------------------------------------------------------------------

BAD_CALLS: list[tuple[str, Callable[[EventBus], object]]] = [
    ("record", lambda bus: bus.announce("worker-0")),  # type: ignore[arg-type]
    ("ttl_s", lambda bus: bus.announce(RECORD, ttl_s=0)),
    ("ttl_s", lambda bus: bus.announce(RECORD, ttl_s=True)),  # type: ignore[arg-type]
    ("worker_id", lambda bus: bus.withdraw("")),
    ("worker_id", lambda bus: bus.append_kv("", b"x")),
    ("payload", lambda bus: bus.append_kv("worker-0", "text")),  # type: ignore[arg-type]
    ("worker_id", lambda bus: bus.follow_kv("")),
    ("max_pending", lambda bus: bus.follow_kv("worker-0", max_pending=0)),
    ("max_pending", lambda bus: bus.watch_registry(max_pending=0)),
    ("worker_id", lambda bus: bus.kv_log_length(3)),  # type: ignore[arg-type]
    ("kind", lambda bus: bus.put_load("pool", "p", b"x", 1.0)),
    ("name", lambda bus: bus.put_load("worker", "", b"x", 1.0)),
    ("payload", lambda bus: bus.put_load("worker", "w", None, 1.0)),  # type: ignore[arg-type]
    ("ttl_s", lambda bus: bus.put_load("worker", "w", b"x", -1.0)),
    ("kind", lambda bus: bus.loads("workers")),
    ("payload", lambda bus: bus.append_routes("text")),  # type: ignore[arg-type]
    ("max_pending", lambda bus: bus.follow_routes(max_pending=0)),
]


@pytest.mark.parametrize(("field", "call"), BAD_CALLS, ids=[f"{i}-{field}" for i, (field, _) in enumerate(BAD_CALLS)])
def test_a_bad_argument_is_refused_naming_it(backend: Backend, field: str, call: Callable[[EventBus], object]) -> None:
    async def test(bus: EventBus) -> None:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            result = call(bus)
            if asyncio.iscoroutine(result):
                await result
    backend.run(test)


def test_closing_the_bus_ends_every_subscription_and_refuses_further_use(backend: Backend) -> None:
    async def test(bus: EventBus) -> None:
        subscriptions = [bus.watch_registry(), bus.follow_kv("worker-0"), bus.follow_kv("worker-1"),
                         await bus.follow_routes()]
        consumers = [asyncio.create_task(drain(s, TIMEOUT_S)) for s in subscriptions]
        await asyncio.sleep(0)  # one turn of the loop: each consumer runs up to its wait for a message
        assert not any(consumer.done() for consumer in consumers)
        await bus.close()
        assert await asyncio.gather(*consumers) == [[], [], [], []]
        await bus.close()
        for call in (bus.watch_registry, lambda: bus.follow_kv("worker-0")):
            with pytest.raises(RuntimeError, match=r"^bus: closed"):
                call()
        for coroutine in (bus.announce(RECORD), bus.withdraw("w"), bus.members(), bus.append_kv("w", b"x"),
                          bus.kv_log_length("w"), bus.put_load("worker", "w", b"x", 1.0), bus.loads("worker"),
                          bus.append_routes(b"x"), bus.follow_routes()):
            with pytest.raises(RuntimeError, match=r"^bus: closed"):
                await coroutine
    backend.run(test)


def test_make_bus_picks_the_backend(local_redis: LocalRedisServer) -> None:  # noqa: F811
    assert isinstance(make_bus(), InProcessBus)
    assert not make_bus().shared
    with pytest.raises(ValueError, match=r"^bus\.url: "):
        make_bus(BusConfig(backend="redis"))
    bus = make_bus(bus_config(local_redis))
    assert isinstance(bus, RedisBus) and bus.shared and bus.connected
    asyncio.run(bus.close())


# ---- records and changes ----------------------------------------------------------------------------------


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


# ---- the Subscription queue (what every backend feeds) ----------------------------------------------------


def _subscription(max_pending: int = 100) -> Subscription:
    return Subscription("t", max_pending, lambda _: None)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), TIMEOUT_S))


def test_a_waiting_consumer_wakes_up_on_push() -> None:
    async def test() -> None:
        subscription = _subscription()
        waiter = asyncio.create_task(anext(subscription))
        await asyncio.sleep(0)  # one turn of the loop: the waiter runs up to its wait
        assert not waiter.done()
        subscription.push(b"x")
        assert await waiter == b"x"
    run(test)


def test_overflow_drops_the_oldest_and_marks_the_gap_where_it_is() -> None:
    async def test() -> None:
        subscription = _subscription(max_pending=2)
        for payload in payloads(0, 2):
            subscription.push(payload)
        assert await take(subscription, 1) == payloads(0, 1)
        for payload in payloads(2, 6):  # m1, m2 and m3 are dropped
            subscription.push(payload)
        assert await drain(subscription, 0.01) == [Lost(3), *payloads(4, 6)]
        subscription.push(b"m6")
        assert await drain(subscription, 0.01) == [b"m6"]
    run(test)


def test_mark_lost_drops_the_unread_messages_into_one_lost_before_the_next() -> None:
    async def test() -> None:
        subscription = _subscription()
        subscription.mark_lost()
        assert await drain(subscription, 0.01) == [Lost(0)]
        for payload in payloads(0, 3):
            subscription.push(payload)
        assert await take(subscription, 1) == payloads(0, 1)
        subscription.mark_lost()
        subscription.push(b"after")
        assert await drain(subscription, 0.01) == [Lost(2), b"after"]
    run(test)


def test_closing_a_subscription_ends_a_waiting_iteration_and_discards_what_is_unread() -> None:
    async def test() -> None:
        closed: list[Subscription] = []
        subscription = Subscription("t", 10, closed.append)
        subscription.push(b"read")
        received: list[bytes | Lost] = []

        async def consume() -> None:
            async for item in subscription:
                received.append(item)

        consumer = asyncio.create_task(consume())
        while not received:  # the consumer has read b"read" and waits for the next (TIMEOUT_S bounds it)
            await asyncio.sleep(0)  # one turn of the loop
        subscription.push(b"unread")
        subscription.close()
        subscription.close()
        await consumer
        subscription.push(b"after")
        subscription.mark_lost()
        assert received == [b"read"]
        assert closed == [subscription]
        assert await drain(subscription, 0.01) == []
    run(test)
