"""Several routers on one real redis-server: one view of the workers' caches, shared load, faults survived.

Tiny engines and routers in this process, each with its own Redis connection (as separate processes would
have); the server is a real ``redis-server`` that the fault tests kill with SIGKILL and start again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import grpc
import httpx
import pytest
from conditions import until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_cluster import RouterHandle, redis_cluster
from redis_server import fresh_redis  # noqa: F401  (a fixture)

from radixserve.cluster.base.bus import WorkerRecord
from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.control.redis_server import LocalRedisServer
from radixserve.router.server import Router
from radixserve.v1 import api_pb2, types_pb2, worker_pb2
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

TIMEOUT_S = 30.0
PAGE = 4  # the fixture's page size


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)



def run(main) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(main(), 240))


def prompt(group: int, question: int, prefix_pages: int = 10, suffix_len: int = 6) -> list[int]:
    """A prompt of ``group``'s shared prefix (``prefix_pages`` whole pages) and a question of its own."""
    rng = random.Random(group)
    prefix = [rng.randrange(5, 300) for _ in range(prefix_pages * PAGE)]
    return prefix + [(7 * question + j) % 290 + 5 for j in range(suffix_len)]


def request(token_ids: Sequence[int], max_tokens: int = 3) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=list(token_ids)), sampling=types_pb2.SamplingOptions(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def workload(num_groups: int, per_group: int, seed: int = 0) -> list[list[int]]:
    """Shared-prefix requests: every group's questions, interleaved in a seeded order."""
    order = [(g, q) for g in range(num_groups) for q in range(per_group)]
    random.Random(seed).shuffle(order)
    return [prompt(g, q) for g, q in order]


async def send_all(handles: Sequence[RouterHandle], prompts: Sequence[list[int]],
                   concurrency: int = 2) -> list[api_pb2.CompleteResponse]:
    """Send every prompt, request i through router ``i % len(handles)``, ``concurrency`` at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, ids: list[int]) -> api_pb2.CompleteResponse:
        async with limit:
            return await handles[i % len(handles)].stub.Complete(request(ids), timeout=TIMEOUT_S)

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))


def hit_ratio(replies: Sequence[api_pb2.CompleteResponse]) -> float:
    return sum(r.usage.cached_tokens for r in replies) / sum(r.usage.prompt_tokens for r in replies)


def test_two_routers_taking_turns_hit_the_cache_as_one_router_does_and_their_indexes_equal_the_trees(
        checkpoint: Checkpoint, fresh_redis: LocalRedisServer) -> None:
    prompts = workload(num_groups=6, per_group=24)

    async def measure(num_routers: int, namespace: str) -> float:
        async with redis_cluster(checkpoint, fresh_redis.url, num_routers=num_routers,
                                 bus=lambda c: _namespaced(c, namespace)) as c:
            replies = await send_all(c.routers, prompts)
            await c.indexes_equal_trees()
            return hit_ratio(replies)

    async def main() -> None:
        one, two = await measure(1, "one"), await measure(2, "two")
        print(f"hit ratio: one router {one:.3f}, two routers {two:.3f}")
        assert abs(one - two) <= 0.02
        assert two > 0.5  # the workload shares most of every prompt
    run(main)


def _namespaced(config: BusConfig, namespace: str) -> BusConfig:
    return dataclasses.replace(config, namespace=namespace)


async def _health(handle: RouterHandle) -> int:
    stub = health_pb2_grpc.HealthStub(handle.channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)).status


def test_a_late_replica_warms_from_the_logs_and_its_first_requests_of_cached_prefixes_hit(
        checkpoint: Checkpoint, fresh_redis: LocalRedisServer) -> None:
    groups = range(8)

    async def main() -> None:
        async with redis_cluster(checkpoint, fresh_redis.url, num_routers=1, num_pages=1024,
                                 bus=lambda c: _snapshots_every(c, 16)) as c:
            prompts = [prompt(g, q) for q, g in itertools.product(range(63), groups)][:500]
            replies = await send_all(c.routers, prompts, concurrency=4)
            assert len(replies) == 500
            late = await c.add_router()
            assert await _health(late) == health_pb2.HealthCheckResponse.SERVING
            assert late.router.workers.warm
            first = [await late.stub.Complete(request(prompt(g, 1000 + i)), timeout=TIMEOUT_S)
                     for i, g in zip(range(20), itertools.cycle(groups))]
            cached = [r.usage.cached_tokens for r in first]
            print(f"the late replica's first 20 requests: cached tokens {cached}")
            assert all(n >= 10 * PAGE for n in cached), cached  # each its group's whole prefix
    run(main)


def _sample(handle: RouterHandle, name: str, **labels: str) -> float:
    value = handle.router.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_late_replica_counts_event_lag_only_for_batches_sent_after_it_began_reading_the_logs(
        checkpoint: Checkpoint, fresh_redis: LocalRedisServer) -> None:
    lag_count = "radixserve_router_kv_event_lag_seconds_count"

    async def main() -> None:
        async with redis_cluster(checkpoint, fresh_redis.url, num_routers=1) as c:
            first = c.routers[0]
            await send_all(c.routers, workload(num_groups=3, per_group=4))
            await c.indexes_equal_trees()  # every batch is in the logs: none is on its way
            late = await c.add_router()
            assert _sample(late, "radixserve_router_kv_events_total", worker="w0") + _sample(
                late, "radixserve_router_kv_events_total", worker="w1") > 0  # it did read the history
            assert _sample(late, lag_count) == 0
            counted_before = _sample(first, lag_count)
            await send_all([late], [prompt(g, 100 + q) for g in range(3) for q in range(2)])  # new pages
            await c.indexes_equal_trees()
            assert _sample(late, lag_count) == _sample(first, lag_count) - counted_before > 0  # the same batches
    run(main)


def _routes(config: BusConfig, share_routes: bool, namespace: str) -> BusConfig:
    return dataclasses.replace(config, share_routes=share_routes, namespace=namespace)


def test_a_replica_sends_a_prefix_another_replica_is_still_prefilling_to_the_same_worker(
        checkpoint: Checkpoint, fresh_redis: LocalRedisServer) -> None:
    """The first request of a group is held before its prefill (no KV event yet); the second goes through the
    other replica. With shared routes it follows the first; without, that replica sees only the first's load
    and sends it to the idle worker, which prefills the prefix again."""

    async def workers_of_two(share_routes: bool) -> tuple[str, str]:
        namespace = f"routes-{share_routes}"
        async with redis_cluster(checkpoint, fresh_redis.url,
                                 bus=lambda c: _routes(c, share_routes, namespace)) as c:
            first_router, second_router = c.routers
            for engine in c.engines:
                engine.gate.clear()
            first = asyncio.ensure_future(first_router.stub.Complete(request(prompt(0, 0)), timeout=TIMEOUT_S))
            peers = second_router.router.workers.clients.values()
            await until(lambda: sum(p.peer_load.num_requests for p in peers) == 1, "the first request's load")
            if share_routes:
                await until(lambda: _sample(second_router, "radixserve_router_route_hints_total",
                                            outcome="applied") == 1, "the first request's route hint")
            second = asyncio.ensure_future(second_router.stub.Complete(request(prompt(0, 1)), timeout=TIMEOUT_S))
            await until(lambda: second_router.router.core.num_in_flight == 1, "the second request routed")
            for engine in c.engines:
                engine.gate.set()
            return (await first).worker_id, (await second).worker_id

    async def main() -> None:
        shared = await workers_of_two(share_routes=True)
        alone = await workers_of_two(share_routes=False)
        print(f"workers of the group's two requests: routes shared {shared}, not shared {alone}")
        assert shared[0] == shared[1]
        assert alone[0] != alone[1]
    run(main)


def _snapshots_every(config: BusConfig, num_batches: int) -> BusConfig:
    return dataclasses.replace(config, snapshot_interval_batches=num_batches)


def test_a_router_reports_not_serving_until_every_worker_log_has_given_it_a_snapshot(
        checkpoint: Checkpoint, fresh_redis: LocalRedisServer) -> None:
    async def main() -> None:
        async with redis_cluster(checkpoint, fresh_redis.url, num_routers=1) as c:
            bus, router_bus = make_bus(c.bus_config), make_bus(c.bus_config)
            w0 = c.servers[0]
            silent = WorkerRecord("w-silent", w0.address, "tiny", w0.incarnation, 64)
            await bus.announce(silent, ttl_s=60)  # answers GetInfo (w0 does) but has written no log
            router = Router(dataclasses.replace(c.router_config, http_port=0), router_bus, router_id="router-late",
                            bus_config=c.bus_config)
            starting = asyncio.create_task(router.start(warm_timeout_s=60))
            clients = router.workers.clients
            try:
                await until(lambda: router.http_address is not None, "the router to listen")
                # Everything but w-silent's snapshot is there: a router that did not wait for it would be ready.
                await until(lambda: {"w0", "w1", "w-silent"} <= clients.keys()
                            and clients["w0"].events_live and clients["w1"].events_live,
                            "the other workers' snapshots")
                async with grpc.aio.insecure_channel(router.address) as channel, httpx.AsyncClient() as http:
                    health = health_pb2_grpc.HealthStub(channel)
                    for _ in range(3):
                        # Must wait out a few health intervals (0.05 s): readiness must not come with time.
                        await asyncio.sleep(0.1)
                        check = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
                        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
                        assert (await http.get(f"{router.http_url}/health")).status_code == 503
                        assert not starting.done()
                    snapshot = worker_pb2.KvEventBatch(worker_id="w-silent", incarnation=w0.incarnation,
                                                       sequence=0, reset=True)
                    await bus.append_kv("w-silent", snapshot.SerializeToString(), snapshot=True)
                    await asyncio.wait_for(starting, TIMEOUT_S)
                    check = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
                    assert check.status == health_pb2.HealthCheckResponse.SERVING
                    assert (await http.get(f"{router.http_url}/health")).status_code == 200
            finally:
                await asyncio.wait_for(starting, TIMEOUT_S)
                await router.stop()
                await bus.withdraw("w-silent")
                await bus.close()
                await router_bus.close()
    run(main)


def test_redis_killed_under_load_for_longer_than_the_workers_ttl_fails_no_request_and_the_indexes_catch_up(
        checkpoint: Checkpoint, fresh_redis: LocalRedisServer) -> None:
    async def main() -> None:
        async with redis_cluster(checkpoint, fresh_redis.url, num_routers=2, num_pages=1024) as c:
            outcomes: list[str] = []
            stop = asyncio.Event()

            async def load() -> None:
                for i in itertools.count():
                    if stop.is_set() or i >= 5000:
                        return
                    handle = c.routers[i % 2]
                    try:
                        await handle.stub.Complete(request(prompt(i % 6, i)), timeout=TIMEOUT_S)
                        outcomes.append("ok")
                    except grpc.aio.AioRpcError as error:
                        outcomes.append(error.code().name)

            clients = [asyncio.create_task(load()) for _ in range(3)]
            await until(lambda: len(outcomes) >= 20, "requests before the kill", TIMEOUT_S)
            fresh_redis.kill()
            killed_at = len(outcomes)
            await until(lambda: all(h.router.workers.shared_load.stale for h in c.routers),
                        "the routers to see their load exchange fail", TIMEOUT_S)
            await until(lambda: len(outcomes) >= killed_at + 20, "requests while Redis is down", TIMEOUT_S)
            # Must wait out the workers' TTL: an outage longer than it must not drop them from the registry.
            await asyncio.sleep(c.bus_config.worker_ttl_s)
            during = len(outcomes) - killed_at
            fresh_redis.start()
            restarted_at = len(outcomes)
            await until(lambda: not any(h.router.workers.shared_load.stale for h in c.routers),
                        "the routers to exchange load again", TIMEOUT_S)
            await until(lambda: len(outcomes) >= restarted_at + 20, "requests after the restart", TIMEOUT_S)
            stop.set()
            await asyncio.gather(*clients)
            await c.indexes_equal_trees()
            failed = [o for o in outcomes if o != "ok"]
            print(f"{len(outcomes)} requests, {during} while Redis was down, {len(failed)} failed")
            assert not failed
    run(main)


def test_routers_and_workers_on_redis_leave_no_task_running_once_stopped(checkpoint: Checkpoint,
                                                                         fresh_redis: LocalRedisServer) -> None:
    """Their load exchange, log readers and publishers retry on BusUnavailable; stopping must end every one of
    them even when their cancellation does not reach them (before the fix, about one cluster in seven left its
    load exchange running after the router had stopped)."""
    async def main() -> None:
        before = asyncio.all_tasks()  # this test's own
        for i in range(12):
            async with redis_cluster(checkpoint, fresh_redis.url, num_routers=2,
                                     bus=lambda c: _namespaced(c, f"cycle-{i}")) as c:
                await send_all(c.routers, workload(6, 8))
            left = await _tasks_left(before, within_s=2.0)
            assert left == [], f"cycle {i}: still running after the cluster stopped: {left}"
    run(main)


async def _tasks_left(before: set[asyncio.Task[object]], within_s: float) -> list[str]:
    """The tasks of this loop not in ``before`` still running after ``within_s``, by coroutine."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        left = [t for t in asyncio.all_tasks() if t not in before and not t.done()]
        if not left or asyncio.get_running_loop().time() > deadline:
            return sorted(t.get_coro().__qualname__ for t in left)
        await asyncio.sleep(0.05)  # the poll interval
