"""The router's Prometheus metrics.

Request, routing and KV-event metrics are observed by the router as things happen, on its event loop. The
per-worker gauges (prefix-index size, requests in flight, worker states) are read from the ``WorkerSet`` and the
``PrefixIndex`` when scraped, by a collector, so they cannot drift from what the router routes on. Label sets are
bounded: ``method`` (4: ``Generate``, ``Complete``, ``chat.completions``, ``completions``), gRPC ``code`` (17),
``policy`` (one per router), ``worker`` (the pool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from radixserve.cluster.base.metrics import LATENCY_BUCKETS, RATIO_BUCKETS

_PREFIX = "radixserve_router_"
WORKER_STATES = ("up", "down", "draining")


class WorkerGauges(NamedTuple):
    """One worker's gauges at scrape time: its state, the pages the prefix index holds for it, the requests
    this router has in flight there, and the entries its KV event log on the bus retains (as last read)."""

    worker_id: str
    state: str
    num_indexed_pages: int
    num_in_flight: int
    num_log_entries: int = 0


class BusGauges(NamedTuple):
    """The router's view of the bus at scrape time: whether its index is stale (the bus unreachable), for how
    many seconds, and how many other routers' load it counts."""

    stale: bool
    staleness_s: float
    num_peer_routers: int


NO_BUS = BusGauges(False, 0.0, 0)


ROUTE_HINT_OUTCOMES = ("published", "dropped", "applied", "malformed")  # of router.route_hints


class RouterMetrics:
    """Everything one router exports, in ``registry``; ``policy`` labels the routing metrics."""

    def __init__(self, registry: CollectorRegistry, policy: str) -> None:
        self.registry = registry
        self._policy = policy
        self.requests = Counter(_PREFIX + "requests", "Requests answered, by method and final gRPC status code.",
                                ["method", "code"], registry=registry)
        self.decisions = Counter(_PREFIX + "routing_decisions", "Routing decisions, by policy and chosen worker.",
                                 ["policy", "worker"], registry=registry)
        self._decision_latency = Histogram(_PREFIX + "decision_latency_seconds",
                                           "Time to match the prompt in the prefix index and apply the policy.",
                                           ["policy"], registry=registry, buckets=LATENCY_BUCKETS).labels(policy)
        self._matched = Histogram(_PREFIX + "matched_prefix_ratio",
                                  "Share of the prompt's tokens the chosen worker holds, per decision.",
                                  ["policy"], registry=registry, buckets=RATIO_BUCKETS).labels(policy)
        self.kv_events = Counter(_PREFIX + "kv_events", "KV events applied to the prefix index, by worker.",
                                 ["worker"], registry=registry)
        self.kv_malformed = Counter(_PREFIX + "kv_malformed_entries",
                                    "Entries of a worker's KV event log that were not one of its batches, skipped.",
                                    ["worker"], registry=registry)
        self.kv_resyncs = Counter(_PREFIX + "kv_resyncs",
                                  "Gaps in a worker's KV event sequence, after which the index awaited a snapshot.",
                                  ["worker"], registry=registry)
        self.kv_event_lag = Histogram(_PREFIX + "kv_event_lag_seconds",
                                      "Worker taking a KV event batch from its engine to the router applying it (batches "
                                      "sent before the router began reading the worker's log are not counted).",
                                      registry=registry, buckets=LATENCY_BUCKETS)
        self.route_hints = Counter(_PREFIX + "route_hints",
                                   "Routing decisions shared with the other router replicas, by outcome: published, "
                                   "dropped (unsent), applied (another replica's), malformed (route log entries).",
                                   ["outcome"], registry=registry)
        for outcome in ROUTE_HINT_OUTCOMES:  # the series exist from the start, on every router
            self.route_hints.labels(outcome)
        self.background_task_failures = Counter(
            _PREFIX + "background_task_failures",
            "Unexpected errors that ended a background task (registry watch, KV log reader, KV relay, worker poll, "
            "shared load, route hints), each logged; the task was restarted.", ["task"], registry=registry)
        self.retries = Counter(_PREFIX + "retries", "Requests retried on another worker, by the failure's code.",
                               ["code"], registry=registry)
        self.ttft = Histogram(_PREFIX + "time_to_first_token_seconds",
                              "Request received to its first token sent, as the client sees it.",
                              registry=registry, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(_PREFIX + "e2e_request_latency_seconds",
                             "Request received to its last response sent, for requests that succeed.",
                             registry=registry, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter(_PREFIX + "prompt_tokens", "Prompt tokens of finished requests, by worker.",
                                     ["worker"], registry=registry)
        self.cached_tokens = Counter(_PREFIX + "cached_tokens",
                                     "Prompt tokens of finished requests served from the worker's cache.",
                                     ["worker"], registry=registry)
        self.completion_tokens = Counter(_PREFIX + "completion_tokens", "Tokens streamed to clients, by worker.",
                                         ["worker"], registry=registry)

    def bind(self, read: Callable[[], Iterable[WorkerGauges]], bus: Callable[[], BusGauges] = lambda: NO_BUS) -> None:
        """Expose the per-worker gauges and the bus gauges, read from ``read()`` and ``bus()`` at each scrape
        (called on the scraping thread)."""
        self.registry.register(_WorkerCollector(read, bus))

    def on_decision(self, worker_id: str, seconds: float, matched_ratio: float) -> None:
        self.decisions.labels(self._policy, worker_id).inc()
        self._decision_latency.observe(seconds)
        self._matched.observe(matched_ratio)


class _WorkerCollector(Collector):
    """Per-worker gauges from the router's live worker set."""

    def __init__(self, read: Callable[[], Iterable[WorkerGauges]], bus: Callable[[], BusGauges]) -> None:
        self._read = read
        self._bus = bus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        workers = list(self._read())
        pages = GaugeMetricFamily(_PREFIX + "prefix_index_pages", "Pages the prefix index holds for a worker.",
                                  labels=["worker"])
        in_flight = GaugeMetricFamily(_PREFIX + "in_flight_requests", "Requests this router has on a worker.",
                                      labels=["worker"])
        states = GaugeMetricFamily(_PREFIX + "workers", "Workers the router knows, by state.", labels=["state"])
        log_entries = GaugeMetricFamily(_PREFIX + "kv_log_entries",
                                        "Entries a worker's KV event log on the bus retains, as last read.",
                                        labels=["worker"])
        for worker in workers:
            pages.add_metric([worker.worker_id], worker.num_indexed_pages)
            in_flight.add_metric([worker.worker_id], worker.num_in_flight)
            log_entries.add_metric([worker.worker_id], worker.num_log_entries)
        for state in WORKER_STATES:
            states.add_metric([state], sum(worker.state == state for worker in workers))
        bus = self._bus()
        stale = GaugeMetricFamily(_PREFIX + "index_stale",
                                  "1 while the bus is unreachable: the index may miss events and other routers' load.",
                                  value=float(bus.stale))
        staleness = GaugeMetricFamily(_PREFIX + "index_staleness_seconds",
                                      "Seconds since the bus last answered (0 while it does).", value=bus.staleness_s)
        peers = GaugeMetricFamily(_PREFIX + "peer_routers", "Other routers whose load this router counts.",
                                  value=bus.num_peer_routers)
        yield from (pages, in_flight, states, log_entries, stale, staleness, peers)
