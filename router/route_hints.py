"""Routing decisions shared between router replicas over a shared bus, so that several replicas route as one.

A router credits the worker it sends a prompt to with the prompt's pages at once (``PrefixIndex.record_routed``):
the worker's KV events for them come only after the prefill, which takes seconds on a CPU. A replica that did
not route the prompt would know nothing for those seconds and could send the rest of a group sharing the
prefix elsewhere, splitting the group over workers that each prefill it. ``RouteHints`` closes that gap:

* every decision and every withdrawn credit is queued (``routed``, ``withdrawn``, synchronous, on the request
  path), and one task publishes everything queued as one route log entry (``EventBus.append_routes``), so a
  burst costs one round trip and a request never waits on the bus;
* another task follows the route log and applies the other replicas' entries to this router's index as its own
  decisions are applied (the same TTLs), for the workers this router knows.

Hints are best effort, because the KV events say the same a moment later: a batch the bus could not take is
dropped, a gap in the feed is skipped, and a malformed entry is counted and skipped. ``outcomes`` counts the
hints by what became of them: ``published``, ``dropped`` (unsent), ``applied`` (another replica's), ``malformed``
(entries).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Container, Sequence

from google.protobuf.message import DecodeError
from prometheus_client import Counter

from radixserve.cluster.base.bus import BusUnavailable, EventBus, Lost, Subscription
from radixserve.router.prefix_index import PrefixIndex
from radixserve.v1 import router_pb2

log = logging.getLogger(__name__)

_RETRY_S = 0.5  # pause before following the route log again after the bus failed
MAX_QUEUED_HINTS = 10_000  # beyond this many unsent hints the oldest are dropped (the bus is down or slow)


class RouteHints:
    """This router's decisions published on ``bus`` as ``router_id``; the other replicas' applied to ``index``
    for the worker ids in ``known``; ``outcomes`` is a counter labelled by outcome. ``run`` until ``stop``, on
    the router's loop."""

    def __init__(self, bus: EventBus, router_id: str, index: PrefixIndex, known: Container[str],
                 outcomes: Counter) -> None:
        self._bus = bus
        self.router_id = router_id
        self._index = index
        self._known = known
        self._outcomes = outcomes
        self._queue: collections.deque[router_pb2.RouteHint] = collections.deque()
        self._queued = asyncio.Event()
        self._feed: Subscription | None = None
        self._stopped = False

    def routed(self, worker_id: str, hashes: Sequence[int]) -> None:
        """This router sent a prompt with ``hashes`` (from its first page) to ``worker_id``."""
        self._enqueue(router_pb2.RouteHint(worker_id=worker_id, page_hashes=hashes))

    def withdrawn(self, worker_id: str, hashes: Sequence[int]) -> None:
        """``worker_id`` did not take the prompt ``routed`` credited it with."""
        self._enqueue(router_pb2.RouteHint(worker_id=worker_id, page_hashes=hashes, withdrawn=True))

    async def run(self) -> None:
        """Publish and follow until ``stop`` (or the bus closes); an error in either loop stops both and is raised
        (as an ``ExceptionGroup``), so that running it again restarts both."""
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._publish())
            loops.create_task(self._follow())

    def stop(self) -> None:
        """End ``run``: both loops stop at their next step."""
        self._stopped = True
        self._queued.set()
        if self._feed is not None:
            self._feed.close()

    def apply(self, entry: bytes) -> None:
        """Apply one route log entry: another replica's hints, in order, for known workers; this router's own
        entries are skipped, a malformed one is counted and skipped."""
        try:
            hints = router_pb2.RouteHints.FromString(entry)
        except DecodeError:
            hints = None
        if hints is None or not hints.router_id:
            self._outcomes.labels("malformed").inc()
            log.debug("route log: an entry of %d bytes is not a RouteHints; skipped", len(entry))
            return
        if hints.router_id == self.router_id:
            return
        applied = 0
        for hint in hints.hints:
            if hint.worker_id not in self._known:
                continue
            if hint.withdrawn:
                self._index.withdraw_routed(hint.worker_id, hint.page_hashes)
            else:
                self._index.record_routed(hint.worker_id, hint.page_hashes)
            applied += 1
        self._outcomes.labels("applied").inc(applied)

    def _enqueue(self, hint: router_pb2.RouteHint) -> None:
        if len(self._queue) >= MAX_QUEUED_HINTS:
            self._queue.popleft()
            self._outcomes.labels("dropped").inc()
        self._queue.append(hint)
        self._queued.set()

    async def _publish(self) -> None:
        while not self._stopped:
            await self._queued.wait()
            self._queued.clear()
            if not self._queue or self._stopped:
                continue
            hints = list(self._queue)
            self._queue.clear()
            entry = router_pb2.RouteHints(router_id=self.router_id, hints=hints).SerializeToString()
            try:
                await self._bus.append_routes(entry)
                self._outcomes.labels("published").inc(len(hints))
            except BusUnavailable as error:
                self._outcomes.labels("dropped").inc(len(hints))
                log.debug("route hints not published (%s); %d dropped", error, len(hints))

    async def _follow(self) -> None:
        while not self._stopped:
            try:
                self._feed = await self._bus.follow_routes()
                if self._stopped:  # stop came while the feed was being opened
                    self._feed.close()
                async with self._feed:
                    async for entry in self._feed:
                        if not isinstance(entry, Lost):  # missed hints: the KV events will tell
                            self.apply(entry)
                return  # the feed ended: stop, or the bus closed
            except BusUnavailable:
                await asyncio.sleep(_RETRY_S)
