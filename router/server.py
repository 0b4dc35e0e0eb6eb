"""The router: the cluster's public gRPC endpoint (service ``radixserve.v1.Generation``).

For each request it validates, applies the chat template and tokenizes once (``router.requests``), hashes the
prompt into pages, asks the prefix index how many leading pages each serving worker holds, lets the policy
pick one, and streams the worker's tokens back. Guarantees:

- every accepted request ends with its tokens or an error status: when a worker refuses or fails it before
  answering anything (``_RETRYABLE`` codes; UNAVAILABLE also marks the worker down) the request is tried on
  one other worker, never a third; once a response reached the client it is never retried, and a worker
  failing then gets the client UNAVAILABLE naming the worker;
- cancelling the call or its deadline passing cancels the worker's call, which aborts the request there and
  frees its KV pages; the deadline sent to the worker is the earlier of the gRPC deadline and
  ``timeout_seconds``;
- bad input is answered INVALID_ARGUMENT naming the field, and bytes that do not parse as the request message
  INVALID_ARGUMENT naming the message (``cluster.base.wire.add_servicer``); a full cluster (every worker refused
  it) RESOURCE_EXHAUSTED; a cluster without an up worker (or a draining router) UNAVAILABLE.

The tokenizer and the model's limits come from the workers (``GetInfo``), so a router needs no model files: see
``ModelView`` for which workers a request may go to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from radixserve.cluster.base.bus import EventBus
from radixserve.cluster.base.config import RouterConfig
from radixserve.cluster.base.grpc_util import HealthReporter, server_options
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.metrics import MetricsEndpoint
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.cluster.base.wire import add_servicer
from radixserve.router.metrics import RouterMetrics, WorkerGauges
from radixserve.router.policies import RouteRequest, make_policy
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.requests import ModelLimits, PreparedRequest, prepare
from radixserve.router.routing import Decision, decide
from radixserve.router.workers import WorkerClient, WorkerSet
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2, worker_pb2

log = logging.getLogger(__name__)

GENERATION = api_pb2.DESCRIPTOR.services_by_name["Generation"]
COUNTED_METHODS = ("Generate", "Complete")  # what radixserve_router_requests_total counts
MAX_ATTEMPTS = 2  # workers one request may be sent to
# Failures of a worker call, before any response was sent to the client, that another worker may not share.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class ModelView:
    """What the router needs of the model it serves, learned from a worker's ``GetInfo``: how to tokenize for it
    and hash its pages.

    A worker *matches* the view when its pages hash like the view's (namespace and page size) and it takes the
    view's token ids (vocabulary size); it *serves* a request when it also has room for the request's prompt
    (``min_model_len``, set per request by ``for_prompt``). Workers of another model or namespace are not routed
    to while the view holds; the service learns a new view once no serving worker matches the current one.
    """

    hash_namespace: str
    page_size: int
    vocab_size: int
    tokenizer: Tokenizer
    min_model_len: int = 0

    @classmethod
    def from_info(cls, info: worker_pb2.WorkerInfo) -> ModelView:
        spec = info.tokenizer
        tokenizer = Tokenizer.from_json(
            spec.backend_json, chat_template=spec.chat_template or None,
            bos_token_id=spec.bos_token_id if spec.HasField("bos_token_id") else None,
            eos_token_id=spec.eos_token_id if spec.HasField("eos_token_id") else None)
        return cls(info.hash_namespace, info.page_size, info.vocab_size, tokenizer)

    def matches(self, info: worker_pb2.WorkerInfo) -> bool:
        """Whether the worker's pages hash like ours and it takes our token ids."""
        return (info.hash_namespace, info.page_size, info.vocab_size) == (
            self.hash_namespace, self.page_size, self.vocab_size)

    def serves(self, info: worker_pb2.WorkerInfo) -> bool:
        """Whether the worker matches and its context holds ``min_model_len`` tokens."""
        return self.matches(info) and info.max_model_len >= self.min_model_len

    def for_prompt(self, num_tokens: int) -> ModelView:
        """The view for a request whose prompt is ``num_tokens`` long: it needs a context with room for one more."""
        return dataclasses.replace(self, min_model_len=num_tokens + 1)


class _Failure(Exception):
    """A worker call failed; the request ends with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Retry(_Failure):
    """The chosen worker failed before its first response; another worker may serve the request."""


class GenerationService(api_pb2_grpc.GenerationServicer):
    """The public API; see the module docstring for its guarantees."""

    def __init__(self, config: RouterConfig, workers: WorkerSet, index: PrefixIndex, metrics: RouterMetrics) -> None:
        self._config = config
        self._workers = workers
        self._index = index
        self._metrics = metrics
        self._policy = make_policy(config.policy, config.load_weight, random.Random(config.seed))
        self._view: ModelView | None = None
        self.draining = False
        self.num_in_flight = 0

    async def Generate(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        async with contextlib.aclosing(self._tracked("Generate", request, context)) as responses:
            async for response in responses:
                yield response

    async def Complete(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> api_pb2.CompleteResponse:
        result = api_pb2.CompleteResponse()
        choices: dict[int, api_pb2.Completion] = {}
        async with contextlib.aclosing(self._tracked("Complete", request, context)) as responses:
            async for response in responses:
                result.request_id, result.worker_id = response.request_id, response.worker_id
                for chunk in response.choices:
                    choice = choices.setdefault(chunk.index, api_pb2.Completion(index=chunk.index))
                    choice.text += chunk.text
                    choice.token_ids.extend(chunk.token_ids)
                    choice.logprobs.extend(chunk.logprobs)
                    choice.finish_reason = chunk.finish_reason or choice.finish_reason
                if response.HasField("usage"):
                    result.usage.CopyFrom(response.usage)
        result.choices.extend(choices[i] for i in sorted(choices))
        return result

    async def ListWorkers(self, request: api_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.ListWorkersResponse:
        await self._workers.refresh()
        response = api_pb2.ListWorkersResponse(policy=self._config.policy)
        for client in sorted(self._workers.clients.values(), key=lambda c: c.worker_id):
            response.workers.append(api_pb2.WorkerStatus(
                worker_id=client.worker_id, address=client.record.address, model=client.record.model,
                state=client.state, load=client.load, num_routed=client.num_routed,
                num_in_flight=client.outstanding.num_in_flight,
                num_indexed_pages=self._index.num_pages(client.worker_id), events_live=client.events_live))
        return response

    # ---- one request --------------------------------------------------------------------------------

    async def _tracked(self, method: str, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        """``_serve``, counted in flight and in the request metrics (final code, TTFT, end to end).

        A request is counted before its status leaves, so a client that has its answer finds it counted.
        Closing it (the call was cancelled) ends the worker call at once: each generator on the request's path is
        closed explicitly by the one iterating it, rather than whenever it is garbage-collected.
        """
        self.num_in_flight += 1
        started = time.monotonic()
        first_token = True
        try:
            async with contextlib.aclosing(self._serve(request, context)) as responses:
                async for response in responses:
                    if first_token and any(choice.token_ids for choice in response.choices):
                        first_token = False
                        self._metrics.ttft.observe(time.monotonic() - started)
                    yield response
        except _Failure as failure:
            self._finish(method, failure.code.name)
            await context.abort(failure.code, failure.details)
        except Exception:
            self._finish(method, grpc.StatusCode.UNKNOWN.name)  # what grpc answers for an unexpected error
            raise
        except BaseException:  # the client cancelled, or its deadline passed
            self._finish(method, grpc.StatusCode.CANCELLED.name)
            raise
        else:
            self._metrics.e2e.observe(time.monotonic() - started)
            self._finish(method, grpc.StatusCode.OK.name)

    def _finish(self, method: str, code: str) -> None:
        self.num_in_flight -= 1
        self._metrics.requests.labels(method, code).inc()

    def count_undecodable(self, method: str) -> None:
        """A request to ``method`` whose bytes did not parse, about to be refused INVALID_ARGUMENT."""
        if method in COUNTED_METHODS:
            self._metrics.requests.labels(method, grpc.StatusCode.INVALID_ARGUMENT.name).inc()

    async def _serve(self, request: api_pb2.GenerateRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        if self.draining:
            raise _Failure(grpc.StatusCode.UNAVAILABLE, "the router is draining; send to another router")
        served = self._model()
        if served is None:
            raise _Failure(grpc.StatusCode.UNAVAILABLE, "no worker is up; retry shortly")
        model, limits = served
        try:
            prepared = prepare(request, model.tokenizer, limits)
        except ValueError as error:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
        model = model.for_prompt(len(prepared.token_ids))
        hashes = page_hashes(prepared.token_ids, model.page_size, namespace_seed(model.hash_namespace))
        deadline = _deadline(context, prepared.timeout_s)
        failures: list[_Retry] = []
        tried: set[str] = set()
        while len(tried) < MAX_ATTEMPTS and (choice := self._choose(prepared, hashes, model, tried)) is not None:
            client, decision = choice
            tried.add(client.worker_id)
            try:
                attempt = self._attempt(client, decision, request.sampling, prepared, hashes, deadline)
                async with contextlib.aclosing(attempt) as responses:
                    async for response in responses:
                        yield response
                return
            except _Retry as failure:
                failures.append(failure)
                self._metrics.retries.labels(failure.code.name).inc()
        raise _Failure(*_exhausted(failures))

    def _model(self) -> tuple[ModelView, ModelLimits] | None:
        """The view requests are served under, and its limits: the largest context among the serving workers
        that match it. None while no worker serves.

        The view holds while a serving worker matches it; once none does (the pool moved to another model or
        namespace), it is learned anew from the serving worker with the lowest id.
        """
        infos = [c.info for c in sorted(self._workers.serving(), key=lambda c: c.worker_id) if c.info is not None]
        if self._view is None or not any(self._view.matches(info) for info in infos):
            if not infos:
                return None
            self._view = ModelView.from_info(infos[0])
        view = self._view
        return view, ModelLimits(view.vocab_size, max(i.max_model_len for i in infos if view.matches(i)))

    def _choose(self, prepared: PreparedRequest, hashes: list[int], model: ModelView,
                tried: set[str]) -> tuple[WorkerClient, Decision] | None:
        """The policy's pick among serving workers not tried yet (``router.routing.decide``).

        Workers whose last load report showed a full queue are offered only when every other one is full too:
        that report may be a poll interval old, so the worker itself decides (RESOURCE_EXHAUSTED, retried on
        the next worker) rather than the router refusing on stale figures.
        """
        clients = [c for c in self._workers.serving()
                   if c.worker_id not in tried and c.info is not None and model.serves(c.info)]
        clients = [c for c in clients if not c.full] or clients
        if not clients:
            return None
        route = RouteRequest(len(prepared.token_ids), prepared.params.max_tokens * prepared.params.n,
                             model.page_size)
        started = time.perf_counter()
        decision = decide(self._policy, self._index, route, hashes, [c.worker_id for c in clients],
                          [c.outstanding for c in clients], [c.reported_load for c in clients])
        chosen = clients[decision.worker]
        matched = min(decision.matched_pages * model.page_size / route.num_prompt_tokens, 1.0)
        self._metrics.on_decision(chosen.worker_id, time.perf_counter() - started, matched)
        return chosen, decision

    async def _attempt(self, client: WorkerClient, decision: Decision, sampling: types_pb2.SamplingOptions,
                       prepared: PreparedRequest, hashes: list[int],
                       deadline: float | None) -> AsyncIterator[api_pb2.GenerateResponse]:
        """Stream one worker's answer; raise ``_Retry`` when it fails before anything reached the client.

        The worker is credited with the prompt's pages in the prefix index from the start (so that requests
        sharing the prefix follow it during the prefill), and the credit is withdrawn when the call fails
        before the worker's first response: a worker that refused or failed the request holds none of it.
        """
        attempt_id = uuid.uuid4().hex
        client.outstanding.begin(attempt_id, decision.prefill_tokens, decision.output_tokens, decision.active_pages)
        client.num_routed += 1
        self._index.record_routed(client.worker_id, hashes)
        call = client.stub.Generate(
            worker_pb2.WorkerGenerateRequest(request_id=attempt_id, token_ids=prepared.token_ids, sampling=sampling),
            timeout=None if deadline is None else max(deadline - time.monotonic(), 0.001))
        responded = False
        num_tokens = 0
        try:
            async for part in call:
                if not responded:
                    responded = True
                    client.outstanding.first_token(attempt_id)
                num_new = sum(len(choice.token_ids) for choice in part.choices)
                client.outstanding.progress(attempt_id, num_new)
                num_tokens += num_new
                response = api_pb2.GenerateResponse(request_id=prepared.request_id, choices=part.choices,
                                                    worker_id=client.worker_id)
                if part.finished:
                    response.usage.CopyFrom(api_pb2.Usage(prompt_tokens=part.num_prompt_tokens,
                                                          cached_tokens=part.num_cached_tokens,
                                                          completion_tokens=num_tokens))
                    self._count_tokens(client.worker_id, response.usage)
                yield response
        except grpc.aio.AioRpcError as error:
            if not responded:
                self._index.withdraw_routed(client.worker_id, hashes)
            raise self._classify(client, error, responded, num_tokens) from None
        finally:
            call.cancel()  # no-op once finished; otherwise the worker aborts the request and frees its pages
            client.outstanding.end(attempt_id)

    def _count_tokens(self, worker_id: str, usage: api_pb2.Usage) -> None:
        self._metrics.prompt_tokens.labels(worker_id).inc(usage.prompt_tokens)
        self._metrics.cached_tokens.labels(worker_id).inc(usage.cached_tokens)
        self._metrics.completion_tokens.labels(worker_id).inc(usage.completion_tokens)

    def _classify(self, client: WorkerClient, error: grpc.aio.AioRpcError, responded: bool,
                  num_tokens: int) -> _Failure:
        """``_Retry`` when nothing reached the client yet and another worker may not share the failure."""
        code, details = error.code(), error.details() or error.code().name
        if code == grpc.StatusCode.UNAVAILABLE:
            client.mark_down(details)
        if not responded and code in _RETRYABLE:
            log.info("retrying a request off worker %s: %s: %s", client.worker_id, code.name, details)
            return _Retry(code, f"worker {client.worker_id}: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"worker {client.worker_id} failed after streaming {num_tokens} tokens: {details}"
        return _Failure(code, details)


def _deadline(context: grpc.aio.ServicerContext, timeout_s: float | None) -> float | None:
    remaining = [t for t in (context.time_remaining(), timeout_s) if t is not None]
    return time.monotonic() + min(remaining) if remaining else None


def _exhausted(failures: list[_Retry]) -> tuple[grpc.StatusCode, str]:
    """The status for a request no worker took, given the attempts that failed before their first token."""
    if failures and all(f.code == grpc.StatusCode.RESOURCE_EXHAUSTED for f in failures):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the queue is full on every worker tried ({len(failures)}); retry later or add workers")
    if not failures:
        return grpc.StatusCode.UNAVAILABLE, "no worker is up (all down or draining); retry shortly"
    return (grpc.StatusCode.UNAVAILABLE,
            "no worker could serve the request: " + "; ".join(f.details for f in failures))


class Router:
    """The router process: the public server, its worker set and prefix index. Runs on one asyncio loop.

    Its metrics (``self.metrics``) are served at ``metrics_address`` from ``start`` until ``stop`` when
    ``metrics_port`` is given (0: a free port) on ``metrics_host``.
    """

    def __init__(self, config: RouterConfig, bus: EventBus, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = None) -> None:
        self.config = config
        self.index = PrefixIndex(config.pending_ttl_s, config.approx_ttl_s)
        self.metrics = RouterMetrics(CollectorRegistry(), config.policy)
        self.workers = WorkerSet(bus, self.index, config.health_interval_s, config.max_message_bytes, self.metrics)
        self.metrics.bind(self._gauges)
        for code in _RETRYABLE:  # the series dashboards rate() exist from the start, at 0
            self.metrics.retries.labels(code.name)
        for method in COUNTED_METHODS:
            self.metrics.requests.labels(method, "OK")
        self.service = GenerationService(config, self.workers, self.index, self.metrics)
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
        if self._metrics_at is not None:
            self._endpoint = MetricsEndpoint(self.metrics.registry, *self._metrics_at)
        return self.address

    async def stop(self) -> None:
        """Drain: refuse new requests, let those in flight finish (up to ``drain_timeout_s``), then stop."""
        self.service.draining = True
        await self._health.set_serving(False)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.service.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._server.stop(grace=1.0)
        await self.workers.close()
        if self._endpoint is not None:
            self._endpoint.stop()
