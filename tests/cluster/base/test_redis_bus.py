"""What only the Redis bus does: faults of a real redis-server (SIGKILL, restart on the same port), entries of a
foreign writer, several buses (as several processes) on one server; and ``LocalRedisServer``."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
from conditions import until
from redis_server import bus_config, fresh_redis, local_redis  # noqa: F401  (fixtures)

from radixserve.cluster.base.bus import (BusUnavailable, ChangeKind, Lost, RegistryChange, Subscription,
                                         WorkerRecord)
from radixserve.cluster.base.redis_bus import RedisBus
from radixserve.cluster.control.redis_server import LocalRedisServer

TIMEOUT_S = 10.0
RECORD = WorkerRecord(worker_id="worker-0", address="127.0.0.1:7001", model="m", incarnation="a1",
                      max_running_requests=8)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), TIMEOUT_S))


async def take(subscription: Subscription, count: int, timeout_s: float = 5.0) -> list[bytes | Lost]:
    return [await asyncio.wait_for(anext(subscription), timeout_s) for _ in range(count)]


async def nothing_within(subscription: Subscription, seconds: float) -> bool:
    try:
        item = await asyncio.wait_for(anext(subscription), seconds)
    except TimeoutError:
        return True
    print("unexpected:", item)
    return False


def test_a_killed_server_fails_calls_and_loses_followers_until_it_is_back(
        fresh_redis: LocalRedisServer) -> None:  # noqa: F811
    async def test() -> None:
        bus = RedisBus(bus_config(fresh_redis))
        try:
            await bus.append_kv("worker-0", b"before")
            follower = bus.follow_kv("worker-0")
            assert await take(follower, 1) == [b"before"]
            fresh_redis.kill()
            assert await take(follower, 1) == [Lost(0)]
            for call in (bus.members(), bus.append_kv("worker-0", b"x"), bus.kv_log_length("worker-0"),
                         bus.loads("worker"), bus.announce(RECORD)):
                with pytest.raises(BusUnavailable, match=r"^bus: Redis unavailable"):
                    await call
            assert not bus.connected
            fresh_redis.start()
            assert await bus.kv_log_length("worker-0") == 0  # persistence is off
            assert bus.connected
            await bus.append_kv("worker-0", b"after", snapshot=True)
            assert await take(bus.follow_kv("worker-0"), 1) == [b"after"]
            assert await take(follower, 1) == [b"after"]  # the old follower goes on after its last id
        finally:
            await bus.close()
    run(test)


def test_a_worker_that_announces_itself_again_across_a_restart_does_not_leave(
        fresh_redis: LocalRedisServer) -> None:  # noqa: F811
    async def test() -> None:
        bus = RedisBus(bus_config(fresh_redis, worker_ttl_s=1.0))
        watcher = bus.watch_registry()
        outcomes: list[str] = []  # each heartbeat's: "ok" or "unavailable"

        async def heartbeat() -> None:
            while True:
                try:
                    await bus.announce(RECORD, ttl_s=1.0)
                    outcomes.append("ok")
                except BusUnavailable:
                    outcomes.append("unavailable")
                await asyncio.sleep(0.25)  # the worker's heartbeat period (a quarter of its TTL)

        beating = asyncio.create_task(heartbeat())
        try:
            assert await take(watcher, 1) == [RegistryChange(ChangeKind.JOINED, RECORD).to_bytes()]
            fresh_redis.kill()
            await until(lambda: "unavailable" in outcomes, "a heartbeat to find the server down")
            fresh_redis.start()  # empty: the record is back at the next heartbeat
            missed = outcomes.index("unavailable")
            await until(lambda: "ok" in outcomes[missed:], "a heartbeat to reach the restarted server")
            assert await bus.members() == {"worker-0": RECORD}
            # Must wait out the grace (worker_ttl_s, 1 s) and a registry read: a watcher that counted the record
            # missing would report it left by then.
            assert await nothing_within(watcher, 1.5)
            assert await bus.members() == {"worker-0": RECORD}
        finally:
            beating.cancel()
            await bus.close()
    run(test)


def test_an_entry_without_a_batch_field_arrives_empty(local_redis: LocalRedisServer) -> None:  # noqa: F811
    config = bus_config(local_redis)
    with redis.Redis.from_url(local_redis.url) as foreign:
        foreign.xadd(f"{config.namespace}:kv:worker-0", {"other": b"x"})

    async def test() -> None:
        bus = RedisBus(config)
        try:
            await bus.append_kv("worker-0", b"ours")
            assert await take(bus.follow_kv("worker-0"), 2) == [b"", b"ours"]
        finally:
            await bus.close()
    run(test)


def test_a_follower_whose_position_was_trimmed_away_gets_lost(
        local_redis: LocalRedisServer) -> None:  # noqa: F811
    config = bus_config(local_redis)
    key = f"{config.namespace}:kv:worker-0"

    async def test() -> None:
        bus = RedisBus(config)
        try:
            await bus.append_kv("worker-0", b"a")
            follower = bus.follow_kv("worker-0")
            assert await take(follower, 1) == [b"a"]
            with redis.Redis.from_url(local_redis.url) as foreign:  # blocking: the bus's reader cannot run
                ids = [foreign.xadd(key, {"batch": payload}) for payload in (b"x1", b"x2", b"x3")]
                foreign.xtrim(key, minid=ids[-1], approximate=False)  # as a writer far ahead would
            received = await take(follower, 2)
            if received[0] == b"x1":  # a read already waiting got x1 before the trim
                received = received[1:] + await take(follower, 1)
            assert received == [Lost(0), b"x3"]
        finally:
            await bus.close()
    run(test)


def test_an_unreadable_record_is_skipped(local_redis: LocalRedisServer) -> None:  # noqa: F811
    config = bus_config(local_redis)
    with redis.Redis.from_url(local_redis.url) as foreign:
        foreign.set(f"{config.namespace}:worker:bad", b"{")
        foreign.sadd(f"{config.namespace}:workers", "bad")

    async def test() -> None:
        bus = RedisBus(config)
        try:
            await bus.announce(RECORD)
            assert await bus.members() == {"worker-0": RECORD}
        finally:
            await bus.close()
    run(test)


def test_two_buses_on_one_server_share_the_registry_the_logs_and_the_loads(
        local_redis: LocalRedisServer) -> None:  # noqa: F811
    config = bus_config(local_redis)

    async def test() -> None:
        worker, router = RedisBus(config), RedisBus(config)
        other_cluster = RedisBus(bus_config(local_redis))
        try:
            watcher = router.watch_registry()
            await worker.announce(RECORD, ttl_s=5.0)
            assert await take(watcher, 1) == [RegistryChange(ChangeKind.JOINED, RECORD).to_bytes()]
            assert await router.members() == {"worker-0": RECORD}
            follower = router.follow_kv("worker-0")
            await worker.append_kv("worker-0", b"s", snapshot=True)
            await worker.append_kv("worker-0", b"e")
            assert await take(follower, 2) == [b"s", b"e"]
            await worker.put_load("worker", "worker-0", b"load", ttl_s=5.0)
            assert await router.loads("worker") == {"worker-0": b"load"}
            changed = dataclasses.replace(RECORD, incarnation="b2")
            await worker.announce(changed)
            assert await take(watcher, 1) == [RegistryChange(ChangeKind.UPDATED, changed).to_bytes()]
            await worker.withdraw("worker-0")
            assert await take(watcher, 1) == [RegistryChange(ChangeKind.LEFT, changed).to_bytes()]
            assert await other_cluster.members() == {}  # another namespace
            assert await other_cluster.kv_log_length("worker-0") == 0
        finally:
            for bus in (worker, router, other_cluster):
                await bus.close()
    run(test)


def test_a_follower_on_another_connection_gets_each_append_before_the_next_is_made(
        local_redis: LocalRedisServer) -> None:  # noqa: F811
    """The follower's blocking read wakes up for every entry (the event lag is measured by bench/bench_routers.py)."""
    config = bus_config(local_redis)

    async def test() -> None:
        writer, reader = RedisBus(config), RedisBus(config)
        try:
            follower = reader.follow_kv("worker-0")
            for i in range(50):
                await writer.append_kv("worker-0", str(i).encode())
                assert await take(follower, 1) == [str(i).encode()]
        finally:
            await writer.close()
            await reader.close()
    run(test)


# ---- LocalRedisServer -------------------------------------------------------------------------------------


def test_the_server_restarts_on_its_port_and_stops(tmp_path: Path) -> None:
    server = LocalRedisServer(tmp_path)
    with server:
        port, pid = server.port, server.pid
        assert server.url == f"redis://127.0.0.1:{port}/0" and pid is not None
        server.kill()
        assert server.pid is None
        server.kill()  # not running: nothing to do
        server.start()
        assert server.port == port and server.pid != pid
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        with pytest.raises(RuntimeError, match=r"already running"):
            server.start()
    assert server.pid is None
    assert (tmp_path / "redis.log").exists()


def test_a_missing_binary_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^no-such-redis-server: not found; .*redis-server package"):
        LocalRedisServer(tmp_path, binary="no-such-redis-server")


def test_a_server_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with LocalRedisServer(tmp_path / "first") as first:
        taken = LocalRedisServer(tmp_path / "second", port=first.port)
        with pytest.raises(RuntimeError, match=r"^redis-server: exited with status"):
            taken.start()
        assert taken.pid is None
