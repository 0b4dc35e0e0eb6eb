"""The router process: the router core behind its front ends, its worker set and prefix index, its metrics.

The front ends are thin adapters over ``router.core.RouterCore`` (which states the guarantees every request
gets): ``radixserve.v1.Generation`` (``router.v1_api``) and KServe v2's ``inference.GRPCInferenceService``
(``router.kserve_api``) on the gRPC port, with the standard health service and server reflection; and the
OpenAI-compatible HTTP API (``cluster.base.openai``) on ``http_port`` unless None.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry

from radixserve.cluster.base.bus import EventBus
from radixserve.cluster.base.config import BusConfig, RouterConfig, SecurityConfig
from radixserve.cluster.base.grpc_util import HealthReporter
from radixserve.cluster.base.metrics import MetricsEndpoint
from radixserve.cluster.base.openai.app import COUNTED_METHODS as HTTP_METHODS
from radixserve.cluster.base.openai.app import HttpOptions, create_app
from radixserve.cluster.base.openai.server import HttpServer
from radixserve.cluster.base.security import (ApiKeys, add_port, call_metadata, cluster_keys,
                                              grpc_channel_credentials, grpc_server, uvicorn_tls)
from radixserve.cluster.base.wire import add_servicer
from radixserve.router import kserve_api
from radixserve.router.core import RETRYABLE, RouterCore
from radixserve.router.metrics import NO_BUS, BusGauges, RouterMetrics, WorkerGauges
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.v1_api import COUNTED_METHODS, GENERATION, GenerationService
from radixserve.router.workers import WorkerChannels, WorkerSet

log = logging.getLogger(__name__)


class Router:
    """The router process: the public servers, its worker set and prefix index. Runs on one asyncio loop.

    ``security`` secures its ports (TLS) and its calls to workers (TLS, the router's certificate under worker
    mTLS); with API keys (``api_keys``, by default those ``security`` names) every call but health and
    reflection needs one. Its calls to workers carry the cluster key (``security.cluster_key``), which
    ``ListWorkers`` (an admin call: it names the workers' addresses) needs too: a client's key there is
    PERMISSION_DENIED. Its metrics (``self.metrics``) are
    served at ``metrics_address`` from ``start`` until ``stop`` when ``metrics_port`` is given (0: a free port) on
    ``metrics_host``. ``http_address`` is where the HTTP API listens (None without ``config.http_port``).

    On a shared bus several routers run side by side, each named ``router_id`` (unique among them); they share
    the workers' KV event logs, their routing decisions (``bus_config.share_routes``) and, every
    ``bus_config.load_interval_s``, their load. A router that starts
    when the workers already hold a cache listens at once but reports NOT_SERVING (gRPC health, HTTP
    ``/health`` 503, KServe ready false) until its index has read every worker's snapshot and log tail.
    """

    def __init__(self, config: RouterConfig, bus: EventBus, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = None, security: SecurityConfig | None = None,
                 api_keys: ApiKeys | None = None, router_id: str = "router-0",
                 bus_config: BusConfig | None = None) -> None:
        self.config = config
        self.security = security or SecurityConfig()
        self.api_keys = api_keys if api_keys is not None else ApiKeys.from_config(self.security)
        cluster_key = cluster_keys(self.security)
        self.index = PrefixIndex(config.pending_ttl_s, config.approx_ttl_s)
        self.metrics = RouterMetrics(CollectorRegistry(), config.policy)
        self.router_id = router_id
        self.bus = bus
        self.workers = WorkerSet(bus, self.index, self.metrics, WorkerChannels(
            config.health_interval_s, config.max_message_bytes, grpc_channel_credentials(self.security),
            call_metadata(cluster_key)), router_id, bus_config)
        self.metrics.bind(self._gauges, self._bus_gauges)
        for status in RETRYABLE:  # the series dashboards rate() exist from the start, at 0
            self.metrics.retries.labels(status.name)
        for method in (*COUNTED_METHODS, *kserve_api.COUNTED_METHODS, *HTTP_METHODS):
            self.metrics.requests.labels(method, "OK")
        self.core = RouterCore(config, self.workers, self.index, self.metrics)
        self.service = GenerationService(self.core, self.workers, self.index, config.policy)
        self.kserve = kserve_api.InferenceService(self.core)
        self._http: HttpServer | None = None
        if config.http_port is not None:
            app = create_app(self.core, HttpOptions(config.max_message_bytes, self.api_keys),
                             on_refused=self.core.count_refused)
            self._http = HttpServer(app, config.host, config.http_port, uvicorn_tls(self.security))
        self.http_address: str | None = None
        self._metrics_at = None if metrics_port is None else (metrics_host, metrics_port)
        self._endpoint: MetricsEndpoint | None = None
        self._server = grpc_server(config.max_message_bytes, self.api_keys, cluster_key,
                                   [f"/{GENERATION.full_name}/ListWorkers"])
        add_servicer(self._server, GENERATION, self.service, self.service.count_undecodable)
        add_servicer(self._server, kserve_api.KSERVE, self.kserve, self.kserve.count_undecodable)
        self._health = HealthReporter(self._server, [GENERATION.full_name, kserve_api.KSERVE.full_name])
        self.address = ""

    def _gauges(self) -> list[WorkerGauges]:
        clients = list(self.workers.clients.values())  # a copy: the event loop may change the dict meanwhile
        return [WorkerGauges(c.worker_id, c.state, self.index.num_pages(c.worker_id), c.outstanding.num_in_flight,
                             c.num_log_entries) for c in clients]

    def _bus_gauges(self) -> BusGauges:
        shared = self.workers.shared_load
        return NO_BUS if shared is None else BusGauges(shared.stale, shared.staleness_s, shared.num_peers)

    @property
    def http_url(self) -> str | None:
        """``http(s)://host:port`` of the HTTP API once started; None without one."""
        return self._http.url if self._http is not None and self.http_address is not None else None

    @property
    def metrics_address(self) -> str | None:
        return self._endpoint.address if self._endpoint is not None else None

    async def start(self, warm_timeout_s: float = 60.0) -> str:
        """Listen, follow the workers and warm the index (NOT_SERVING until warm, at most ``warm_timeout_s``);
        returns the bound ``host:port``."""
        port = add_port(self._server, f"{self.config.host}:{self.config.port}", self.security)
        if port == 0:
            raise RuntimeError(f"router: cannot listen on {self.config.host}:{self.config.port} (port in use?)")
        await self._health.set_serving(False)  # until warm
        await self._server.start()
        self.address = f"{self.config.host}:{port}"
        if self._http is not None:
            self.http_address = await self._http.start()
        if self._metrics_at is not None:
            self._endpoint = MetricsEndpoint(self.metrics.registry, *self._metrics_at)
        await self.workers.start()
        if not await self.workers.wait_warm(warm_timeout_s):
            cold = [c.worker_id for c in self.workers.clients.values() if not c.events_live]
            log.warning("router %s: index not warm after %.0f s (no snapshot yet from %s); serving anyway",
                        self.router_id, warm_timeout_s, ", ".join(cold))
        await self.core.learn_model()
        self.core.warm = True
        await self._health.set_serving(True)
        return self.address

    async def stop(self) -> None:
        """Drain: refuse new requests (HTTP ``/health`` 503), let those in flight finish (up to
        ``drain_timeout_s``), then stop."""
        self.core.draining = True
        await self._health.set_serving(False)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.core.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._http is not None:
            await self._http.stop(grace_s=1.0)
        await self._server.stop(grace=1.0)
        self.core.close()
        await self.workers.close()
        if self._endpoint is not None:
            self._endpoint.stop()
