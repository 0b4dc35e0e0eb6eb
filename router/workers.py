"""The router's view of its workers: one gRPC client each, their health, load and KV events.

``WorkerSet`` follows the event bus registry: a worker announced there gets a ``WorkerClient``; a withdrawn one
(or, on a shared bus, one whose heartbeat expired) is closed and forgotten by the prefix index. Each client
polls its worker's load every ``health_interval_s``, which doubles as the health probe: a worker that stops
answering is marked ``down`` and routed around until a poll succeeds again (a refused call marks it down at once,
a poll past its deadline only the second in a row: one can be the router's own stall); one whose load report
(polled, or read from the shared bus) says it is draining is marked ``draining`` and sent nothing new. A changed
incarnation means the worker restarted with an empty cache, so the index forgets it.

KV events reach the index from each worker's log on the bus (``EventBus.follow_kv``), applied in the worker's
sequence order (``KvEventSequencer``), so routers learn of events the same way whatever the backend. On a
shared bus the worker writes its log itself; on the in-process bus the worker's client relays the worker's
gRPC event stream into it, subscribing again every ``snapshot_interval_batches`` batches as a worker writing
its own log does: the worker answers with a fresh snapshot, and the log drops what came before the previous one
(else it would grow without bound, and a reader starting on it would replay more than it can hold). A lost
stretch of the log (``Lost``) makes the router read the log again from its start: what it applied already is
dropped as duplicates and stale snapshots, and if the log was trimmed past its cursor, its first entry is a
snapshot newer than the cursor. A gap in the sequence makes it wait for the
next snapshot (and, when relaying, ask the worker for one). An entry that is not a batch of the log's worker is counted, logged and skipped.
While the bus is unreachable the index keeps what it knew (its events no longer live) and routing goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc

from google.protobuf.message import DecodeError

from radixserve.cluster.base.bus import (BusUnavailable, ChangeKind, EventBus, Lost, RegistryChange, Subscription,
                                         WorkerRecord)
from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.wire import sampling_options_to_proto
from radixserve.router.kv_events import BatchOutcome, KvEventSequencer
from radixserve.router.metrics import RouterMetrics
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.route_hints import RouteHints
from radixserve.router.routing import NO_REPORT, ReportedLoad, WorkerLoad
from radixserve.router.shared_load import SharedLoad
from radixserve.router.supervisor import Supervisor
from radixserve.router.worker_session import WorkerSession
from radixserve.v1 import types_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_RETRY_S = 0.5  # pause before re-subscribing to a worker's KV events
_MALFORMED_LOG_EVERY = 100  # log the first malformed entry of a worker's log, then every this many
_MISSED_POLLS_DOWN = 2  # load polls past their deadline in a row that mark a worker down


@dataclass(frozen=True)
class WorkerChannels:
    """How the router reaches its workers: polling pace, message cap, TLS credentials (None: plaintext) and the
    metadata every call carries (an API key when the workers require one)."""

    health_interval_s: float
    max_message_bytes: int
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def open(self, address: str) -> grpc.aio.Channel:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes)]
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, self.credentials, options=options)


class WorkerState:
    """``up``: answering and taking requests; ``down``: a poll or call failed; ``draining``: answering, but its
    last load report says it is stopping (it takes nothing new)."""

    UP = "up"
    DOWN = "down"
    DRAINING = "draining"


class WorkerClient:
    """One worker as the router sees it. Methods run on the router's event loop.

    ``info`` is None until the worker has answered ``GetInfo`` once; until then the router sends it nothing.
    ``peer_load`` is what the other routers last published of their requests there (shared load; zeros alone).
    With ``relay`` (the in-process bus) it appends the worker's gRPC KV event stream to the worker's bus log.
    ``on_entry(worker_id, entry, since)`` gets each entry of the log, ``since`` the wall-clock time its reading
    began: entries sent before then are history caught up on, not event lag. ``on_change()`` hears of every change
    to whether it serves and what it serves (its state or its ``info``). A relay subscribes again every
    ``snapshot_interval_batches`` live batches.
    """

    def __init__(self, record: WorkerRecord, bus: EventBus, sequencer: KvEventSequencer,
                 channels: WorkerChannels, relay: bool, on_entry: Callable[[str, bytes, float], None],
                 supervisor: Supervisor, on_change: Callable[[], None] = lambda: None,
                 snapshot_interval_batches: int = BusConfig.snapshot_interval_batches) -> None:
        self.record = record
        self._snapshot_interval = snapshot_interval_batches
        self._on_change = on_change
        self._info: worker_pb2.WorkerInfo | None = None
        self._load = types_pb2.LoadReport()
        self._answering = False  # its last load poll succeeded and no call failed UNAVAILABLE since
        self._missed_polls = 0  # load polls past their deadline since the last that succeeded
        self.num_routed = 0
        self.outstanding = WorkerLoad()  # what this router has in flight there
        self.peer_load = NO_REPORT
        self.num_log_entries = 0  # of its KV event log on the bus, as last read
        self._bus = bus
        self._sequencer = sequencer
        self._interval = channels.health_interval_s
        self._metadata = channels.metadata
        self._channel = channels.open(record.address)
        self.stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._session = WorkerSession(self.stub, self._metadata, self._framed_target, channels.max_message_bytes)
        self._informed = asyncio.Event()
        self._on_entry = on_entry
        self._closed = False
        self._supervisor = supervisor
        self._poller = supervisor.start("worker_poll", self._poll, self.worker_id)
        self._follower: asyncio.Task[None] | None = self._start_relay() if relay else None
        self._reader = self._start_reader()

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    @property
    def events_live(self) -> bool:
        """Whether the index follows the worker's KV events (else its pages there are approximate)."""
        return self._sequencer.is_live(self.worker_id)

    @property
    def info(self) -> worker_pb2.WorkerInfo | None:
        """What the worker serves, from its last ``GetInfo`` (None before the first)."""
        return self._info

    @info.setter
    def info(self, info: worker_pb2.WorkerInfo | None) -> None:
        self._info = info
        self._on_change()

    @property
    def load(self) -> types_pb2.LoadReport:
        """The worker's last load report (polled, or on a shared bus published by the worker)."""
        return self._load

    @load.setter
    def load(self, report: types_pb2.LoadReport) -> None:
        draining_changed = report.draining != self._load.draining
        self._load = report
        if draining_changed:
            self._on_change()

    def _set_answering(self, answering: bool) -> None:
        if answering != self._answering:
            self._answering = answering
            self._on_change()

    @property
    def state(self) -> str:
        """A ``WorkerState``: down unless answering; draining when its last load report (polled, or on a shared
        bus published by the worker) says so."""
        if not self._answering:
            return WorkerState.DOWN
        return WorkerState.DRAINING if self.load.draining else WorkerState.UP

    @property
    def serving(self) -> bool:
        """Up and informed: it could take a request if its queue has room."""
        return self.state == WorkerState.UP and self.info is not None

    @property
    def reported_load(self) -> ReportedLoad:
        """The worker's queue and pending work as of its last load report (zeros before the first)."""
        load = self.load
        return ReportedLoad(load.num_running + load.num_waiting, load.num_pending_prefill_tokens,
                            load.num_pending_output_tokens)

    @property
    def full(self) -> bool:
        """Its queue, as last reported, holds ``max_waiting_requests`` waiting requests (False until informed)."""
        if self.info is None:
            return False
        return self.load.num_waiting >= self.info.max_waiting_requests

    def generate(self, request_id: str, token_ids: tuple[int, ...], params: SamplingParams,
                 timeout_s: float | None) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        """The worker's responses to one request, over its session stream (``router.worker_session``), sent at the
        first ``anext``; a failed request raises ``WorkerCallFailed``.

        Closing the stream before it ends aborts the request on the worker and frees its pages.
        """
        request = worker_pb2.WorkerGenerateRequest(request_id=request_id, token_ids=token_ids,
                                                   sampling=sampling_options_to_proto(params))
        return self._session.generate(request, timeout_s)

    def _framed_target(self) -> tuple[str, int] | None:
        """Where the worker's framed Session listens (on the host of its address), None where it offers none."""
        if self.info is None or not self.info.session_port:
            return None
        host = self.record.address.rpartition(":")[0].strip("[]")
        return host, self.info.session_port

    def mark_down(self, reason: str) -> None:
        """The worker failed a call: stop routing to it until a load poll succeeds."""
        if self._answering:
            log.warning("worker %s is down: %s", self.worker_id, reason)
        self._set_answering(False)

    def resubscribe(self) -> None:
        """When relaying, restart the worker's KV event stream: the worker answers with a fresh snapshot."""
        if self._follower is not None:
            self._follower.cancel()
            self._follower = self._start_relay()

    async def close(self) -> None:
        self._closed = True  # ends the log reader even where redis-py turned its cancellation into an error
        await _cancel(self._poller, self._reader, *([self._follower] if self._follower is not None else []))
        await self._session.close()
        await self._channel.close()

    async def refresh(self) -> None:
        """Poll the worker's load now; a failed poll marks it down, but for the first of polls past their deadline:
        a stall of the router's own process (a blocked event loop) makes every poll in flight miss its deadline at
        once, whatever the workers did, and the next poll tells the two apart. Refreshes may overlap (the poll, a
        status request's): each learns a new incarnation only if no other did meanwhile, and one that ends after
        the client was closed changes nothing (a newer client of the worker owns its cursor by then)."""
        try:
            await self._refresh()
            self._missed_polls = 0
        except grpc.aio.AioRpcError as error:
            if self._closed:
                return
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._missed_polls += 1
                if self._missed_polls < _MISSED_POLLS_DOWN:
                    log.info("worker %s: a load poll missed its deadline; down if the next one does", self.worker_id)
                    return
            self.mark_down(f"{error.code().name}: {error.details()}")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._closed or (task is not None and task.cancelling()):
                raise
            # else closing the channel cancelled the poll's call, not the caller (a status request) itself

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    async def _refresh(self) -> None:
        timeout = max(self._interval * 4, 1.0)
        load = await self.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=timeout, metadata=self._metadata)
        info = None
        if self.info is None or load.incarnation != self.info.incarnation:
            info = await self.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=timeout, metadata=self._metadata)
        if self._closed:  # replaced meanwhile: a newer client of the worker owns its cursor
            return
        if info is not None:
            self._learn(info)
        if load.draining and not self.load.draining:
            log.info("worker %s is draining: no new requests go there", self.worker_id)
        self.load = load
        if not self._answering:
            log.info("worker %s is up at %s", self.worker_id, self.record.address)
        self._set_answering(True)

    def _learn(self, info: worker_pb2.WorkerInfo) -> None:
        """Take ``info`` as what the worker serves; a new incarnation is followed from an empty cache (learning
        the followed one again would drop the snapshot its reader may have applied already, and the next
        snapshot comes only when the relay subscribes again)."""
        if self.info is not None and info.incarnation == self.info.incarnation:
            return
        restarted = self.info is not None
        self.info = info
        self._sequencer.follow(self.worker_id, info.incarnation)  # which starts with an empty cache
        self._informed.set()
        if restarted:
            self.resubscribe()
            self.relearn()

    def relearn(self) -> None:
        """Read the worker's KV event log again from its start: its snapshots are checked against the
        incarnation ``GetInfo`` reported, so a new incarnation's first snapshot may have been dropped."""
        self._reader.cancel()
        self._reader = self._start_reader()

    def _start_reader(self) -> asyncio.Task[None]:
        return self._supervisor.start("kv_log_reader", self._read_log, self.worker_id)

    def _start_relay(self) -> asyncio.Task[None]:
        return self._supervisor.start("kv_relay", self._relay_events, self.worker_id)

    async def _read_log(self) -> None:
        """Hand every entry of the worker's bus log to ``on_entry``; after ``Lost``, read it again from its start."""
        await self._informed.wait()  # batches are checked against the incarnation GetInfo reported
        while not self._closed:
            try:
                since = time.time()
                async with self._bus.follow_kv(self.worker_id) as entries:
                    async for entry in entries:
                        if isinstance(entry, Lost):  # what was applied comes again as duplicates
                            log.info("kv event log of %s: %d entries lost; reading it again", self.worker_id,
                                     entry.count)
                            break
                        self._on_entry(self.worker_id, entry, since)
            except BusUnavailable:
                await asyncio.sleep(_RETRY_S)

    async def _relay_events(self) -> None:
        """Append the worker's gRPC KV event streams to its bus log, one after another."""
        while True:
            try:
                if await self._relay_stream():
                    continue  # subscribed again on purpose: the next stream's snapshot follows at once
            except grpc.aio.AioRpcError as error:
                log.debug("kv events of %s interrupted: %s", self.worker_id, error.code().name)
            self._sequencer.resync(self.worker_id)  # until the next stream's snapshot
            await asyncio.sleep(_RETRY_S)

    async def _relay_stream(self) -> bool:
        """Append one KV event stream to the bus log (a reset batch as a snapshot): True once it relayed
        ``snapshot_interval_batches`` live batches (time for a fresh snapshot), False when the worker ended it."""
        stream = self.stub.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), metadata=self._metadata)
        num_live = 0
        try:
            async for batch in stream:
                await self._bus.append_kv(self.worker_id, batch.SerializeToString(), snapshot=batch.reset)
                num_live += not batch.reset
                if num_live >= self._snapshot_interval:
                    return True
            return False
        finally:
            stream.cancel()


class WorkerSet:
    """The workers a router knows, kept in step with the bus registry; feeds the prefix index from the workers'
    bus logs through ``sequencer``. On a shared bus it also exchanges load with the other routers
    (``router.shared_load``) as ``router_id``, every ``bus_config.load_interval_s``, and, with
    ``bus_config.share_routes``, routing decisions (``router.route_hints``). Every background task runs under a
    ``Supervisor``: an unexpected error is logged, counted (``metrics.background_task_failures``) and the task
    restarted."""

    def __init__(self, bus: EventBus, index: PrefixIndex, metrics: RouterMetrics, channels: WorkerChannels,
                 router_id: str = "router", bus_config: BusConfig | None = None) -> None:
        bus_config = bus_config or BusConfig()
        self._bus_config = bus_config
        self._bus = bus
        self._index = index
        self.sequencer = KvEventSequencer(index)
        self._metrics = metrics
        self._channels = channels
        self.clients: dict[str, WorkerClient] = {}
        self.shared_load = SharedLoad(bus, router_id, self.clients, bus_config.load_interval_s) if bus.shared else None
        self.route_hints = (RouteHints(bus, router_id, index, self.clients, metrics.route_hints)
                            if bus.shared and bus_config.share_routes else None)
        self._num_malformed: dict[str, int] = {}
        self._supervisor = Supervisor(metrics.background_task_failures)
        self._tasks: list[asyncio.Task[None]] = []
        self.version = 0  # changes whenever the serving workers, or what one serves, may have changed
        self._serving: tuple[int, list[WorkerClient]] = (-1, [])

    async def start(self, timeout_s: float = 30.0) -> None:
        """Watch first, then read the current members, so no announcement falls in between. An unreachable bus
        is retried for up to ``timeout_s`` (then ``BusUnavailable``)."""
        registry = self._bus.watch_registry()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                members = await self._bus.members()
                break
            except BusUnavailable:
                if time.monotonic() > deadline:
                    registry.close()
                    raise
                await asyncio.sleep(_RETRY_S)
        for record in members.values():
            await self._upsert(record)
        self._tasks = [self._supervisor.start("registry_watch", lambda: self._watch_registry(registry))]
        if self.shared_load is not None:
            self._tasks.append(self._supervisor.start("shared_load", self.shared_load.run))
        if self.route_hints is not None:
            self._tasks.append(self._supervisor.start("route_hints", self.route_hints.run))

    async def close(self) -> None:
        if self.shared_load is not None:
            self.shared_load.stop()
        if self.route_hints is not None:
            self.route_hints.stop()
        await _cancel(*self._tasks)
        if self.shared_load is not None:
            await self.shared_load.withdraw()
        for client in list(self.clients.values()):
            await client.close()
        self.clients.clear()

    async def wait_informed(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until every known worker has answered ``GetInfo``."""
        await self._wait(lambda: all(c.info is not None for c in self.clients.values()), timeout_s)

    @property
    def warm(self) -> bool:
        """Every known worker answered ``GetInfo`` and the index follows its KV events (a snapshot applied)."""
        return all(c.info is not None and c.events_live for c in self.clients.values())

    async def wait_warm(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until ``warm``; says whether it is."""
        return await self._wait(lambda: self.warm, timeout_s)

    @staticmethod
    async def _wait(done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def refresh(self) -> None:
        """Poll every worker's load now (for status answers fresher than the poll interval)."""
        await asyncio.gather(*(client.refresh() for client in self.clients.values()))

    def serving(self) -> list[WorkerClient]:
        """The workers that are up and informed, in the order they joined; recomputed only when ``version``
        changed (the list is shared: do not modify it)."""
        version, serving = self._serving
        if version != self.version:
            serving = [client for client in self.clients.values() if client.serving]
            self._serving = (self.version, serving)
        return serving

    def _changed(self) -> None:
        self.version += 1

    def unavailable_reason(self) -> str:
        """Why no worker takes a request now (for an UNAVAILABLE answer): how many drain, how many are down."""
        states = [client.state for client in self.clients.values()]
        num_draining, num_down = states.count(WorkerState.DRAINING), states.count(WorkerState.DOWN)
        if num_draining and num_draining == len(states):
            return f"every worker ({num_draining}) is draining; retry shortly"
        return f"no worker is up ({num_draining} draining, {num_down} down); retry shortly"

    def record_routed(self, worker_id: str, hashes: Sequence[int]) -> None:
        """A prompt with ``hashes`` went to ``worker_id``: the index credits it (``PrefixIndex.record_routed``),
        and so do the other replicas when routes are shared."""
        self._index.record_routed(worker_id, hashes)
        if self.route_hints is not None:
            self.route_hints.routed(worker_id, hashes)

    def withdraw_routed(self, worker_id: str, hashes: Sequence[int]) -> None:
        """``worker_id`` did not take the prompt ``record_routed`` credited it with: here and at the replicas."""
        self._index.withdraw_routed(worker_id, hashes)
        if self.route_hints is not None:
            self.route_hints.withdrawn(worker_id, hashes)

    async def _upsert(self, record: WorkerRecord) -> None:
        current = self.clients.get(record.worker_id)
        if current is not None and current.record == record:
            return
        if current is not None:
            self.sequencer.forget(record.worker_id)  # until the new client learns the incarnation
            await current.close()
        self.clients[record.worker_id] = WorkerClient(
            record, self._bus, self.sequencer, self._channels, relay=not self._bus.shared, on_entry=self.apply_entry,
            supervisor=self._supervisor, on_change=self._changed,
            snapshot_interval_batches=self._bus_config.snapshot_interval_batches)
        self._changed()
        for counter in (self._metrics.kv_resyncs, self._metrics.kv_malformed):  # rate() series exist from the start
            counter.labels(record.worker_id)

    async def _remove(self, worker_id: str) -> None:
        self.sequencer.forget(worker_id)  # first: a gap seen meanwhile must not resubscribe a closing client
        client = self.clients.pop(worker_id, None)
        self._changed()
        if client is not None:
            await client.close()

    async def _watch_registry(self, subscription: Subscription) -> None:
        """Apply the registry's changes; first read the whole registry again, for the changes a restart after an
        error missed (at the first start, a cheap repeat of ``start``'s read)."""
        await self._reread_members()
        async for item in subscription:
            if isinstance(item, Lost):  # membership changes were dropped: re-read the whole registry
                await self._reread_members()
                continue
            change = RegistryChange.from_bytes(item)
            if change.kind == ChangeKind.LEFT:
                await self._remove(change.record.worker_id)
            else:
                await self._upsert(change.record)

    async def _reread_members(self) -> None:
        try:
            members = await self._bus.members()
        except BusUnavailable:  # keep what we know; the bus reports Lost again when it is back
            return
        for worker_id in set(self.clients) - set(members):
            await self._remove(worker_id)
        for record in members.values():
            await self._upsert(record)

    def apply_entry(self, worker_id: str, entry: bytes, live_since: float) -> None:
        """Apply one entry of ``worker_id``'s bus log (see ``apply_batch`` for ``live_since``); one that is not a
        batch of that worker is counted, logged (the first, then every ``_MALFORMED_LOG_EVERY``th) and skipped."""
        try:
            batch = worker_pb2.KvEventBatch.FromString(entry)
        except DecodeError:
            batch = None
        if batch is None or batch.worker_id != worker_id or not batch.incarnation:
            self._metrics.kv_malformed.labels(worker_id).inc()
            count = self._num_malformed[worker_id] = self._num_malformed.get(worker_id, 0) + 1
            if count % _MALFORMED_LOG_EVERY == 1:
                log.warning("kv event log of %s: entry %d is not one of its batches (%d bytes); skipped", worker_id,
                            count, len(entry))
            return
        self.apply_batch(batch, live_since)

    def apply_batch(self, batch: worker_pb2.KvEventBatch, live_since: float) -> None:
        """Apply one worker's event batch to the index if it is the one due (see ``KvEventSequencer``); after a
        gap the index waits for the worker's next snapshot (a relaying client asks the worker for one).

        The event lag histogram counts only batches sent at or after ``live_since`` (wall clock): one sent
        before the router began reading the log (a late replica's warm-up, a re-read after ``Lost``) waited in
        the log for the router, not on the way to it."""
        outcome = self.sequencer.apply(batch)
        if outcome is BatchOutcome.GAP:
            log.info("kv events of %s: batch %d came after a gap; awaiting a snapshot", batch.worker_id,
                     batch.sequence)
            self._metrics.kv_resyncs.labels(batch.worker_id).inc()
            self.clients[batch.worker_id].resubscribe()  # a followed worker has a client
        elif outcome is BatchOutcome.APPLIED:
            self._metrics.kv_events.labels(batch.worker_id).inc(len(batch.events))
            if batch.sent_unix_s > 0 and batch.sent_unix_s >= live_since:
                self._metrics.kv_event_lag.observe(max(time.time() - batch.sent_unix_s, 0.0))


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
