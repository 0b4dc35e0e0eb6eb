"""Simulated router replicas, and what one learns late of the others and of the workers, on the simulated clock.

A ``SimRouter`` keeps what one replica of the real router keeps: its own ``PrefixIndex`` (the simulator delivers
every worker's KV events to every router's index; its own routing, and with shared routes the others', credits
pages as routed), its own
``WorkerLoad`` of what it has in flight on each worker, and its own policy. It routes with
``router.routing.decide`` given the workers' load reports as of its last poll and, with shared load, what the
other routers last published of their in-flight load.

Staleness is ``Sampled``: a value as a reader that samples it periodically sees it, computed lazily from the times
the value changes, so nothing is scheduled and an idle cluster has no events left.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from radixserve.router.policies import RouteRequest, make_policy
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.routing import Decision, ReportedLoad, WorkerLoad, decide
from radixserve.worker.kv.radix_cache import KVEvent

T = TypeVar("T")


class Sampled(Generic[T]):
    """A changing value as seen through samples taken at ``phase_s + k * interval_s`` (every integer ``k``).

    ``value(now)`` is the value as of the last sample time at or before ``now``; a sample taken at the instant of
    a change sees the value before it. The owner calls ``changing(now)`` just before each change, with ``now``
    never decreasing; ``read(at_s)`` gives the value as of ``at_s``, a time since the last change. Both calls are
    O(1) but for at most one ``read``.
    """

    def __init__(self, read: Callable[[float], T], interval_s: float, phase_s: float = 0.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self._read = read
        self._interval_s = interval_s
        self._phase_s = phase_s
        self._changed_s = -math.inf
        self._sample = read(-math.inf)

    def changing(self, now: float) -> None:
        """The value is about to change at ``now``: keep the sample it gives, if one was taken since the last."""
        sampled_s = self._last_sample_s(now)
        if sampled_s > self._changed_s:
            self._sample = self._read(sampled_s)
        self._changed_s = now

    def value(self, now: float) -> T:
        sampled_s = self._last_sample_s(now)
        return self._read(sampled_s) if sampled_s > self._changed_s else self._sample

    def _last_sample_s(self, now: float) -> float:
        return self._phase_s + math.floor((now - self._phase_s) / self._interval_s) * self._interval_s


class SimRouter:
    """One router replica over ``worker_ids``; ``clock`` is the simulated time, which ``now`` arguments equal.

    It publishes its in-flight figures every ``load_interval_s`` from ``phase_s`` on (``published``); every
    change to its ``loads`` goes through ``route`` and ``notice``, which keep that publication current.
    """

    def __init__(self, worker_ids: Sequence[str], policy: str, load_weight: float, decode_weight: float,
                 rng: random.Random,
                 pending_ttl_s: float, approx_ttl_s: float, clock: Callable[[], float], load_interval_s: float,
                 phase_s: float) -> None:
        self._worker_ids = list(worker_ids)
        self.index = PrefixIndex(pending_ttl_s, approx_ttl_s, clock=clock)
        for worker_id in self._worker_ids:
            self.index.set_events_live(worker_id, True)
        self.loads = [WorkerLoad() for _ in self._worker_ids]
        self._policy = make_policy(policy, load_weight, decode_weight, rng)
        self._published = Sampled(lambda at_s: self._figures(), load_interval_s, phase_s)

    def route(self, request: RouteRequest, hashes: Sequence[int], request_id: Hashable,
              reports: Sequence[ReportedLoad], peers: Sequence[ReportedLoad] | None, now: float) -> Decision:
        """Choose a worker for the request (``decide``) and count it there, as the real router does."""
        decision = decide(self._policy, self.index, request, hashes, self._worker_ids, self.loads, reports, peers)
        self._published.changing(now)
        self.index.record_routed(self._worker_ids[decision.worker], hashes)
        self.loads[decision.worker].begin(request_id, decision.prefill_tokens, decision.output_tokens,
                                          decision.active_pages)
        return decision

    def notice(self, w: int, request_id: Hashable, num_tokens: int, first: bool, finished: bool, now: float) -> None:
        """The request streamed ``num_tokens`` more tokens from worker ``w`` (``first``: its first among them;
        ``finished``: its last)."""
        self._published.changing(now)
        load = self.loads[w]
        load.progress(request_id, num_tokens)
        if first:
            load.first_token(request_id)
        if finished:
            load.end(request_id)

    def credit(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Another router sent a prompt with ``hashes`` to ``worker_id`` (a route hint): credit it as that
        router's own decision is credited."""
        self.index.record_routed(worker_id, hashes)

    def apply_events(self, worker_id: str, events: Sequence[KVEvent]) -> None:
        for event in events:
            if event.kind == "stored":
                self.index.apply_stored(worker_id, event.page_hashes)
            else:
                self.index.apply_removed(worker_id, event.page_hashes)

    def published(self, now: float) -> tuple[ReportedLoad, ...]:
        """Its figures per worker as of its last publication at or before ``now``."""
        return self._published.value(now)

    def _figures(self) -> tuple[ReportedLoad, ...]:
        return tuple(ReportedLoad(load.num_in_flight, load.pending_prefill_tokens, load.pending_output_tokens)
                     for load in self.loads)


def peer_load(published: Sequence[Sequence[ReportedLoad]]) -> list[ReportedLoad] | None:
    """Per worker, the sum of the figures the other routers published (``published``: one entry per other
    router, each per worker); None without other routers."""
    if not published:
        return None
    return [ReportedLoad(*map(sum, zip(*column))) for column in zip(*published, strict=True)]
