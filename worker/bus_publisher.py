"""What a worker keeps on a shared event bus (Redis): its record as a heartbeat, its KV event log, its load.

On a shared bus (``EventBus.shared``) no router relays a worker's events: the worker writes them itself, so any
number of routers, started at any time, read the same log. ``BusPublisher`` runs three loops on the worker's
event loop:

* the heartbeat announces the worker's record with a TTL of ``worker_ttl_s``, every quarter of it;
* the KV loop appends a snapshot of the cache (a reset batch, from a fresh ``KvEventHub`` subscription) and then
  each live batch in sequence order, every batch queued meanwhile in one call (under load a round trip per
  batch fell seconds behind); every ``snapshot_interval_batches`` batches it subscribes again, which
  appends a new snapshot and lets the log drop what came before the previous one;
* the load loop publishes the engine's ``LoadReport`` every ``load_interval_s``.

When the bus is unreachable each loop retries every ``_RETRY_S``; the KV loop starts over with a snapshot, so
the batches that could not be appended leave a gap that readers see and the snapshot after it closes. Readers
therefore learn the cache exactly once the bus is back, without the worker knowing who reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from radixserve.cluster.base.bus import BusUnavailable, EventBus, WorkerRecord
from radixserve.cluster.base.config import BusConfig
from radixserve.v1 import types_pb2
from radixserve.worker.kv_hub import KvBatches, KvHubClosed, KvSubscriberLagged, KvSubscription

log = logging.getLogger(__name__)

_RETRY_S = 0.25


class BusPublisher:
    """Keeps one worker's record, KV event log and load on ``bus``; ``start`` then ``stop``, on one loop."""

    def __init__(self, bus: EventBus, config: BusConfig, subscribe_kv: Callable[[], KvSubscription],
                 batches: KvBatches, load_report: Callable[[], types_pb2.LoadReport],
                 record: Callable[[], WorkerRecord]) -> None:
        self._bus = bus
        self._config = config
        self._subscribe_kv = subscribe_kv
        self._batches = batches
        self._load_report = load_report
        self._record = record
        self._tasks: list[asyncio.Task[None]] = []
        # Ends the loops even where redis-py turned their cancellation into an error (caught as BusUnavailable).
        self._stopped = False

    async def start(self) -> None:
        """Announce the worker once (so that a router started next finds it), then keep everything current. An
        unreachable bus does not stop the worker: the loops keep trying."""
        try:
            await self._bus.announce(self._record(), self._config.worker_ttl_s)
        except BusUnavailable as error:
            log.warning("bus unreachable (%s): the worker announces itself once it is back", error)
        self._tasks = [asyncio.create_task(loop()) for loop in (self._heartbeat, self._publish_events,
                                                                 self._publish_load)]

    async def stop(self) -> None:
        """Stop the loops and withdraw the record, so routers drop the worker at once rather than at its TTL."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(BusUnavailable):
            await self._bus.withdraw(self._record().worker_id)

    async def _heartbeat(self) -> None:
        ttl_s = self._config.worker_ttl_s
        while not self._stopped:
            await self._retrying(lambda: self._bus.announce(self._record(), ttl_s), "heartbeat")
            await asyncio.sleep(ttl_s / 4)

    async def _publish_load(self) -> None:
        worker_id = self._record().worker_id
        ttl_s = self._config.worker_ttl_s
        while not self._stopped:
            payload = self._load_report().SerializeToString()
            await self._retrying(lambda: self._bus.put_load("worker", worker_id, payload, ttl_s), "load")
            await asyncio.sleep(self._config.load_interval_s)

    async def _publish_events(self) -> None:
        worker_id = self._record().worker_id
        while not self._stopped:
            try:
                with self._subscribe_kv() as subscription:
                    snapshot = self._batches.snapshot(subscription)
                    await self._bus.append_kv(worker_id, snapshot.SerializeToString(), snapshot=True)
                    num_batches = 0
                    while num_batches < self._config.snapshot_interval_batches:
                        batches = [await subscription.next_batch(), *subscription.ready_batches()]
                        await self._bus.append_kv_live(
                            worker_id, [self._batches.live(b).SerializeToString() for b in batches])
                        num_batches += len(batches)
            except BusUnavailable as error:
                log.warning("kv events of %s not published (%s); starting over with a snapshot", worker_id, error)
                await asyncio.sleep(_RETRY_S)
            except KvSubscriberLagged:
                log.warning("kv events of %s fell behind the engine; starting over with a snapshot", worker_id)
            except KvHubClosed:
                return

    async def _retrying(self, call: Callable[[], Awaitable[None]], what: str) -> None:
        """``await call()``; while the bus is unreachable, retry every ``_RETRY_S`` (logged once per outage)."""
        warned = False
        while not self._stopped:
            try:
                await call()
                return
            except BusUnavailable as error:
                if not warned:
                    log.warning("bus unreachable (%s): %s retried every %.2f s", error, what, _RETRY_S)
                    warned = True
                await asyncio.sleep(_RETRY_S)
