"""The router's radixserve.v1 front end: service ``radixserve.v1.Generation`` over the router core.

A thin adapter: a ``GenerateRequest`` becomes a ``GenerationRequest`` (the core validates it), the core's deltas
become ``GenerateResponse`` messages, ``Complete`` is their fold, and a ``GenerationError`` becomes the status of
the same name with details naming the field in this API's terms (``text``, ``chat.messages[0].role``,
``sampling.top_p``, ``timeout_seconds``). The gRPC deadline bounds the request like ``timeout_seconds`` does (the
earlier applies); cancelling the call closes the core's stream, which aborts the request on its worker.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable

import grpc

from radixserve.cluster.base.generation import (ChatMessage, ChoiceDelta, Generation, GenerationDelta,
                                                GenerationError, GenerationRequest, Prompt, Status, Usage, fold)
from radixserve.cluster.base.wire import chunk_to_proto, grpc_code, sampling_params_from_proto
from radixserve.router.core import RouterCore
from radixserve.router.prefix_index import PrefixIndex
from radixserve.router.workers import WorkerSet
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

GENERATION = api_pb2.DESCRIPTOR.services_by_name["Generation"]
COUNTED_METHODS = ("Generate", "Complete")  # what radixserve_router_requests_total counts
_SAMPLING_FIELDS = frozenset(f.name for f in types_pb2.SamplingOptions.DESCRIPTOR.fields)


class GenerationService(api_pb2_grpc.GenerationServicer):
    """``radixserve.v1.Generation`` over ``core``; ``ListWorkers`` reads the core's workers and index."""

    def __init__(self, core: RouterCore, workers: WorkerSet, index: PrefixIndex, policy: str) -> None:
        self._core = core
        self._workers = workers
        self._index = index
        self._policy = policy

    async def Generate(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        async with contextlib.aclosing(self._deltas("Generate", request, context)) as deltas:
            async for delta in deltas:
                yield _response(delta)

    async def Complete(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> api_pb2.CompleteResponse:
        return _complete_response(await fold(self._deltas("Complete", request, context)))

    async def ListWorkers(self, request: api_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.ListWorkersResponse:
        await self._workers.refresh()
        response = api_pb2.ListWorkersResponse(policy=self._policy)
        for client in sorted(self._workers.clients.values(), key=lambda c: c.worker_id):
            response.workers.append(api_pb2.WorkerStatus(
                worker_id=client.worker_id, address=client.record.address, model=client.record.model,
                state=client.state, load=client.load, num_routed=client.num_routed,
                num_in_flight=client.outstanding.num_in_flight,
                num_indexed_pages=self._index.num_pages(client.worker_id), events_live=client.events_live,
                http_address=client.record.http_address or ""))
        return response

    def count_undecodable(self, method: str) -> None:
        """A request to ``method`` whose bytes did not parse, about to be refused INVALID_ARGUMENT."""
        if method in COUNTED_METHODS:
            self._core.count_refused(method, Status.INVALID_ARGUMENT)

    async def _deltas(self, method: str, request: api_pb2.GenerateRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[GenerationDelta]:
        """The core's stream for ``request``; a ``GenerationError`` aborts the call with its status."""
        try:
            generation = _generation_request(request, context.time_remaining())
        except GenerationError as error:
            self._core.count_refused(method, error.status)
            await context.abort(grpc_code(error.status), str(error))
        try:
            async with contextlib.aclosing(self._core.generate(generation, method)) as deltas:
                async for delta in deltas:
                    yield delta
        except GenerationError as error:
            await context.abort(grpc_code(error.status), str(error.renamed(_field_name(request))))


def _generation_request(request: api_pb2.GenerateRequest, time_remaining: float | None) -> GenerationRequest:
    """The neutral request of ``request``; the earlier of ``timeout_seconds`` and the gRPC deadline bounds it."""
    try:
        params = sampling_params_from_proto(request.sampling)
    except ValueError as error:
        raise GenerationError.invalid(error) from None
    timeout_s = request.timeout_seconds if request.HasField("timeout_seconds") else None
    if time_remaining is not None and (timeout_s is None or (math.isfinite(timeout_s) and timeout_s > time_remaining)):
        timeout_s = max(time_remaining, 0.001)
    return GenerationRequest(_prompt(request), params, request.request_id, timeout_s)


def _prompt(request: api_pb2.GenerateRequest) -> Prompt:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return Prompt(text=request.text)
    if kind == "chat":
        chat = request.chat
        add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        return Prompt(messages=tuple(ChatMessage(m.role, m.content) for m in chat.messages),
                      add_generation_prompt=add)
    if kind == "token_ids":
        return Prompt(token_ids=tuple(request.token_ids.ids))
    return Prompt()  # none given: the core names the missing prompt


def _field_name(request: api_pb2.GenerateRequest) -> Callable[[str], str]:
    """The core's field names in ``GenerateRequest`` terms."""
    kind = request.WhichOneof("prompt") or "prompt"

    def rename(name: str) -> str:
        if name == "prompt":
            return kind
        if name.startswith("messages"):
            return f"chat.{name}"
        if name == "timeout_s":
            return "timeout_seconds"
        if name.split(".")[0] in _SAMPLING_FIELDS:
            return f"sampling.{name}"
        return name
    return rename


def _usage(usage: Usage | None) -> api_pb2.Usage | None:
    if usage is None:
        return None
    return api_pb2.Usage(prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                         completion_tokens=usage.completion_tokens)


def _response(delta: GenerationDelta) -> api_pb2.GenerateResponse:
    return api_pb2.GenerateResponse(request_id=delta.request_id, worker_id=delta.worker_id,
                                    choices=[chunk_to_proto(c) for c in delta.choices], usage=_usage(delta.usage))


def _complete_response(generation: Generation) -> api_pb2.CompleteResponse:
    choices = []
    for choice in generation.choices:
        chunk = chunk_to_proto(ChoiceDelta(choice.index, choice.token_ids, choice.text, choice.logprobs,
                                           choice.finish_reason))
        choices.append(api_pb2.Completion(index=chunk.index, text=chunk.text, token_ids=chunk.token_ids,
                                          logprobs=chunk.logprobs, finish_reason=chunk.finish_reason))
    return api_pb2.CompleteResponse(request_id=generation.request_id, worker_id=generation.worker_id,
                                    choices=choices, usage=_usage(generation.usage))
