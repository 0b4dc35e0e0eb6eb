"""The router core: one request from validation to its last token, free of any transport's types.

Every front end (radixserve.v1 gRPC, OpenAI HTTP, KServe v2 gRPC) hands ``RouterCore.generate`` a
``GenerationRequest`` and relays the ``GenerationDelta`` stream it yields (``cluster.base.generation`` states the
contract). For each request the core validates, applies the chat template and tokenizes once
(``cluster.base.requests``; a long prompt on a thread, off the event loop), hashes the pages of the prompt a
worker can match (all but its last token), asks the prefix index how many of them each serving worker holds, lets
the policy pick one (``router.routing.decide``) and streams the worker's tokens back.
Guarantees:

- every accepted request ends with its last delta (carrying ``usage``) or a ``GenerationError``: when a worker
  refuses or fails it before answering anything (``_RETRYABLE``; UNAVAILABLE also marks the worker down) the
  request is tried on one other worker, never a third; once a delta reached the front end it is never retried,
  and a worker failing then ends the request UNAVAILABLE naming the worker;
- closing the stream (the client went away) or ``timeout_s`` passing cancels the worker's call, which aborts the
  request there and frees its KV pages;
- bad input is INVALID_ARGUMENT naming the field; a full cluster (every worker tried refused it)
  RESOURCE_EXHAUSTED; a cluster without an up worker (or a draining router) UNAVAILABLE, saying how many are
  draining and how many down.

The tokenizer and the model's limits come from the workers (``GetInfo``), so a router needs no model files: see
``ModelView`` for which workers a request may go to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property

from radixserve.cluster.base.config import RouterConfig
from radixserve.cluster.base.generation import (GenerationDelta, GenerationError, GenerationRequest, ServedModel,
                                                Status, Usage)
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.requests import ModelLimits, PreparedRequest, Preparer
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.cluster.base.wire import chunk_from_proto
from radixserve.router.metrics import RouterMetrics
from radixserve.router.policies import RouteRequest, make_policy
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.routing import Decision, decide
from radixserve.router.worker_session import WorkerCallFailed
from radixserve.router.workers import WorkerClient, WorkerSet
from radixserve.v1 import worker_pb2

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # workers one request may be sent to
# Failures of a worker call, before anything reached the client, that another worker may not share.
RETRYABLE = (Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED, Status.INTERNAL, Status.CANCELLED)


@dataclass(frozen=True)
class ModelView:
    """What the router needs of the model it serves, learned from a worker's ``GetInfo``: how to tokenize for it
    and hash its pages.

    A worker *matches* the view when its pages hash like the view's (namespace and page size) and it takes the
    view's token ids (vocabulary size); it *serves* a request when it also has room for the request's prompt.
    Workers of another model or namespace are not routed to while the view holds; the core learns a new view once
    no serving worker matches the current one.
    """

    model: str
    hash_namespace: str
    page_size: int
    vocab_size: int
    tokenizer: Tokenizer

    @classmethod
    def from_info(cls, info: worker_pb2.WorkerInfo) -> ModelView:
        spec = info.tokenizer
        tokenizer = Tokenizer.from_json(
            spec.backend_json, chat_template=spec.chat_template or None,
            bos_token_id=spec.bos_token_id if spec.HasField("bos_token_id") else None,
            eos_token_id=spec.eos_token_id if spec.HasField("eos_token_id") else None)
        return cls(info.model, info.hash_namespace, info.page_size, info.vocab_size, tokenizer)

    @cached_property
    def hash_seed(self) -> int:
        """The parent hash of a prompt's first page under this view's namespace."""
        return namespace_seed(self.hash_namespace)

    def matches(self, info: worker_pb2.WorkerInfo) -> bool:
        """Whether the worker's pages hash like ours and it takes our token ids."""
        return (info.hash_namespace, info.page_size, info.vocab_size) == (
            self.hash_namespace, self.page_size, self.vocab_size)

    def serves(self, info: worker_pb2.WorkerInfo, num_prompt_tokens: int) -> bool:
        """Whether the worker matches and its context holds a prompt of ``num_prompt_tokens`` and one more."""
        return self.matches(info) and info.max_model_len > num_prompt_tokens


@dataclass(frozen=True)
class _Served:
    """The model requests are served under while the worker set keeps its ``version``."""

    version: int
    view: ModelView
    limits: ModelLimits
    served: ServedModel


class _Retry(GenerationError):
    """The chosen worker failed before its first response; another worker may serve the request."""


class RouterCore:
    """Routes requests to the workers of ``workers``; see the module docstring for its guarantees.

    Implements ``cluster.base.generation.GenerationBackend``. ``draining`` refuses new requests (UNAVAILABLE);
    ``num_in_flight`` counts the requests being served.
    """

    def __init__(self, config: RouterConfig, workers: WorkerSet, index: PrefixIndex, metrics: RouterMetrics) -> None:
        self._config = config
        self._workers = workers
        self._index = index
        self._metrics = metrics
        self._policy = make_policy(config.policy, config.load_weight, config.decode_weight,
                                   random.Random(config.seed))
        self._view: ModelView | None = None
        self._served: _Served | None = None
        self._preparer = Preparer()
        # Worker-side request ids: a random prefix per router and a count, unique among every router's requests
        # at a worker without a call for random bytes per request.
        self._attempt_prefix = os.urandom(8).hex() + "-"
        self._attempt_count = itertools.count()
        self.draining = False
        self.warm = False
        self.num_in_flight = 0

    def served_model(self) -> ServedModel | None:
        served = self._model()
        return None if served is None else served.served

    async def learn_model(self) -> None:
        """Learn the model view from the serving workers now, on a thread: rebuilding a worker's tokenizer takes
        a good part of a second, which the first request would otherwise wait for on the event loop (and every
        request with it). Later changes of model are learned by the first request that finds them."""
        infos = self._serving_infos()
        if infos and not self._view_matches(infos):
            self._view = await asyncio.to_thread(ModelView.from_info, infos[0])

    def close(self) -> None:
        """Release the threads requests are prepared on (after the last request)."""
        self._preparer.close()

    def ready(self) -> bool:
        """Serving: not draining, its index warm (``WorkerSet.warm`` once, at start) and a worker serving."""
        return self.warm and not self.draining and bool(self._workers.serving())

    async def generate(self, request: GenerationRequest, method: str) -> AsyncIterator[GenerationDelta]:
        """``_serve``, counted in flight and in the request metrics (final status, TTFT, end to end).

        A request is counted before its status leaves, so a client that has its answer finds it counted.
        Closing the stream ends the worker call at once: each generator on the request's path is closed
        explicitly by the one iterating it, rather than whenever it is garbage-collected.
        """
        self.num_in_flight += 1
        started = time.monotonic()
        first_token = True
        ttft: float | None = None
        try:
            async with contextlib.aclosing(self._serve(request)) as deltas:
                async for delta in deltas:
                    if first_token and any(choice.token_ids for choice in delta.choices):
                        first_token = False
                        ttft = time.monotonic() - started
                    yield delta
                    if ttft is not None:  # observed once the client has the token, off its path
                        self._metrics.ttft.observe(ttft)
                        ttft = None
        except GenerationError as error:
            self._finish(method, error.status.name)
            raise
        except Exception:
            self._finish(method, Status.INTERNAL.name)
            raise
        except BaseException:  # the client went away
            self._finish(method, Status.CANCELLED.name)
            raise
        else:
            self._metrics.e2e.observe(time.monotonic() - started)
            self._finish(method, "OK")

    def _finish(self, method: str, code: str) -> None:
        self.num_in_flight -= 1
        self._metrics.requests.labels(method, code).inc()

    def count_refused(self, method: str, status: Status) -> None:
        """A request a front end refused before handing it over (it did not parse), counted as ``status``."""
        self._metrics.requests.labels(method, status.name).inc()

    async def _serve(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self.draining:
            raise GenerationError(Status.UNAVAILABLE, "the router is draining; send to another router")
        served = self._model()
        if served is None:
            raise GenerationError(Status.UNAVAILABLE, self._workers.unavailable_reason())
        model = served.view
        prepared = await self._preparer.prepare(request, model.tokenizer, served.limits)
        hashes = _matchable_pages(prepared.token_ids, model)
        deadline = None if prepared.timeout_s is None else time.monotonic() + prepared.timeout_s
        failures: list[_Retry] = []
        tried: set[str] = set()
        while len(tried) < MAX_ATTEMPTS and (choice := self._choose(prepared, hashes, model, tried)) is not None:
            client, decision = choice
            tried.add(client.worker_id)
            try:
                async with contextlib.aclosing(self._attempt(client, decision, prepared, hashes, deadline)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except _Retry as failure:
                failures.append(failure)
                self._metrics.retries.labels(failure.status.name).inc()
        raise _exhausted(failures)

    def _model(self) -> _Served | None:
        """The view requests are served under, and its limits: the largest context among the serving workers
        that match it. None while no worker serves. Worked out again only when the worker set's version moved.

        The view holds while a serving worker matches it; once none does (the pool moved to another model or
        namespace), it is learned anew from the serving worker with the lowest id.
        """
        version = self._workers.version
        if self._served is not None and self._served.version == version:
            return self._served
        infos = self._serving_infos()
        if not infos:
            return None
        if not self._view_matches(infos):
            self._view = ModelView.from_info(infos[0])
        view = self._view
        assert view is not None
        limits = ModelLimits(view.vocab_size, max(i.max_model_len for i in infos if view.matches(i)))
        self._served = _Served(version, view, limits, ServedModel(view.model, limits.max_model_len, view.tokenizer))
        return self._served

    def _serving_infos(self) -> list[worker_pb2.WorkerInfo]:
        """What the serving workers serve, by worker id."""
        clients = sorted(self._workers.serving(), key=lambda c: c.worker_id)
        return [c.info for c in clients if c.info is not None]

    def _view_matches(self, infos: list[worker_pb2.WorkerInfo]) -> bool:
        return self._view is not None and any(self._view.matches(info) for info in infos)

    def _choose(self, prepared: PreparedRequest, hashes: list[int], model: ModelView,
                tried: set[str]) -> tuple[WorkerClient, Decision] | None:
        """The policy's pick among serving workers not tried yet (``router.routing.decide``).

        Workers whose last load report showed a full queue are offered only when every other one is full too:
        that report may be a poll interval old, so the worker itself decides (RESOURCE_EXHAUSTED, retried on
        the next worker) rather than the router refusing on stale figures.
        """
        num_prompt_tokens = len(prepared.token_ids)
        clients = [c for c in self._workers.serving()
                   if c.worker_id not in tried and c.info is not None and model.serves(c.info, num_prompt_tokens)]
        clients = [c for c in clients if not c.full] or clients
        if not clients:
            return None
        route = RouteRequest(num_prompt_tokens, prepared.params.max_tokens * prepared.params.n, model.page_size)
        started = time.perf_counter()
        decision = decide(self._policy, self._index, route, hashes, [c.worker_id for c in clients],
                          [c.outstanding for c in clients], [c.reported_load for c in clients],
                          [c.peer_load for c in clients])
        chosen = clients[decision.worker]
        matched = min(decision.matched_pages * model.page_size / max(route.num_prompt_tokens, 1), 1.0)
        # Recorded at the loop's next turn, which comes once the request is on its way to the worker.
        asyncio.get_running_loop().call_soon(self._metrics.on_decision, chosen.worker_id,
                                             time.perf_counter() - started, matched)
        return chosen, decision

    async def _attempt(self, client: WorkerClient, decision: Decision, prepared: PreparedRequest,
                       hashes: list[int], deadline: float | None) -> AsyncIterator[GenerationDelta]:
        """Stream one worker's answer; raise ``_Retry`` when it fails before anything reached the client.

        The worker is credited with the prompt's pages in the prefix index from the start (so that requests
        sharing the prefix follow it during the prefill; with shared routes, through every replica), and the
        credit is withdrawn when the call fails before the worker's first response: a worker that refused or
        failed the request holds none of it.
        """
        attempt_id = f"{self._attempt_prefix}{next(self._attempt_count):x}"
        client.outstanding.begin(attempt_id, decision.prefill_tokens, decision.output_tokens, decision.active_pages)
        client.num_routed += 1
        self._workers.record_routed(client.worker_id, hashes)
        timeout_s = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        responded = False
        num_tokens = 0
        try:
            parts = client.generate(attempt_id, prepared.token_ids, prepared.params, timeout_s)
            async with contextlib.aclosing(parts):
                async for part in parts:
                    choices = tuple(chunk_from_proto(c) for c in part.choices)
                    num_new = sum(len(choice.token_ids) for choice in choices)
                    num_tokens += num_new
                    usage = None
                    if part.finished:
                        usage = Usage(part.num_prompt_tokens, part.num_cached_tokens, num_tokens)
                    yield GenerationDelta(prepared.request_id, choices, client.worker_id, usage)
                    # The accounting waits until the client has the tokens (no await comes between).
                    if not responded:
                        responded = True
                        client.outstanding.first_token(attempt_id)
                    client.outstanding.progress(attempt_id, num_new)
                    if usage is not None:
                        self._count_tokens(client.worker_id, usage)
        except WorkerCallFailed as failure:
            if not responded:
                self._workers.withdraw_routed(client.worker_id, hashes)
            raise self._classify(client, failure, responded, num_tokens) from None
        finally:
            client.outstanding.end(attempt_id)

    def _count_tokens(self, worker_id: str, usage: Usage) -> None:
        self._metrics.prompt_tokens.labels(worker_id).inc(usage.prompt_tokens)
        self._metrics.cached_tokens.labels(worker_id).inc(usage.cached_tokens)
        self._metrics.completion_tokens.labels(worker_id).inc(usage.completion_tokens)

    def _classify(self, client: WorkerClient, failure: WorkerCallFailed, responded: bool,
                  num_tokens: int) -> GenerationError:
        """``_Retry`` when nothing reached the client yet and another worker may not share the failure."""
        status, details = failure.status, failure.details
        if status == Status.UNAVAILABLE:
            client.mark_down(details)
        if not responded and status in RETRYABLE:
            log.info("retrying a request off worker %s: %s: %s", client.worker_id, status.name, details)
            return _Retry(status, f"worker {client.worker_id}: {details}")
        if status == Status.UNAVAILABLE:
            details = f"worker {client.worker_id} failed after streaming {num_tokens} tokens: {details}"
        if status == Status.INVALID_ARGUMENT:  # the worker named a field; keep it named
            return GenerationError.invalid(ValueError(details))
        return GenerationError(status, details)


def _matchable_pages(token_ids: tuple[int, ...], model: ModelView) -> list[int]:
    """The hashes of the prompt's pages a worker can match: those of all but its last token, which a worker
    always computes (its logits give the first output token), so it never matches a page ending there."""
    return page_hashes(token_ids[:-1], model.page_size, model.hash_seed)


def _exhausted(failures: list[_Retry]) -> GenerationError:
    """The error of a request no worker took, given the attempts that failed before their first token."""
    if failures and all(f.status == Status.RESOURCE_EXHAUSTED for f in failures):
        return GenerationError(Status.RESOURCE_EXHAUSTED,
                               f"the queue is full on every worker tried ({len(failures)}); retry later or add workers")
    if not failures:
        return GenerationError(Status.UNAVAILABLE, "no worker is up (all down or draining); retry shortly")
    return GenerationError(Status.UNAVAILABLE,
                           "no worker could serve the request: " + "; ".join(f.message for f in failures))
