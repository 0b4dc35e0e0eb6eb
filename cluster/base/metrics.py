"""Metrics helpers shared by the router and the workers: buckets, the /metrics endpoint, and reading one back.

Every process keeps its metrics in its own ``CollectorRegistry`` (never the global one, so several engines or a
router and an engine can share a process, as tests do) and serves it with ``MetricsEndpoint``. Names follow
``radixserve_<component>_<what>_<unit>``: counters end in ``_total``, latencies in ``_seconds``.

``scrape`` reads an endpoint back into ``Sample`` rows; ``radixserve status`` and ``top`` use it, so they show
exactly what Prometheus scrapes.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.parser import text_string_to_metric_families

# Counters and histograms would each add a ``*_created`` gauge series that no dashboard reads; leave them out.
disable_created_metrics()

# Latency buckets fit for both a 2-core CPU serving a 135M model (TTFT of seconds under load) and a GPU (ITL of
# milliseconds): about 20% apart from 1 ms to 2 minutes, so an interpolated quantile is within ~10%.
LATENCY_BUCKETS: tuple[float, ...] = tuple(round(0.001 * 1.2**i, 6) for i in range(65)) + (float("inf"),)
# Counts (batch sizes, tokens per step): powers of two up to 64k.
COUNT_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(17)) + (float("inf"),)
RATIO_BUCKETS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, float("inf"))


class MetricsEndpoint:
    """Serves ``registry`` as Prometheus text at ``http://<host>:<port>/metrics`` from a daemon thread.

    ``port`` 0 picks a free port; ``address`` is ``host:port`` once started. ``stop`` is idempotent.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.address = f"{host}:{self._server.server_port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)


class Sample(NamedTuple):
    """One exposed sample: its full name (``_bucket``/``_sum``/``_count`` included), labels and value."""

    name: str
    labels: dict[str, str]
    value: float


def scrape(address: str, timeout_s: float = 2.0) -> list[Sample]:
    """The samples ``http://<address>/metrics`` exposes now. Raises OSError when the endpoint does not answer."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        text = response.read().decode()
    return [Sample(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exposes now (histograms as their ``_bucket``, ``_sum`` and ``_count``)."""
    return {sample.name for family in registry.collect() for sample in family.samples}


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def histogram_quantile(samples: Iterable[Sample], name: str, q: float, **labels: str) -> float | None:
    """The ``q`` quantile of histogram ``name`` (its buckets summed over the other labels), interpolated within
    a bucket as Prometheus' ``histogram_quantile`` does; None when it has no observations."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket" and labels.items() <= s.labels.items():
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower
