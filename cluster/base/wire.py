"""The wire side both the router and the worker share: message conversions, and how services take requests.

Conversions between the protos and the neutral generation types (``cluster.base.generation``) and between gRPC
status codes and ``Status`` live here, so neither the router core nor a front end writes its own.

The router and the worker both turn a ``SamplingOptions`` into ``SamplingParams``: the router to refuse bad
input before routing, the worker because it trusts no caller. Errors are ``ValueError`` naming the field.

Both register their services with ``add_servicer``, which answers request bytes that do not parse as the
request message (random bytes, truncations, invalid UTF-8 in a string field) INVALID_ARGUMENT naming the message,
where grpc's generated registration answers UNKNOWN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from radixserve.cluster.base.generation import ChoiceDelta, Status, TokenLogprob
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.v1 import types_pb2

# SamplingOptions fields that are `optional` scalars: unset keeps the SamplingParams default.
_OPTIONAL_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "frequency_penalty", "presence_penalty", "seed", "logprobs", "n")


def sampling_params_from_proto(options: types_pb2.SamplingOptions, field_prefix: str = "sampling.") -> SamplingParams:
    """The validated ``SamplingParams`` of ``options``; a ValueError names the field as ``sampling.<name>``."""
    kwargs: dict[str, Any] = {name: getattr(options, name) for name in _OPTIONAL_FIELDS if options.HasField(name)}
    kwargs.update(stop=tuple(options.stop), stop_token_ids=tuple(options.stop_token_ids), ignore_eos=options.ignore_eos)
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:
        raise ValueError(f"{field_prefix}{error}") from None


def sampling_options_to_proto(params: SamplingParams) -> types_pb2.SamplingOptions:
    """The ``SamplingOptions`` that ``sampling_params_from_proto`` turns back into ``params``."""
    options = types_pb2.SamplingOptions(stop=params.stop, stop_token_ids=params.stop_token_ids,
                                        ignore_eos=params.ignore_eos)
    for name in _OPTIONAL_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(options, name, value)
    return options


class Undecodable(NamedTuple):
    """What a method's request deserializer returns for bytes that do not parse; ``details`` names the message."""

    details: str


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object,
                 on_undecodable: Callable[[str], None] | None = None) -> None:
    """Serve ``servicer``'s methods of ``service`` on ``server``, as the generated ``add_*Servicer_to_server``
    does, except for requests that do not parse.

    A unary request that does not parse is answered INVALID_ARGUMENT ``"<RequestMessage>: cannot be parsed: <why>"``
    without calling the servicer, after ``on_undecodable(method name)`` (to count them before the status leaves).
    A bidirectional method's servicer takes the stream of requests as they come, each a request message or an
    ``Undecodable`` holding those details, and answers each itself (the stream may go on after one).
    A streaming method's responses are written by the handler, and its generator is closed as soon as the call
    ends, cancelled or not.
    """
    handlers = {method.name: _handler(method, getattr(servicer, method.name), on_undecodable)
                for method in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _handler(method: MethodDescriptor, behaviour: Callable[..., Any],
             on_undecodable: Callable[[str], None] | None) -> grpc.RpcMethodHandler:
    if method.client_streaming and not method.server_streaming:
        raise ValueError(f"{method.full_name}: client-streaming calls are not supported")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    if method.client_streaming:
        return grpc.stream_stream_rpc_method_handler(_written(behaviour), request_deserializer=_parser(request_class),
                                                     response_serializer=response_class.SerializeToString)

    async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
        if on_undecodable is not None:
            on_undecodable(method.name)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)

    async def unary(request: Message | Undecodable, context: grpc.aio.ServicerContext) -> Message:
        if isinstance(request, Undecodable):
            await refuse(request, context)
        return await behaviour(request, context)

    async def streaming(request: Message | Undecodable, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            await refuse(request, context)
        await _written(behaviour)(request, context)

    factory = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
    return factory(streaming if method.server_streaming else unary, request_deserializer=_parser(request_class),
                   response_serializer=response_class.SerializeToString)


def _written(behaviour: Callable[..., Any]) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    """A handler writing each response ``behaviour`` yields, closing it as soon as the call ends."""
    async def write(request: Any, context: grpc.aio.ServicerContext) -> None:
        async with contextlib.aclosing(behaviour(request, context)) as responses:
            async for response in responses:
                await context.write(response)
    return write


def _parser(request_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return request_class.FromString(data)
        except DecodeError as error:
            return Undecodable(f"{request_class.DESCRIPTOR.name}: cannot be parsed: {error}")
    return parse


def status_of(code: grpc.StatusCode) -> Status:
    """The neutral ``Status`` of a gRPC status code (codes without a neutral twin are INTERNAL)."""
    return Status.__members__.get(code.name, Status.INTERNAL)


def grpc_code(status: Status) -> grpc.StatusCode:
    """The gRPC status code of a neutral ``Status`` (they share names)."""
    return grpc.StatusCode[status.name]


def chunk_to_proto(choice: ChoiceDelta) -> types_pb2.CompletionChunk:
    logprobs = [types_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                       top=[types_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
                for lp in choice.logprobs]
    return types_pb2.CompletionChunk(index=choice.index, token_ids=choice.token_ids, text=choice.text,
                                     logprobs=logprobs, finish_reason=choice.finish_reason or "")


def chunk_from_proto(chunk: types_pb2.CompletionChunk) -> ChoiceDelta:
    logprobs = tuple(TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                     for lp in chunk.logprobs)
    return ChoiceDelta(chunk.index, tuple(chunk.token_ids), chunk.text, logprobs, chunk.finish_reason or None)
