"""Router replicas: one Ray actor per router, all on one shared bus (Redis), restarted by Ray when they die.

With the in-process bus the launcher runs its one router in its own process (the embedded default). With a
shared bus each replica is a ``RouterActor``: its own process, event loop thread, bus connection and prefix
index, named ``router-<i>`` and listening on ``replica_addresses(config, i)``. Every replica reads the same
workers' KV event logs and shares its load with the others, so any of them routes as one would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import ray

from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.base.config import BusConfig, ClusterConfig, MetricsConfig, RouterConfig, SecurityConfig
from radixserve.cluster.base.heap import freeze_startup_heap
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.cluster.base.security import ApiKeys

_STARTUP_TIMEOUT_S = 120.0


def router_name(index: int) -> str:
    """The id of router replica ``index``, also its Ray actor name."""
    return f"router-{index}"


def replica_config(config: RouterConfig, index: int) -> RouterConfig:
    """Replica ``index``'s config: its listed ports, else the configured ones plus ``index`` (0 stays 0)."""
    def port(listed: tuple[int, ...], base: int | None) -> int | None:
        if listed:
            return listed[index]
        return base + index if base else base

    return dataclasses.replace(config, port=port(config.replica_ports, config.port),
                               http_port=port(config.replica_http_ports, config.http_port))


def replica_metrics_port(metrics: MetricsConfig, index: int) -> int:
    return metrics.router_port + index if metrics.router_port else 0


class RouterAddresses(NamedTuple):
    """Where one replica listens: gRPC, HTTP (None without), metrics."""

    address: str
    http_address: str | None
    metrics_address: str | None


class RouterActor:
    """One router replica on the shared bus ``bus`` (wrapped with ``ray.remote`` by ``RouterPool``)."""

    def __init__(self, router_id: str, config: RouterConfig, bus: BusConfig, metrics_host: str, metrics_port: int,
                 security: SecurityConfig, api_keys: ApiKeys) -> None:
        from radixserve.router.server import Router

        self._loop = LoopThread(f"{router_id}-loop").start()

        async def build() -> Router:  # the bus's connections belong to the loop that made them
            return Router(config, make_bus(bus), metrics_host, metrics_port, security, api_keys, router_id, bus)

        self._router = self._call(build())
        self._call(self._router.start(), _STARTUP_TIMEOUT_S)
        freeze_startup_heap()

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        return self._loop.call(coroutine, timeout)

    def addresses(self) -> RouterAddresses:
        router = self._router
        return RouterAddresses(router.address, router.http_address, router.metrics_address)

    def drain(self) -> None:
        """Finish the requests in flight (refusing new ones), then stop and close the bus connection."""
        async def stop() -> None:
            await self._router.stop()
            await self._router.bus.close()

        self._call(stop(), self._router.config.drain_timeout_s + 15)

    def pid(self) -> int:
        return os.getpid()


class RouterPool:
    """Starts ``config.router.replicas`` router actors on the shared bus ``bus`` and stops them."""

    def __init__(self, config: ClusterConfig, bus: BusConfig, api_keys: ApiKeys) -> None:
        self._config = config
        self._bus = bus
        self._api_keys = api_keys
        self.actors: list[Any] = []

    async def start(self, progress: Callable[[str], None] = lambda _: None) -> list[RouterAddresses]:
        """Create the replicas and wait until each serves; returns their addresses in replica order."""
        config, pool = self._config, self._config.pool
        actor_class = ray.remote(RouterActor)
        for i in range(config.router.replicas):
            options = actor_class.options(name=router_name(i), num_cpus=0, max_restarts=pool.max_restarts,
                                          max_task_retries=-1, max_concurrency=4)
            self.actors.append(options.remote(router_name(i), replica_config(config.router, i), self._bus,
                                              config.metrics.host, replica_metrics_port(config.metrics, i),
                                              config.security, self._api_keys))
        addresses = []
        for i, actor in enumerate(self.actors):
            found = RouterAddresses(*await asyncio.wait_for(actor.addresses.remote(), _STARTUP_TIMEOUT_S))
            http = f", HTTP at {found.http_address}" if found.http_address else ""
            progress(f"router {i + 1}/{len(self.actors)} ready: {router_name(i)} at {found.address}{http}")
            addresses.append(found)
        return addresses

    async def stop(self) -> None:
        """Drain every replica, then kill its actor."""
        drains = [actor.drain.remote() for actor in self.actors]
        for ref in drains:
            with contextlib.suppress(Exception):  # a replica that died meanwhile has nothing left to drain
                await asyncio.wait_for(ref, self._config.router.drain_timeout_s + 20)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
