"""Load shared between routers over a shared bus: each publishes what it has in flight, each reads the others'.

With one router, its own accounting (``routing.WorkerLoad``) is the truth about the requests it sent. With N
routers each sees about 1/N of it, and a hot prefix could pile N times deeper onto its holder before spreading.
``SharedLoad`` closes that gap: every ``interval_s`` it publishes this router's figures per worker (requests in
flight, pending prefill and output tokens) as one load document, reads every other router's back and sums them
into each worker's ``peer_load``, which ``routing.decide`` adds to this router's own figures. It also reads the
workers' own load reports, which they publish at the same pace (fresher than the health poll).

A router that stopped publishing drops out when its document expires (``ttl_s``). While the bus is unreachable
the last figures are kept for ``ttl_s`` and then dropped, so routing falls back to the router's own load and the
workers' polled reports; ``stale`` and ``staleness_s`` say so for the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from google.protobuf.message import DecodeError

from radixserve.cluster.base.bus import BusUnavailable, EventBus
from radixserve.router.routing import NO_REPORT, ReportedLoad, WorkerLoad
from radixserve.v1 import types_pb2, worker_pb2

log = logging.getLogger(__name__)

_LOG_LENGTH_EVERY = 10  # read the KV log lengths (for the metrics) every this many rounds


class LoadHolder(Protocol):
    """What ``SharedLoad`` reads and writes of one worker's client."""

    outstanding: WorkerLoad
    peer_load: ReportedLoad
    load: types_pb2.LoadReport
    num_log_entries: int
    info: worker_pb2.WorkerInfo | None


class SharedLoad:
    """This router's load published on ``bus`` as ``router_id``; the other routers' summed into ``clients``."""

    def __init__(self, bus: EventBus, router_id: str, clients: Mapping[str, LoadHolder], interval_s: float,
                 ttl_s: float | None = None) -> None:
        self._bus = bus
        self.router_id = router_id
        self._clients = clients
        self._interval_s = interval_s
        self._ttl_s = ttl_s if ttl_s is not None else max(1.0, 20 * interval_s)
        self._last_contact = time.monotonic()
        self.stale = False
        self.num_peers = 0
        self._stopped = False

    @property
    def staleness_s(self) -> float:
        """Seconds since the bus last answered this router (0 while it does)."""
        return time.monotonic() - self._last_contact if self.stale else 0.0

    async def run(self) -> None:
        """Exchange load every ``interval_s`` until ``stop`` (a cancellation that redis-py turned into a connection
        error, hence ``BusUnavailable``, is caught with it: the flag still ends the loop)."""
        rounds = 0
        while not self._stopped:
            try:
                await self.exchange(read_log_lengths=rounds % _LOG_LENGTH_EVERY == 0)
                if self.stale:
                    log.info("bus reachable again after %.1f s", time.monotonic() - self._last_contact)
                self.stale = False
                self._last_contact = time.monotonic()
            except BusUnavailable as error:
                if not self.stale:
                    log.warning("bus unreachable (%s): routing on the last index and this router's own load", error)
                self.stale = True
                if self.staleness_s > self._ttl_s:
                    self._forget_peers()
            rounds += 1
            await asyncio.sleep(self._interval_s)

    async def exchange(self, read_log_lengths: bool = False) -> None:
        """One round: publish this router's figures, read the others' and the workers' reports."""
        clients = dict(self._clients)  # the registry may change it while we wait on the bus
        own = {worker_id: _figures(client.outstanding) for worker_id, client in clients.items()}
        await self._bus.put_load("router", self.router_id, json.dumps(own).encode(), self._ttl_s)
        documents = await self._bus.loads("router")
        peers = [_parse_router(name, payload) for name, payload in documents.items() if name != self.router_id]
        self.num_peers = len(peers)
        reports = await self._bus.loads("worker")
        for worker_id, client in clients.items():
            client.peer_load = _sum(peer.get(worker_id) for peer in peers)
            report = _parse_worker(worker_id, reports.get(worker_id))
            if report is not None and client.info is not None and report.incarnation == client.info.incarnation:
                client.load = report
            if read_log_lengths:
                client.num_log_entries = await self._bus.kv_log_length(worker_id)

    def stop(self) -> None:
        """End ``run`` at its next round."""
        self._stopped = True

    async def withdraw(self) -> None:
        """Publish an empty document: the others stop counting this router's requests at once."""
        try:
            await self._bus.put_load("router", self.router_id, b"{}", self._ttl_s)
        except BusUnavailable:
            pass

    def _forget_peers(self) -> None:
        for client in self._clients.values():
            client.peer_load = NO_REPORT


def _figures(load: WorkerLoad) -> list[int]:
    return [load.num_in_flight, load.pending_prefill_tokens, load.pending_output_tokens]


def _parse_router(name: str, payload: bytes) -> dict[str, ReportedLoad]:
    """Another router's document; a malformed one counts as no load (and is logged)."""
    try:
        values = json.loads(payload)
        return {worker_id: ReportedLoad(*(int(v) for v in figures)) for worker_id, figures in values.items()}
    except (ValueError, TypeError, AttributeError) as error:
        log.warning("load document of router %s is malformed (%s); ignored", name, error)
        return {}


def _parse_worker(worker_id: str, payload: bytes | None) -> types_pb2.LoadReport | None:
    if payload is None:
        return None
    try:
        return types_pb2.LoadReport.FromString(payload)
    except DecodeError:
        log.warning("load report of worker %s is malformed; ignored", worker_id)
        return None


def _sum(loads: Iterable[ReportedLoad | None]) -> ReportedLoad:
    total = [0, 0, 0]
    for load in loads:
        if load is not None:
            total = [a + b for a, b in zip(total, load, strict=True)]
    return ReportedLoad(*total)
