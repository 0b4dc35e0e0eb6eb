"""Choosing the event bus backend a config names (``cluster.base.bus`` holds the interface and the in-process
backend, ``cluster.base.redis_bus`` the Redis one)."""

from __future__ import annotations

from radixserve.cluster.base.bus import EventBus, InProcessBus
from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.base.redis_bus import RedisBus


def make_bus(config: BusConfig | None = None) -> EventBus:
    """A new bus for ``config`` (default: in process). A Redis bus needs ``config.url``; it connects lazily."""
    config = config or BusConfig()
    if config.backend == "inprocess":
        return InProcessBus()
    if config.url is None:
        raise ValueError("bus.url: the Redis backend needs a URL (`radixserve up` starts a local server without one)")
    return RedisBus(config)
