"""The worker's KV events as batches: the hub that numbers and fans them out, and their wire form.

``KvEventHub`` keeps a mirror of the page hashes the engine caches, built from every event batch in order, so
a new subscriber's reset snapshot and the live batches after it neither miss nor repeat an event. Batches are
numbered once, as they are published (1, 2, ... per incarnation), and every subscriber sees the same numbers: a
reset snapshot carries the sequence of the last batch folded into it, and the live batches after it go on from
there. ``KvBatches`` writes them as ``radixserve.v1.KvEventBatch`` messages, for the gRPC stream and the bus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType
from typing import NamedTuple

from radixserve.v1 import worker_pb2
from radixserve.worker.kv.radix_cache import KVEvent

DEFAULT_MAX_PENDING_BATCHES = 1024  # ~10 s of event batches at the service's pump pace
_EVENT_KINDS = {"stored": worker_pb2.KvEvent.STORED, "removed": worker_pb2.KvEvent.REMOVED}


class KvSubscriberLagged(Exception):
    """The subscriber fell too many batches behind and was dropped; it must resubscribe."""


class KvHubClosed(Exception):
    """The hub was closed because the worker is stopping."""


class SequencedBatch(NamedTuple):
    """One published batch of KV events and its sequence number."""

    sequence: int
    events: tuple[KVEvent, ...]


class KvSubscription:
    """One subscriber's view of the cache: ``snapshot`` when it subscribed, the cache after batch ``sequence``
    (0: before any batch), then every later batch in order, numbered ``sequence + 1`` on.

    A context manager: leaving it unsubscribes.
    """

    def __init__(self, hub: KvEventHub, snapshot: tuple[int, ...], sequence: int, max_pending_batches: int) -> None:
        self.snapshot = snapshot
        self.sequence = sequence
        self._hub = hub
        self._queue: asyncio.Queue[SequencedBatch | Exception] = asyncio.Queue(max_pending_batches)

    async def next_batch(self) -> SequencedBatch:
        """The next live batch; raises ``KvSubscriberLagged`` or ``KvHubClosed`` when the subscription ended."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def ready_batches(self) -> list[SequencedBatch]:
        """The live batches queued now, without waiting (an end of the subscription stays queued, for
        ``next_batch`` to raise)."""
        ready: list[SequencedBatch] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, Exception):
                self._queue.put_nowait(item)
                break
            ready.append(item)
        return ready

    def __enter__(self) -> KvSubscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hub.unsubscribe(self)

    def _offer(self, batch: SequencedBatch) -> bool:
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            return False
        return True

    def _end(self, error: Exception) -> None:
        """Replaces whatever is still queued by ``error``, which ``next_batch`` raises."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(error)


class KvEventHub:
    """The cached page hashes (a mirror built from the engine's events) and the fan-out of live batches.

    Subscribing and publishing are synchronous, so on one event loop every batch is either in a new
    subscriber's snapshot or delivered to it live, never both or neither. Each published batch gets the next
    sequence number (from 1). A subscriber holding ``max_pending_batches`` undelivered batches is dropped
    (``KvSubscriberLagged``) instead of holding up others.
    """

    def __init__(self, max_pending_batches: int = DEFAULT_MAX_PENDING_BATCHES) -> None:
        if max_pending_batches < 1:
            raise ValueError(f"max_pending_batches: must be >= 1, got {max_pending_batches}")
        self._max_pending_batches = max_pending_batches
        self._cached: dict[int, None] = {}  # insertion-ordered: a prefix's pages come before its extensions
        self._sequence = 0  # of the last batch published
        self._subscribers: set[KvSubscription] = set()
        self._closed = False

    @property
    def cached_hashes(self) -> tuple[int, ...]:
        """Every cached page hash, oldest first."""
        return tuple(self._cached)

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Applies ``events`` (oldest first) to the mirror and queues them as one batch, numbered with the next
        sequence, for every subscriber. No events: no batch."""
        if not events:
            return
        for event in events:
            for page_hash in event.page_hashes:
                if event.kind == "stored":
                    self._cached[page_hash] = None
                else:
                    self._cached.pop(page_hash, None)
        self._sequence += 1
        batch = SequencedBatch(self._sequence, tuple(events))
        for subscriber in list(self._subscribers):
            if not subscriber._offer(batch):
                self._subscribers.discard(subscriber)
                subscriber._end(KvSubscriberLagged("kv event subscriber fell behind; resubscribe"))

    def subscribe(self) -> KvSubscription:
        """A subscription whose snapshot is the cache now; raises ``KvHubClosed`` once the hub is closed."""
        if self._closed:
            raise KvHubClosed("worker is stopping")
        subscription = KvSubscription(self, self.cached_hashes, self._sequence, self._max_pending_batches)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: KvSubscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        """Ends every subscription with ``KvHubClosed`` and refuses new ones."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber._end(KvHubClosed("worker is stopping"))
        self._subscribers.clear()


class KvBatches:
    """Writes one worker incarnation's batches as ``KvEventBatch`` messages, stamped with the time sent."""

    def __init__(self, worker_id: str, incarnation: str) -> None:
        self._worker_id = worker_id
        self._incarnation = incarnation

    def snapshot(self, subscription: KvSubscription) -> worker_pb2.KvEventBatch:
        """The reset batch of a new subscription: every page cached as of its ``sequence``."""
        pages = [worker_pb2.KvEvent(kind=worker_pb2.KvEvent.STORED, page_hashes=subscription.snapshot)]
        return self._batch(subscription.sequence, pages if subscription.snapshot else [], reset=True)

    def live(self, batch: SequencedBatch) -> worker_pb2.KvEventBatch:
        events = [worker_pb2.KvEvent(kind=_EVENT_KINDS[e.kind], page_hashes=e.page_hashes) for e in batch.events]
        return self._batch(batch.sequence, events)

    def _batch(self, sequence: int, events: list[worker_pb2.KvEvent], reset: bool = False) -> worker_pb2.KvEventBatch:
        return worker_pb2.KvEventBatch(worker_id=self._worker_id, incarnation=self._incarnation,
                                       sequence=sequence, reset=reset, events=events, sent_unix_s=time.time())
