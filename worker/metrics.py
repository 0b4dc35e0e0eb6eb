"""A worker's Prometheus metrics, labelled by ``worker``.

Latency and step histograms are observed by the engine as things happen (``EngineMetrics.on_*``, from the
stepping thread). Counters and gauges that the engine already keeps (``EngineLoad``) are read when scraped, by a
collector, so they are never counted twice and always agree with ``GetLoad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from radixserve.cluster.base.metrics import COUNT_BUCKETS, LATENCY_BUCKETS
from radixserve.worker.stats import EngineLoad

_PREFIX = "radixserve_worker_"


class EngineMetrics:
    """The histograms one engine observes, registered in ``registry`` with ``worker=worker_id``.

    ``bind(load)`` adds the collector that reads ``load()`` (``Engine.load``) at scrape time.
    """

    def __init__(self, registry: CollectorRegistry, worker_id: str) -> None:
        self.registry = registry
        self.worker_id = worker_id

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(_PREFIX + name, doc, ["worker"], registry=registry,
                             buckets=LATENCY_BUCKETS).labels(worker_id)

        def count(name: str, doc: str) -> Histogram:
            return Histogram(_PREFIX + name, doc, ["worker"], registry=registry,
                             buckets=COUNT_BUCKETS).labels(worker_id)

        self._ttft = latency("time_to_first_token_seconds", "Arrival at the engine to the first sampled token.")
        self._itl = latency("inter_token_latency_seconds", "Time between consecutive tokens of one sample.")
        self._e2e = latency("e2e_request_latency_seconds", "Arrival at the engine to the request's end.")
        self._queue = latency("queue_time_seconds", "Arrival to the first step that computes the request.")
        self._prefill = latency("prefill_time_seconds", "First step that computes the request to its first token.")
        self._step = latency("step_duration_seconds", "Wall time of one engine step (schedule, forward, sample).")
        self._batch = count("step_batch_requests", "Samples in one step's batch.")
        self._tokens = count("step_tokens", "Tokens one step feeds the model (decode tokens plus prefill chunks).")

    def bind(self, load: Callable[[], EngineLoad]) -> None:
        """Expose the engine's counters and gauges, read from ``load()`` at each scrape."""
        self.registry.register(_LoadCollector(self.worker_id, load))

    def on_step(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        self._step.observe(seconds)
        self._batch.observe(num_seqs)
        self._tokens.observe(num_tokens)

    def on_scheduled(self, queue_s: float) -> None:
        self._queue.observe(queue_s)

    def on_first_token(self, ttft_s: float, prefill_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._prefill.observe(prefill_s)

    def on_token(self, itl_s: float) -> None:
        self._itl.observe(itl_s)

    def on_finished(self, e2e_s: float) -> None:
        self._e2e.observe(e2e_s)


class _LoadCollector(Collector):
    """Counters and gauges from one ``EngineLoad`` snapshot per scrape."""

    def __init__(self, worker_id: str, load: Callable[[], EngineLoad]) -> None:
        self._worker_id = worker_id
        self._load = load

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        load = self._load()
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        for family, name, doc, value in (
            (gauge, "running_requests", "Requests with a sample in the running batch.", load.num_running),
            (gauge, "waiting_requests", "Requests in flight not yet running (queued or preempted).", load.num_waiting),
            (gauge, "kv_used_pages", "KV pages held by requests or the radix cache.", load.num_pages_used),
            (gauge, "kv_free_pages", "KV pages free.", load.num_pages_free),
            (gauge, "kv_evictable_pages", "Cached KV pages no request holds.", load.num_pages_evictable),
            (counter, "prefix_cache_query_tokens", "Prompt tokens looked up in the radix cache (first admission).",
             load.num_prompt_tokens),
            (counter, "prefix_cache_hit_tokens", "Prompt tokens served from the radix cache.",
             load.num_cached_prompt_tokens),
            (counter, "prompt_tokens", "Prompt tokens of requests that reached their first token.",
             load.num_prompt_tokens),
            (counter, "generated_tokens", "Tokens sampled.", load.num_generated_tokens),
            (counter, "computed_tokens", "Tokens fed to the model: prefill, recompute and decode.",
             load.num_computed_tokens),
            (counter, "requests_finished", "Requests that ended, aborted ones included.", load.num_requests_finished),
            (counter, "steps", "Engine steps that ran the model.", load.num_steps),
            (counter, "kv_evicted_pages", "Cached KV pages evicted to make room.", load.num_evicted_pages),
            (counter, "preemptions", "Running samples preempted for lack of KV pages.", load.num_preemptions),
        ):
            metric = family(_PREFIX + name, doc, labels=["worker"])
            metric.add_metric([self._worker_id], value)
            yield metric
