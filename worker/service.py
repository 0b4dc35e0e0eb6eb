"""The worker's gRPC service (``radixserve.v1.Worker``) over one ``Engine``, and the server that hosts it.

``WorkerServer`` owns a ``grpc.aio`` server with the Worker service, the standard health service
(``""`` and ``radixserve.v1.Worker``) and server reflection, and optionally the OpenAI-compatible HTTP API
(``worker.http_api``) over the same engine. Create, start and stop it on one asyncio loop;
any thread's loop will do (a Ray actor runs it in a dedicated thread).

Errors: request bytes that do not parse as the method's request message are ``INVALID_ARGUMENT`` naming the
message (``<Message>: cannot be parsed: ...``); a bad field of a Generate request is ``INVALID_ARGUMENT`` whose
details start with the field's path in ``WorkerGenerateRequest`` (``request_id``, ``token_ids``,
``sampling.<name>``); a full engine queue is
``RESOURCE_EXHAUSTED``; a request id already in flight is ``ALREADY_EXISTS``; a draining worker answers
new Generate calls with ``UNAVAILABLE``; a request whose own work failed (sampling, stop checking, detokenizing)
ends with ``INTERNAL`` naming it, and the other requests go on. ``Session`` streams carry Generate requests
multiplexed (``worker.session``), each ending as a Generate call of its own would.

KV events: the service pumps the engine's events into a ``worker.kv_hub.KvEventHub``, which numbers them and
fans them out to the gRPC ``StreamKvEvents`` streams and, on a shared bus, to the worker's own log there
(``worker.bus_publisher``). The service must be the engine's only consumer of ``take_events`` from before the
engine caches anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from radixserve.cluster.base.bus import EventBus, WorkerRecord
from radixserve.cluster.base.config import BusConfig, SecurityConfig
from radixserve.cluster.base.grpc_util import HealthReporter
from radixserve.cluster.base.metrics import MetricsEndpoint
from radixserve.cluster.base.openai.app import HttpOptions
from radixserve.cluster.base.openai.server import HttpServer
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.security import add_port, cluster_keys, grpc_server, uvicorn_tls
from radixserve.cluster.base.generation import GenerationError, Status
from radixserve.cluster.base.wire import (Undecodable, add_servicer, chunk_to_proto, grpc_code,
                                          sampling_params_from_proto)
from radixserve.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from radixserve.worker.backend import EngineBackend, engine_error
from radixserve.worker.bus_publisher import BusPublisher
from radixserve.worker.engine import Engine, EngineOverloaded, RequestFailed, RequestStream
from radixserve.worker.http_api import worker_app
from radixserve.worker.kv_hub import (DEFAULT_MAX_PENDING_BATCHES, KvBatches, KvEventHub, KvHubClosed,
                                      KvSubscriberLagged, KvSubscription)
from radixserve.worker.in_flight import InFlight
from radixserve.worker.outputs import RequestOutput
from radixserve.worker.session import Admitted, serve_session
from radixserve.worker.session_tcp import SessionListener

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
SERVICE_NAME = SERVICE.full_name
MAX_REQUEST_ID_CHARS = 128
_PUMP_INTERVAL_S = 0.01
_CANCEL_GRACE_S = 0.2  # lets the streams ended at stop send their status before the server cancels the rest
# Fields the engine's errors name (after engine_error) -> the WorkerGenerateRequest fields they come from.
_WIRE_FIELDS = {"prompt": "token_ids", "stop_token_ids": "sampling.stop_token_ids"}


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """``radixserve.v1.Worker`` over one engine. ``start`` and ``close`` bracket its event pump."""

    def __init__(self, engine: Engine, worker_id: str, address: str, incarnation: str,
                 max_pending_batches: int = DEFAULT_MAX_PENDING_BATCHES) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._incarnation = incarnation
        self._info = _worker_info(engine, worker_id, address, incarnation)
        self._hub = KvEventHub(max_pending_batches)
        self.batches = KvBatches(worker_id, incarnation)
        self._pump_task: asyncio.Task[None] | None = None
        self._draining = False
        self._in_flight = InFlight()

    def offer_framed_session(self, port: int) -> None:
        """Tell routers (``GetInfo``) that a framed Session (``worker.session_tcp``) listens on ``port``."""
        self._info.session_port = port

    def start(self) -> None:
        """Starts draining the engine's KV events every ``_PUMP_INTERVAL_S``; call on the serving loop."""
        self._pump_task = asyncio.create_task(self._pump())

    def begin_drain(self) -> None:
        """From now on, new Generate calls are refused with UNAVAILABLE."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for the Generate calls in flight to end; True if they all did."""
        return await self._in_flight.wait_idle(timeout_s)

    async def close(self) -> None:
        """Stops the pump after a last drain and ends every KV event stream with UNAVAILABLE."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        self._drain_events()
        self._hub.close()

    async def _pump(self) -> None:
        while True:
            self._drain_events()
            await asyncio.sleep(_PUMP_INTERVAL_S)

    def _drain_events(self) -> None:
        self._hub.publish(self._engine.take_events())

    # ---- RPCs -----------------------------------------------------------------------------------------

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        try:
            async with contextlib.aclosing(self.responses(request)) as responses:
                async for response in responses:
                    yield response
        except GenerationError as error:
            await context.abort(grpc_code(error.status), str(error))

    async def Session(self, requests: AsyncIterator[worker_pb2.WorkerSessionRequest | Undecodable],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.WorkerSessionResponse]:
        async with contextlib.aclosing(serve_session(requests, self.admit)) as answers:
            async for answer in answers:
                if isinstance(answer, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, answer.details)
                yield answer

    def admit(self, request: worker_pb2.WorkerGenerateRequest) -> Admitted:
        """Take one Generate request in now; its responses follow, counted in flight for ``wait_idle`` until the
        stream is closed (which the caller must do however it ends; closing early aborts the request and frees its
        pages). Raises ``GenerationError`` when the request is refused (draining: UNAVAILABLE; a bad field, a full
        queue, an id in flight); the stream raises it when the request's own work failed (INTERNAL)."""
        if self._draining:
            raise GenerationError(Status.UNAVAILABLE, "worker is draining")
        try:
            outputs = self._engine.submit(list(request.token_ids), _request_params(request), request.request_id)
        except (ValueError, EngineOverloaded) as error:
            raise engine_error(error).renamed(lambda name: _WIRE_FIELDS.get(name, name)) from None
        return _Responses(outputs, self._in_flight)

    async def responses(self, request: worker_pb2.WorkerGenerateRequest
                        ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        """``admit``'s responses as a generator, whose closing closes the stream."""
        admitted = self.admit(request)
        try:
            async for response in admitted:
                yield response
        finally:
            admitted.close()

    async def GetInfo(self, request: worker_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.WorkerInfo:
        return self._info

    async def GetLoad(self, request: worker_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> types_pb2.LoadReport:
        return self.load_report()

    def load_report(self) -> types_pb2.LoadReport:
        """The engine's load now, as ``GetLoad`` answers it and the bus publisher publishes it; ``draining`` from
        ``begin_drain`` on, so routers send the worker nothing new."""
        load = self._engine.load()
        return types_pb2.LoadReport(
            num_running=load.num_running, num_waiting=load.num_waiting, num_pages_used=load.num_pages_used,
            num_pages_free=load.num_pages_free, num_pages_evictable=load.num_pages_evictable,
            num_prompt_tokens=load.num_prompt_tokens, num_cached_prompt_tokens=load.num_cached_prompt_tokens,
            hit_ratio=load.hit_ratio, num_requests_finished=load.num_requests_finished,
            num_generated_tokens=load.num_generated_tokens, incarnation=self._incarnation,
            num_pending_prefill_tokens=load.num_pending_prefill_tokens,
            num_pending_output_tokens=load.num_pending_output_tokens, draining=self._draining)

    def subscribe_kv(self) -> KvSubscription:
        """A subscription to the KV event batches (the freshest snapshot first); ``KvHubClosed`` once stopping."""
        self._drain_events()
        return self._hub.subscribe()

    async def StreamKvEvents(self, request: worker_pb2.StreamKvEventsRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.KvEventBatch]:
        try:
            subscription = self.subscribe_kv()
        except KvHubClosed as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        with subscription:
            yield self.batches.snapshot(subscription)
            while True:
                try:
                    batch = await subscription.next_batch()
                except KvSubscriberLagged as error:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
                except KvHubClosed as error:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
                yield self.batches.live(batch)

    async def FlushCache(self, request: worker_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> worker_pb2.FlushCacheResponse:
        num_freed = await asyncio.wrap_future(self._engine.flush_cache())
        return worker_pb2.FlushCacheResponse(num_pages_freed=num_freed)

class WorkerServer:
    """Serves one engine over gRPC: the Worker service, health checking and reflection; and, with ``http_port``
    (0: a free port), the OpenAI-compatible HTTP API over the same engine at ``http_address``
    (``worker.http_api``; bodies up to ``max_message_bytes``).

    Runs once: ``start``, then ``stop``. ``address`` is the ``host:port`` actually bound (None before
    ``start``); ``incarnation`` is a fresh uuid per server, so routers notice a restarted worker. With
    ``metrics_port`` (0: a free port) the engine's metrics are served at ``metrics_address`` from ``start``
    until ``stop``. ``security`` secures the gRPC port and the HTTP API (TLS; under ``worker_mtls`` only clients
    with a certificate signed by ``ca_file`` are served); with a cluster key (``security.cluster_key``, required
    with API keys) every call on both ports but health and reflection needs that key, and clients' API keys are
    refused: the worker's APIs are the cluster's own (routers, or a gateway given the cluster key).
    ``http_port`` (0: a free port; None: none) serves the OpenAI-compatible API over the engine. Without TLS the
    worker also serves the framed Session (``worker.session_tcp``) on ``session_port`` of ``host`` (0: a free
    port; None: none), named in ``GetInfo``, behind the same cluster key.
    With a shared ``bus`` (Redis) the worker keeps its own record, KV event log and load there
    (``worker.bus_publisher``, paced by ``bus_config``) from ``start`` until ``stop`` withdraws it; without one,
    whoever started it announces it and routers relay its events.
    """

    def __init__(self, engine: Engine, worker_id: str, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = 4 * 2**20,
                 max_pending_batches: int = DEFAULT_MAX_PENDING_BATCHES, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = None, http_port: int | None = None,
                 security: SecurityConfig | None = None, bus: EventBus | None = None,
                 bus_config: BusConfig | None = None, session_port: int | None = 0) -> None:
        self._engine = engine
        self._bus = bus
        self._bus_config = bus_config or BusConfig()
        self._publisher: BusPublisher | None = None
        self._security = security or SecurityConfig()
        self._keys = cluster_keys(self._security)
        self._backend = EngineBackend(engine, worker_id)
        self._http: HttpServer | None = None
        if http_port is not None:
            app = worker_app(engine, self._backend, HttpOptions(max_message_bytes, self._keys))
            self._http = HttpServer(app, host, http_port, uvicorn_tls(self._security, self._security.worker_mtls))
        self._metrics_at = None if metrics_port is None else (metrics_host, metrics_port)
        self._metrics: MetricsEndpoint | None = None
        self._worker_id = worker_id
        self._host = host
        self._port = port
        self._max_message_bytes = max_message_bytes
        self._max_pending_batches = max_pending_batches
        self._incarnation = uuid.uuid4().hex
        self._address: str | None = None
        self._server: grpc.aio.Server | None = None
        self._service: WorkerService | None = None
        self._sessions: SessionListener | None = None
        self._session_port_wanted = session_port
        self._session_port: int | None = None
        self._health: HealthReporter | None = None
        self._stopping = False

    @property
    def address(self) -> str | None:
        return self._address

    @property
    def incarnation(self) -> str:
        return self._incarnation

    @property
    def metrics_address(self) -> str | None:
        return self._metrics.address if self._metrics is not None else None

    @property
    def session_port(self) -> int | None:
        """The framed Session's port (``worker.session_tcp``); None without one (TLS, or ``session_port`` None) or
        before ``start``."""
        return self._session_port

    @property
    def http_address(self) -> str | None:
        """The HTTP API's bound ``host:port``; None without ``http_port`` or before ``start``."""
        return self._http.address if self._http is not None else None

    def record(self) -> WorkerRecord:
        """This worker's registry record (once started)."""
        if self._address is None:
            raise RuntimeError("WorkerServer: not started")
        config = self._engine.config
        return WorkerRecord(worker_id=self._worker_id, address=self._address, model=config.model,
                            incarnation=self._incarnation,
                            max_running_requests=config.scheduler.max_running_requests,
                            metrics_address=self.metrics_address, http_address=self.http_address)

    async def start(self) -> str:
        """Binds, starts serving (health SERVING) and returns the bound ``host:port``."""
        if self._server is not None:
            raise RuntimeError("WorkerServer: already started")
        server = grpc_server(self._max_message_bytes, self._keys)
        port = add_port(server, _host_port(self._host, self._port), self._security,
                        require_client_certificate=self._security.worker_mtls)
        self._address = _host_port(self._host, port)
        self._service = WorkerService(self._engine, self._worker_id, self._address, self._incarnation,
                                      self._max_pending_batches)
        add_servicer(server, SERVICE, self._service)
        # The framed Session is plain TCP: TLS clusters keep to the gRPC one.
        if not self._security.tls and self._session_port_wanted is not None:
            self._sessions = SessionListener(self._service.admit, self._keys, self._max_message_bytes)
            self._session_port = await self._sessions.start(self._host, self._session_port_wanted)
            self._service.offer_framed_session(self._session_port)
        self._health = HealthReporter(server, [SERVICE_NAME])
        await self._health.set_serving(True)
        await server.start()
        self._service.start()
        self._server = server
        if self._http is not None:
            await self._http.start()
        if self._metrics_at is not None:
            self._metrics = MetricsEndpoint(self._engine.metrics.registry, *self._metrics_at)
        if self._bus is not None:
            self._publisher = BusPublisher(self._bus, self._bus_config, self._service.subscribe_kv,
                                           self._service.batches, self._service.load_report, self.record)
            await self._publisher.start()
        return self._address

    async def stop(self, grace_s: float) -> None:
        """Drains, then stops: health NOT_SERVING (HTTP ``/health`` 503) and new Generate calls and HTTP requests
        refused with UNAVAILABLE, up to ``grace_s`` for the requests in flight, the HTTP API's included (it
        answers meanwhile, ``/loads`` saying ``draining``; the rest are then cancelled, which aborts them), KV
        event streams ended with UNAVAILABLE. A no-op before ``start`` or when already stopping."""
        server, service, health = self._server, self._service, self._health
        if server is None or service is None or health is None or self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + grace_s
        service.begin_drain()
        self._backend.draining = True
        await health.set_serving(False)
        await service.wait_idle(grace_s)
        await self._backend.in_flight.wait_idle(deadline - time.monotonic())  # HTTP's, /loads answering meanwhile
        if self._sessions is not None:
            await self._sessions.stop()
        if self._http is not None:
            await self._http.stop(deadline - time.monotonic())
        if self._publisher is not None:
            await self._publisher.stop()
        await service.close()
        await server.stop(_CANCEL_GRACE_S)
        self._backend.close()
        if self._metrics is not None:
            self._metrics.stop()


def _request_params(request: worker_pb2.WorkerGenerateRequest) -> SamplingParams:
    """Checks the request id and returns the sampling parameters; ValueError naming the field."""
    if not request.request_id:
        raise ValueError("request_id: must not be empty")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id: {len(request.request_id)} characters, at most {MAX_REQUEST_ID_CHARS} allowed")
    return sampling_params_from_proto(request.sampling)


class _Responses:
    """An admitted request's responses (``Admitted``), counted in ``in_flight`` until closed."""

    def __init__(self, outputs: RequestStream, in_flight: InFlight) -> None:
        self._outputs = outputs
        self._in_flight = in_flight
        self._closed = False
        in_flight.begin()

    def __aiter__(self) -> _Responses:
        return self

    async def __anext__(self) -> worker_pb2.WorkerGenerateResponse:
        try:
            return _response(await anext(self._outputs))
        except RequestFailed as error:  # this request's own work failed; the others go on
            raise GenerationError(Status.INTERNAL, str(error)) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._outputs.close()
            self._in_flight.end()


def _response(output: RequestOutput) -> worker_pb2.WorkerGenerateResponse:
    return worker_pb2.WorkerGenerateResponse(choices=[chunk_to_proto(c) for c in output.outputs],
                                             num_prompt_tokens=output.num_prompt_tokens,
                                             num_cached_tokens=output.num_cached_tokens, finished=output.finished)


def _worker_info(engine: Engine, worker_id: str, address: str, incarnation: str) -> worker_pb2.WorkerInfo:
    tokenizer = engine.tokenizer
    spec = worker_pb2.TokenizerSpec(backend_json=tokenizer.to_json(), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, chat_template=tokenizer.chat_template or "")
    config = engine.config
    return worker_pb2.WorkerInfo(
        worker_id=worker_id, address=address, model=config.model, hash_namespace=config.hash_namespace,
        page_size=config.cache.page_size, num_pages=engine.allocator.num_pages, max_model_len=engine.max_model_len,
        vocab_size=engine.model_config.vocab_size, max_running_requests=config.scheduler.max_running_requests,
        max_waiting_requests=config.scheduler.max_waiting_requests, incarnation=incarnation, tokenizer=spec)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
