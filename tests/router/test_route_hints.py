"""Route hints between router replicas (``router.route_hints``) over one bus: what one replica routes, the
others' indexes credit; what it withdraws, they drop; their own, unknown workers' and malformed entries are
skipped. In process (the Redis bus's route log is held to the same contract in tests/cluster/base/test_bus.py,
and two replicas on a real Redis in tests/router/test_routers_redis.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from conditions import until
from prometheus_client import CollectorRegistry

from radixserve.cluster.base.bus import InProcessBus
from radixserve.router.metrics import RouterMetrics
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.route_hints import MAX_QUEUED_HINTS, RouteHints
from radixserve.v1 import router_pb2

PROMPT = [11, 12, 13, 14]
WORKERS = ("w0", "w1")
PROBE_HASH = 1000  # probes credit w0 with pages from here on, which no test prompt has


class Replica:
    def __init__(self, bus: InProcessBus, name: str) -> None:
        self.index = PrefixIndex(pending_ttl_s=30.0, approx_ttl_s=30.0)
        self.metrics = RouterMetrics(CollectorRegistry(), "prefix")
        self.hints = RouteHints(bus, name, self.index, {"w0", "w1"}, self.metrics.route_hints)
        self.num_probes_applied = 0.0

    def matched(self) -> dict[str, int]:
        return self.index.match(PROMPT, WORKERS)

    def count(self, outcome: str) -> float:
        """Hints counted with ``outcome``, the probes of ``following`` left out."""
        value = self.metrics.registry.get_sample_value("radixserve_router_route_hints_total", {"outcome": outcome})
        probes = self.num_probes_applied if outcome == "applied" else 0.0
        return (0.0 if value is None else value) - probes


async def following(bus: InProcessBus, running: list[Replica]) -> None:
    """Return once every replica follows the route log (which delivers only what is appended after that): each
    has applied a probe entry. In order, so once the last probe is applied, every earlier one is too."""
    for attempt in range(100):
        probe = [PROBE_HASH + attempt]
        hint = router_pb2.RouteHint(worker_id="w0", page_hashes=probe)
        await bus.append_routes(router_pb2.RouteHints(router_id="probe", hints=[hint]).SerializeToString())
        with contextlib.suppress(AssertionError):
            await until(lambda: all(r.index.match(probe, ["w0"]) == {"w0": 1} for r in running), "the probe",
                        timeout_s=0.05)
            for replica in running:
                replica.num_probes_applied = replica.count("applied")
            return
    raise AssertionError("the replicas never followed the route log")


@contextlib.asynccontextmanager
async def replicas(bus: InProcessBus, *names: str) -> AsyncIterator[list[Replica]]:
    running = [Replica(bus, name) for name in names]
    tasks = [asyncio.create_task(r.hints.run()) for r in running]
    try:
        await following(bus, running)
        yield running
    finally:
        for replica in running:
            replica.hints.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)


def run(main: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))  # type: ignore[arg-type]


def test_what_one_replica_routes_the_others_credit_and_what_it_withdraws_they_drop() -> None:
    async def main() -> None:
        bus = InProcessBus()
        async with replicas(bus, "a", "b", "c") as (a, b, c):
            a.hints.routed("w1", PROMPT[:3])
            a.hints.routed("w0", PROMPT)
            await until(lambda: b.matched() == {"w0": 4, "w1": 3} and c.matched() == b.matched(),
                        "b and c to credit a's routes")
            assert a.matched() == {"w0": 0, "w1": 0}  # its own index is credited where it routes, not from the log
            assert a.count("published") == 2 and b.count("applied") == 2
            a.hints.withdrawn("w0", PROMPT)
            await until(lambda: b.matched() == {"w0": 0, "w1": 3} and c.matched() == b.matched(),
                        "b and c to drop the withdrawn route")
        await bus.close()
    run(main)


def test_a_burst_of_decisions_goes_out_as_few_entries_in_order() -> None:
    async def main() -> None:
        bus = InProcessBus()
        async with replicas(bus, "a", "b") as (a, b):
            feed = await bus.follow_routes()
            for _ in range(50):
                a.hints.routed("w0", PROMPT)
                a.hints.withdrawn("w0", PROMPT)
            a.hints.routed("w1", PROMPT)
            await until(lambda: b.count("applied") == 101, "b to apply every hint")
            assert b.matched() == {"w0": 0, "w1": 4}  # the last word on w0 was a withdrawal
            entries = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.wait_for(anext(feed), 0.05)
                    entries += 1
            assert entries == 1  # queued without a pause in between: one entry of every hint
            feed.close()
        await bus.close()
    run(main)


def test_unknown_workers_and_malformed_entries_are_skipped_and_the_feed_goes_on() -> None:
    async def main() -> None:
        bus = InProcessBus()
        async with replicas(bus, "a", "b") as (a, b):
            await bus.append_routes(b"\xff not a RouteHints")
            await bus.append_routes(b"")  # parses, but names no router
            a.hints.routed("w9", PROMPT)
            a.hints.routed("w0", PROMPT)
            await until(lambda: b.matched()["w0"] == 4, "b to credit w0")
            assert b.index.match(PROMPT, ["w9"]) == {"w9": 0}
            assert b.count("malformed") == 2 and a.count("malformed") == 2
            assert b.count("applied") == 1
        await bus.close()
    run(main)


def test_beyond_the_queue_cap_the_oldest_unsent_hints_are_dropped_and_counted() -> None:
    async def main() -> None:
        replica = Replica(InProcessBus(), "a")  # not running: nothing is sent
        for _ in range(MAX_QUEUED_HINTS + 5):
            replica.hints.routed("w0", PROMPT)
        assert replica.count("dropped") == 5
    run(main)
