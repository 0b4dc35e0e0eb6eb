"""The router process: the router core behind its front ends, its worker set and prefix index, its metrics.

The front ends are thin adapters over ``router.core.RouterCore`` (which states the guarantees every request
gets): ``radixserve.v1.Generation`` on the gRPC port (``router.v1_api``), with the standard health service and
server reflection; and the OpenAI-compatible HTTP API (``cluster.base.openai``) on ``http_port`` unless None.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from prometheus_client import CollectorRegistry

from radixserve.cluster.base.bus import EventBus
from radixserve.cluster.base.config import RouterConfig, SecurityConfig
from radixserve.cluster.base.grpc_util import HealthReporter, server_options
from radixserve.cluster.base.metrics import MetricsEndpoint
from radixserve.cluster.base.openai.app import COUNTED_METHODS as HTTP_METHODS
from radixserve.cluster.base.openai.app import HttpOptions, create_app
from radixserve.cluster.base.openai.server import HttpServer
from radixserve.cluster.base.security import ApiKeys, uvicorn_tls
from radixserve.cluster.base.wire import add_servicer
from radixserve.router.core import RETRYABLE, RouterCore
from radixserve.router.metrics import RouterMetrics, WorkerGauges
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.v1_api import COUNTED_METHODS, GENERATION, GenerationService
from radixserve.router.workers import WorkerSet


class Router:
    """The router process: the public servers, its worker set and prefix index. Runs on one asyncio loop.

    Its metrics (``self.metrics``) are served at ``metrics_address`` from ``start`` until ``stop`` when
    ``metrics_port`` is given (0: a free port) on ``metrics_host``. ``http_address`` is where the HTTP API
    listens (None without ``config.http_port``). ``security`` secures the HTTP API: TLS and API keys.
    """

    def __init__(self, config: RouterConfig, bus: EventBus, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = None, security: SecurityConfig = SecurityConfig()) -> None:
        self.config = config
        self.index = PrefixIndex(config.pending_ttl_s, config.approx_ttl_s)
        self.metrics = RouterMetrics(CollectorRegistry(), config.policy)
        self.workers = WorkerSet(bus, self.index, config.health_interval_s, config.max_message_bytes, self.metrics)
        self.metrics.bind(self._gauges)
        for status in RETRYABLE:  # the series dashboards rate() exist from the start, at 0
            self.metrics.retries.labels(status.name)
        for method in (*COUNTED_METHODS, *HTTP_METHODS):
            self.metrics.requests.labels(method, "OK")
        self.core = RouterCore(config, self.workers, self.index, self.metrics)
        self.service = GenerationService(self.core, self.workers, self.index, config.policy)
        self._http: HttpServer | None = None
        if config.http_port is not None:
            options = HttpOptions(config.max_message_bytes, ApiKeys.from_config(security))
            app = create_app(self.core, options, on_refused=self.core.count_refused)
            self._http = HttpServer(app, config.host, config.http_port, uvicorn_tls(security))
        self.http_address: str | None = None
        self._metrics_at = None if metrics_port is None else (metrics_host, metrics_port)
        self._endpoint: MetricsEndpoint | None = None
        self._server = grpc.aio.server(options=server_options(config.max_message_bytes))
        add_servicer(self._server, GENERATION, self.service, self.service.count_undecodable)
        self._health = HealthReporter(self._server, [GENERATION.full_name])
        self.address = ""

    def _gauges(self) -> list[WorkerGauges]:
        clients = list(self.workers.clients.values())  # a copy: the event loop may change the dict meanwhile
        return [WorkerGauges(c.worker_id, c.state, self.index.num_pages(c.worker_id), c.outstanding.num_in_flight)
                for c in clients]

    @property
    def http_url(self) -> str | None:
        """``http(s)://host:port`` of the HTTP API once started; None without one."""
        return self._http.url if self._http is not None and self.http_address is not None else None

    @property
    def metrics_address(self) -> str | None:
        return self._endpoint.address if self._endpoint is not None else None

    async def start(self) -> str:
        """Listen and follow the workers; returns the bound ``host:port``."""
        port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if port == 0:
            raise RuntimeError(f"router: cannot listen on {self.config.host}:{self.config.port} (port in use?)")
        await self.workers.start()
        await self.workers.wait_informed(timeout_s=30)
        await self._server.start()
        await self._health.set_serving(True)
        self.address = f"{self.config.host}:{port}"
        if self._http is not None:
            self.http_address = await self._http.start()
        if self._metrics_at is not None:
            self._endpoint = MetricsEndpoint(self.metrics.registry, *self._metrics_at)
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
        await self.workers.close()
        if self._endpoint is not None:
            self._endpoint.stop()
