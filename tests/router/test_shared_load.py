"""Two routers that publish their load on a real Redis spread a hot prefix as one router does.

The review issue's hot-prefix case (``test_routing``): a 2,048-token prefix cached on the holder, 64-token
suffixes, 32 output tokens, nothing finishing, and no load reports from the workers (the requests have not
reached them yet, the worst case): one router keeps the prefix on its holder for 37 requests in flight and
sends the 38th elsewhere. Two routers taking turns, each seeing the other's published figures, must spread at
the same total; without shared load each would let the holder take its own 37, 74 in all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

from conditions import until
from redis_server import fresh_redis  # noqa: F401  (a fixture)

from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.base.config import BusConfig, RouterConfig
from radixserve.cluster.base.hashing import page_hashes
from radixserve.cluster.control.redis_server import LocalRedisServer
from radixserve.router.policies import PrefixPolicy, RouteRequest
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.routing import NO_REPORT, ReportedLoad, WorkerLoad, decide
from radixserve.router.shared_load import SharedLoad
from radixserve.v1 import types_pb2

PAGE = 16
PREFIX_LEN, SUFFIX_LEN, OUTPUT_LEN = 2048, 64, 32
WORKERS = ("h", "o")


@dataclasses.dataclass
class Holder:
    """What a router keeps per worker (``router.shared_load.LoadHolder``)."""

    outstanding: WorkerLoad = dataclasses.field(default_factory=WorkerLoad)
    peer_load: ReportedLoad = NO_REPORT
    load: types_pb2.LoadReport = dataclasses.field(default_factory=types_pb2.LoadReport)
    num_log_entries: int = 0
    info: None = None



async def total_in_flight_when_it_spreads(redis_url: str, shared: bool) -> int:
    """Route hot-prefix requests through two routers in turn until one leaves the holder; the total the holder
    took by then. With ``shared`` both routers exchange load over Redis after every decision."""
    prompt = list(range(PREFIX_LEN + SUFFIX_LEN))
    hashes = page_hashes(prompt, PAGE, 0)
    request = RouteRequest(len(prompt), OUTPUT_LEN, PAGE)
    config = BusConfig(backend="redis", url=redis_url)
    buses = [make_bus(config), make_bus(config)]
    routers = []
    for i, bus in enumerate(buses):
        index = PrefixIndex(30, 300, clock=lambda: 0.0)
        index.apply_stored("h", hashes[: PREFIX_LEN // PAGE])  # both indexes read the holder's events
        clients = {w: Holder() for w in WORKERS}
        routers.append((index, clients, SharedLoad(bus, f"router-{i}", clients, interval_s=0.05),
                        PrefixPolicy(RouterConfig().load_weight, RouterConfig().decode_weight, random.Random(i))))
    try:
        for taken in range(1000):
            index, clients, exchange, policy = routers[taken % 2]
            if shared:
                for _, _, other, _ in routers:
                    await other.exchange()
            holders = [clients[w] for w in WORKERS]
            decision = decide(policy, index, request, hashes, WORKERS, [c.outstanding for c in holders],
                              None, [c.peer_load for c in holders])
            if decision.worker == 1:
                return taken
            clients["h"].outstanding.begin(taken, decision.prefill_tokens, decision.output_tokens,
                                           decision.active_pages)
        raise AssertionError("the hot prefix never spread")
    finally:
        for bus in buses:
            await bus.close()


def test_two_routers_sharing_load_spread_a_hot_prefix_at_the_one_router_total(fresh_redis: LocalRedisServer) -> None:
    assert asyncio.run(total_in_flight_when_it_spreads(fresh_redis.url, shared=True)) == 37


def test_without_shared_load_two_routers_pile_twice_as_many_onto_the_holder(fresh_redis: LocalRedisServer) -> None:
    assert asyncio.run(total_in_flight_when_it_spreads(fresh_redis.url, shared=False)) == 74


def test_a_router_that_stops_publishing_drops_out_of_the_others_figures(fresh_redis: LocalRedisServer) -> None:
    async def main() -> None:
        config = BusConfig(backend="redis", url=fresh_redis.url)
        buses = [make_bus(config), make_bus(config)]
        clients = [{"w": Holder()}, {"w": Holder()}]
        exchanges = [SharedLoad(bus, f"router-{i}", clients[i], interval_s=0.05, ttl_s=0.5)
                     for i, bus in enumerate(buses)]
        try:
            clients[0]["w"].outstanding.begin("r", 100, 10, 7)
            for exchange in (*exchanges, *exchanges):
                await exchange.exchange()
            assert clients[1]["w"].peer_load == ReportedLoad(1, 100, 10) and exchanges[1].num_peers == 1

            async def dropped_out() -> bool:  # router-0 publishes no more: its document expires
                await exchanges[1].exchange()
                return exchanges[1].num_peers == 0
            await until(dropped_out, "router-0's document to expire")
            assert clients[1]["w"].peer_load == NO_REPORT
        finally:
            for bus in buses:
                await bus.close()
    asyncio.run(main())
