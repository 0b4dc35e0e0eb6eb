"""The worker pool: one Ray actor per engine, restarted by Ray when it dies, announced on the event bus.

Each ``WorkerActor`` builds its engine and serves the internal worker API (``radixserve.v1.Worker``) and, with
``pool.worker_http_port``, the OpenAI-compatible HTTP API, from a dedicated thread running its own asyncio loop,
so Ray's actor calls (``record``, ``drain``) never wait behind engine steps. Ray re-runs the constructor after a crash (``max_restarts``), which loads the model again and
serves a new incarnation with an empty cache.

Workers cannot reach an in-process bus living in the launcher's process, so there the ``WorkerPool`` announces
them: it asks each actor for its ``WorkerRecord`` and re-announces whenever the record changes (a restart brings
a new incarnation and possibly a new address). On a shared bus (Redis) each actor connects to it and keeps its
own heartbeat record, KV event log and load there (``worker.bus_publisher``), restarts included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import ray

from radixserve.cluster.base.bus import EventBus, WorkerRecord
from radixserve.cluster.base.buses import make_bus
from radixserve.cluster.base.config import (BusConfig, ClusterConfig, EngineConfig, MetricsConfig, PoolConfig,
                                            SecurityConfig)
from radixserve.cluster.base.heap import freeze_startup_heap
from radixserve.cluster.base.loop_thread import LoopThread

log = logging.getLogger(__name__)

RAY_NAMESPACE = "radixserve"
_RECORD_POLL_S = 1.0
_STARTUP_TIMEOUT_S = 600.0


def worker_name(index: int) -> str:
    """The Ray actor name of worker ``index`` (in namespace ``RAY_NAMESPACE``)."""
    return f"radixserve-worker-{index}"


class WorkerActor:
    """One engine behind the internal gRPC API (and the HTTP API on ``http_port`` unless None, the framed Session
    on ``session_port`` unless None, secured by ``security``). Wrapped with ``ray.remote`` by ``WorkerPool``."""

    def __init__(self, worker_id: str, engine_config: EngineConfig, host: str, port: int, num_threads: int,
                 metrics: MetricsConfig, http_port: int | None, security: SecurityConfig, bus: BusConfig,
                 session_port: int | None = 0) -> None:
        import torch

        from radixserve.worker.engine import Engine
        from radixserve.worker.service import WorkerServer

        torch.set_num_threads(num_threads)
        engine = Engine.from_config(engine_config, worker_id)
        self._loop = LoopThread(f"{worker_id}-loop").start()

        async def build() -> WorkerServer:  # a bus's connections belong to the loop that made them
            shared = make_bus(bus) if bus.backend != "inprocess" else None
            return WorkerServer(engine, worker_id, host=host, port=port, metrics_host=metrics.host,
                                metrics_port=metrics.worker_port, http_port=http_port, security=security,
                                bus=shared, bus_config=bus, session_port=session_port)

        self._server = self._call(build())
        self._call(self._server.start())
        freeze_startup_heap()

    def _call(self, coroutine: Any, timeout: float | None = None) -> Any:
        return self._loop.call(coroutine, timeout)

    def record(self) -> bytes:
        """This worker's registry record (``WorkerRecord.to_bytes``)."""
        return self._server.record().to_bytes()

    def drain(self, grace_s: float) -> None:
        """Finish the requests in flight (refusing new ones) for at most ``grace_s``, then stop serving."""
        self._call(self._server.stop(grace_s), timeout=grace_s + 10)

    def pid(self) -> int:
        return os.getpid()


class WorkerPool:
    """Starts ``config.pool.num_workers`` actors on ``bus`` (configured by ``bus_config``, whose URL the actors
    connect to when it is shared); on the in-process bus it announces them and keeps their records current."""

    def __init__(self, config: ClusterConfig, bus: EventBus, bus_config: BusConfig | None = None) -> None:
        self._config = config
        self._bus = bus
        self._bus_config = bus_config or config.bus
        self.actors: list[Any] = []
        self._records: dict[str, WorkerRecord] = {}
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self, progress: Callable[[str], None] = lambda _: None) -> list[WorkerRecord]:
        """Create the actors and wait until each serves; returns their records in worker order."""
        pool = self._config.pool
        actor_class = ray.remote(WorkerActor)
        num_threads = max(1, int(pool.num_cpus_per_worker))
        for i in range(pool.num_workers):
            options = actor_class.options(
                name=worker_name(i), namespace=RAY_NAMESPACE, num_cpus=pool.num_cpus_per_worker,
                num_gpus=_num_gpus(pool, self._config.engine), max_restarts=pool.max_restarts, max_task_retries=-1,
                max_concurrency=4)
            self.actors.append(options.remote(worker_name(i), self._config.engine, pool.worker_host,
                                              pool.worker_port, num_threads, self._config.metrics,
                                              pool.worker_http_port, self._config.security, self._bus_config,
                                              pool.worker_session_port))
        records = []
        for i, actor in enumerate(self.actors):
            record = WorkerRecord.from_bytes(await asyncio.wait_for(actor.record.remote(), _STARTUP_TIMEOUT_S))
            await self._announce(record)
            http = f", HTTP at {record.http_address}" if record.http_address else ""
            progress(f"worker {i + 1}/{pool.num_workers} ready: {record.worker_id} at {record.address}{http}")
            records.append(record)
        if not self._bus.shared:
            self._watchers = [asyncio.create_task(self._watch(actor)) for actor in self.actors]
        return records

    async def stop(self, grace_s: float) -> None:
        """Drain every worker (at most ``grace_s``), withdraw it from the registry and kill its actor."""
        for task in self._watchers:
            task.cancel()
        drains = [actor.drain.remote(grace_s) for actor in self.actors]
        for ref in drains:
            with contextlib.suppress(Exception):  # a worker that died meanwhile has nothing left to drain
                await asyncio.wait_for(ref, grace_s + 15)
        for worker_id in list(self._records):
            await self._bus.withdraw(worker_id)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()

    async def _announce(self, record: WorkerRecord) -> None:
        if self._bus.shared:  # the worker announces itself
            return
        if self._records.get(record.worker_id) != record:
            self._records[record.worker_id] = record
            await self._bus.announce(record)

    async def _watch(self, actor: Any) -> None:
        """Re-announce the actor whenever its record changes; a call to a restarting actor waits for it."""
        while True:
            try:
                await self._announce(WorkerRecord.from_bytes(await actor.record.remote()))
            except ray.exceptions.RayActorError as error:
                log.warning("worker actor unavailable: %s", error)
            await asyncio.sleep(_RECORD_POLL_S)


def _num_gpus(pool: PoolConfig, engine: EngineConfig) -> float:
    """``pool.num_gpus_per_worker``, else one GPU for an engine on CUDA and none for a CPU engine."""
    if pool.num_gpus_per_worker is not None:
        return pool.num_gpus_per_worker
    return 1.0 if engine.device.startswith("cuda") else 0.0
