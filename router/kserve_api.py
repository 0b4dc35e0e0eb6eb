"""The router's KServe v2 front end: service ``inference.GRPCInferenceService`` (Triton's gRPC API) over the core.

A thin adapter, like ``router.v1_api``: a ``ModelInferRequest`` with the tensors of Triton's vLLM backend
(``router.kserve_tensors``) becomes a ``GenerationRequest``, the core's deltas become ``ModelInferResponse``
messages. The model is the one the core serves (``RouterCore.served_model``), version ``"1"``; another name or
version is NOT_FOUND.

- ``ModelInfer`` answers the whole generation in one response; ``stream`` true is INVALID_ARGUMENT there.
- ``ModelStreamInfer`` serves the requests of one stream concurrently. With ``stream`` true a request is answered
  by one response per delta (a decoupled model), without it by one response; the last response of a request has
  the parameter ``triton_final_response`` true, the others false, and each carries the request's ``id``. A
  request that fails (bad input, bytes that do not parse, a failure part way) is answered by a response whose
  ``error_message`` is ``"<STATUS>: <details>"`` and whose ``infer_response`` holds only the request's ``id``, as
  Triton answers; the stream goes on with the next request. Any failure of one request (INTERNAL for one that is
  not the request's own fault) ends that request alone. A stream serves at most ``MAX_STREAM_REQUESTS`` requests
  at once (the next is read once one ends) and holds at most ``MAX_STREAM_RESPONSES`` responses not yet sent
  (requests wait for room). Cancelling the call ends every request of the stream on its worker.
- A ``GenerationError`` ends a unary call with the status of the same name, details naming the tensor (and the
  sampling parameter) at fault. The gRPC deadline bounds each request.

Requests are counted in the router metrics under ``ModelInfer`` and ``ModelStreamInfer``, one per request of a
stream. Request parameters (``parameters``) are ignored: the vLLM backend's tensors carry everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from radixserve.cluster.base.generation import (GenerationDelta, GenerationError, GenerationRequest, Prompt,
                                                ServedModel, Status, fold)
from radixserve.cluster.base.version import radixserve_version
from radixserve.cluster.base.wire import Undecodable, grpc_code
from radixserve.kserve.v2 import grpc_service_pb2 as pb
from radixserve.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from radixserve.router.core import RouterCore
from radixserve.router.kserve_tensors import (INPUTS, OUTPUTS, SAMPLING, SAMPLING_NAMES, InferInputs, OutputValues,
                                              StreamOutputs, add_outputs, answer_outputs, decode_inputs,
                                              tensor_metadata)

log = logging.getLogger(__name__)
KSERVE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
COUNTED_METHODS = ("ModelInfer", "ModelStreamInfer")  # what radixserve_router_requests_total counts
MODEL_VERSION = "1"
FINAL_RESPONSE = "triton_final_response"
MAX_STREAM_REQUESTS = 64  # requests of one stream served at once
MAX_STREAM_RESPONSES = 64  # responses of one stream made and not yet sent

Put = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]


class _Responses:
    """A stream's responses in the order they are made: ``put`` waits while ``MAX_STREAM_RESPONSES`` are unsent;
    iterating ends after ``close``, once those put before are taken."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_STREAM_RESPONSES)

    async def put(self, response: pb.ModelStreamInferResponse) -> None:
        await self._room.acquire()
        self._queue.put_nowait(response)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        while (response := await self._queue.get()) is not None:
            self._room.release()
            yield response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over ``core``; see the module docstring for its contract."""

    def __init__(self, core: RouterCore) -> None:
        self._core = core

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._core.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="radixserve", version=radixserve_version())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        """Ready while the core is; not ready (whatever the name) while no worker is up to name the model."""
        served = await self._served(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=served is not None and self._core.ready())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        served = await self._served(request.name, request.version, context)
        if served is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is up to tell the model; retry shortly")
        return pb.ModelMetadataResponse(name=served.name, versions=[MODEL_VERSION], platform="radixserve",
                                        inputs=tensor_metadata(INPUTS), outputs=tensor_metadata(OUTPUTS))

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        try:
            inputs, generation = self._prepare("ModelInfer", request, context.time_remaining(), unary=True)
            answer = await fold(self._generate("ModelInfer", generation))
        except GenerationError as error:
            await context.abort(grpc_code(error.status), str(error))
        except Exception:  # a bug: INTERNAL, as on the other APIs, rather than grpcio's UNKNOWN naming the type
            log.exception("a ModelInfer request failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        return _response(request, inputs, answer_outputs(answer, inputs.text if inputs.prepend_input else ""))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest | Undecodable],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request served in a task of its own; their responses leave in the order they are made."""
        responses = _Responses()
        serving = asyncio.create_task(self._serve_stream(requests, context, responses))
        try:
            async for response in responses:
                yield response
            await serving  # raises what failed the stream's own work (reading it), if anything did
        finally:
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

    def count_undecodable(self, method: str) -> None:
        """A unary request to ``method`` whose bytes did not parse, about to be refused INVALID_ARGUMENT."""
        if method in COUNTED_METHODS:
            self._core.count_refused(method, Status.INVALID_ARGUMENT)

    async def _served(self, name: str, model_version: str, context: grpc.aio.ServicerContext) -> ServedModel | None:
        """The served model, when ``name`` and ``model_version`` are its; None while no worker is up."""
        try:
            return self._check_model(name, model_version)
        except GenerationError as error:
            await context.abort(grpc_code(error.status), str(error))

    def _check_model(self, name: str, model_version: str) -> ServedModel | None:
        served = self._core.served_model()
        if served is not None and name != served.name:
            raise GenerationError(Status.NOT_FOUND, f"unknown model {name!r}; this server serves {served.name!r}")
        if model_version not in ("", MODEL_VERSION):
            raise GenerationError(Status.NOT_FOUND,
                                  f"model {name!r} has no version {model_version!r}; its version is {MODEL_VERSION!r}")
        return served

    def _prepare(self, method: str, request: pb.ModelInferRequest, time_remaining: float | None,
                 unary: bool) -> tuple[InferInputs, GenerationRequest]:
        """The decoded inputs and the core's request; a refusal is counted under ``method`` and raised."""
        try:
            self._check_model(request.model_name, request.model_version)
            inputs = decode_inputs(request)
            if unary and inputs.stream:
                raise GenerationError(Status.INVALID_ARGUMENT, "must be false in ModelInfer; stream with "
                                                               "ModelStreamInfer", "stream")
        except GenerationError as error:
            self._core.count_refused(method, error.status)
            raise
        timeout_s = None if time_remaining is None else max(time_remaining, 0.001)
        return inputs, GenerationRequest(Prompt(text=inputs.text), inputs.params, request.id, timeout_s)

    async def _generate(self, method: str, generation: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """The core's stream, its errors naming this API's tensors."""
        try:
            async with contextlib.aclosing(self._core.generate(generation, method)) as deltas:
                async for delta in deltas:
                    yield delta
        except GenerationError as error:
            raise error.renamed(_tensor_name) from None

    async def _serve_stream(self, requests: AsyncIterator[pb.ModelInferRequest | Undecodable],
                            context: grpc.aio.ServicerContext, responses: _Responses) -> None:
        """Serve each request of the stream as it comes, at most ``MAX_STREAM_REQUESTS`` at once; close
        ``responses`` once all are answered."""
        slots = asyncio.Semaphore(MAX_STREAM_REQUESTS)

        async def serve(request: pb.ModelInferRequest | Undecodable, time_remaining: float | None) -> None:
            try:
                await self._stream_one(request, time_remaining, responses.put)
            finally:
                slots.release()
        try:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    await slots.acquire()
                    group.create_task(serve(request, context.time_remaining()))
        finally:
            responses.close()

    async def _stream_one(self, request: pb.ModelInferRequest | Undecodable, time_remaining: float | None,
                          put: Put) -> None:
        """Answer one request of a stream: its responses, or a response holding its error, whatever failed."""
        if isinstance(request, Undecodable):
            self._core.count_refused("ModelStreamInfer", Status.INVALID_ARGUMENT)
            await put(_error_response("", GenerationError(Status.INVALID_ARGUMENT, request.details)))
            return
        try:
            inputs, generation = self._prepare("ModelStreamInfer", request, time_remaining, unary=False)
            if inputs.stream:
                await self._stream_deltas(request, inputs, generation, put)
            else:
                answer = await fold(self._generate("ModelStreamInfer", generation))
                prefix = inputs.text if inputs.prepend_input else ""
                await put(_stream_response(request, inputs, answer_outputs(answer, prefix), True))
        except GenerationError as error:
            await put(_error_response(request.id, error))
        except Exception:
            log.exception("request %r of a ModelStreamInfer stream failed", request.id)
            await put(_error_response(request.id, GenerationError(Status.INTERNAL, "internal error")))

    async def _stream_deltas(self, request: pb.ModelInferRequest, inputs: InferInputs, generation: GenerationRequest,
                             put: Put) -> None:
        """One response per delta; the final one (the delta with the usage) once the core has counted the request."""
        outputs = StreamOutputs(inputs.params.n)
        final: OutputValues | None = None
        async with contextlib.aclosing(self._generate("ModelStreamInfer", generation)) as deltas:
            async for delta in deltas:
                if delta.usage is None:
                    await put(_stream_response(request, inputs, outputs.of(delta), False))
                else:
                    final = outputs.of(delta)
        assert final is not None, "the last delta of every answer carries its usage"
        await put(_stream_response(request, inputs, final, True))


def _tensor_name(field: str) -> str:
    """The core's field names in this API's terms."""
    if field in ("prompt", "token_ids"):
        return "text_input"
    if field == "request_id":
        return "id"
    if field.split(".")[0] in SAMPLING_NAMES:
        return f"{SAMPLING}.{field}"
    return field


def _response(request: pb.ModelInferRequest, inputs: InferInputs, values: OutputValues) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION, id=request.id)
    add_outputs(response, inputs.outputs, values)
    return response


def _stream_response(request: pb.ModelInferRequest, inputs: InferInputs, values: OutputValues,
                     final: bool) -> pb.ModelStreamInferResponse:
    response = _response(request, inputs, values)
    response.parameters[FINAL_RESPONSE].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=response)


def _error_response(request_id: str, error: GenerationError) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(error_message=f"{error.status.name}: {error}",
                                       infer_response=pb.ModelInferResponse(id=request_id))
