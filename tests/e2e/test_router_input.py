"""Bad input over gRPC: INVALID_ARGUMENT naming the field, oversize messages refused, the router keeps serving."""

from __future__ import annotations

import grpc
import pytest
from cluster_calls import chat_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

VOCAB_SIZE = 49152


def _text(**sampling: object) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(text="Hello", sampling=types_pb2.SamplingOptions(max_tokens=2, **sampling))


def _chat(*messages: tuple[str, str]) -> api_pb2.GenerateRequest:
    return api_pb2.GenerateRequest(chat=api_pb2.Chat(messages=[api_pb2.ChatMessage(role=r, content=c)
                                                               for r, c in messages]))


# (field named in the error, a strategy of requests that are bad in that field only)
BAD_REQUESTS = [
    ("prompt", st.just(api_pb2.GenerateRequest())),
    ("text", st.just(api_pb2.GenerateRequest(text=""))),
    ("text", st.sampled_from(["\x13", "\x04", "\x14\x13"]).map(lambda t: api_pb2.GenerateRequest(text=t))),
    ("token_ids", st.just(api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds()))),
    ("token_ids", st.integers(VOCAB_SIZE, 2**32 - 1).map(
        lambda t: api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=[1, t, 2])))),
    ("chat.messages", st.just(_chat())),
    ("chat.messages[0].role", st.text(min_size=1, max_size=8).map(lambda c: _chat(("", c)))),
    ("request_id", st.text(min_size=129, max_size=300).map(
        lambda r: api_pb2.GenerateRequest(request_id=r, text="hi"))),
    ("timeout_seconds", st.sampled_from([0.0, -1.0, float("nan"), float("inf")]).map(
        lambda t: api_pb2.GenerateRequest(text="hi", timeout_seconds=t))),
    ("sampling.max_tokens", st.integers(-2**63, 0).map(
        lambda v: api_pb2.GenerateRequest(text="hi", sampling=types_pb2.SamplingOptions(max_tokens=v)))),
    ("sampling.temperature", st.floats(max_value=-1e-6).map(lambda v: _text(temperature=v))),
    ("sampling.top_p", st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001)).map(
        lambda v: _text(top_p=v))),
    ("sampling.top_k", st.integers(-2**63, -2).map(lambda v: _text(top_k=v))),
    ("sampling.min_p", st.floats(min_value=1.0001).map(lambda v: _text(min_p=v))),
    ("sampling.repetition_penalty", st.floats(max_value=0.0).map(lambda v: _text(repetition_penalty=v))),
    ("sampling.frequency_penalty", st.floats(min_value=2.0001).map(lambda v: _text(frequency_penalty=v))),
    ("sampling.presence_penalty", st.floats(max_value=-2.0001).map(lambda v: _text(presence_penalty=v))),
    ("sampling.seed", st.integers(-2**63, -1).map(lambda v: _text(seed=v))),
    ("sampling.logprobs", st.one_of(st.integers(-2**63, -1), st.integers(21, 2**63 - 1)).map(
        lambda v: _text(logprobs=v))),
    ("sampling.n", st.one_of(st.integers(-2**63, 0), st.integers(65, 2**63 - 1)).map(lambda v: _text(n=v))),
    ("sampling.min_tokens", st.integers(3, 2**40).map(lambda v: _text(min_tokens=v))),
    ("sampling.stop", st.just(_text(stop=[""]))),
    ("sampling.stop", st.just(_text(stop=["a", "b", "c", "d", "e"]))),
    ("sampling.stop", st.just(_text(stop=["x" * 300]))),
    ("chat.messages[0].role", st.sampled_from(["wizard", "USER"]).map(lambda r: _chat((r, "Hi")))),
    ("sampling.stop_token_ids", st.integers(VOCAB_SIZE, 2**62).map(lambda v: _text(stop_token_ids=[v]))),
]


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[str, api_pb2.GenerateRequest]:
    field, strategy = draw(st.sampled_from(BAD_REQUESTS))
    return field, draw(strategy)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_requests(), streaming=st.booleans())
def test_every_invalid_field_is_named_in_invalid_argument(stub: api_pb2_grpc.GenerationStub,
                                                           case: tuple[str, api_pb2.GenerateRequest],
                                                           streaming: bool):
    field, request = case
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(stub.Generate(request, timeout=30))
        else:
            stub.Complete(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(field), (field, caught.value.details())


def test_a_prompt_over_the_context_is_invalid(stub: api_pb2_grpc.GenerationStub):
    request = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=[42] * 5000))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Complete(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("token_ids") and "4096" in caught.value.details()


def test_oversize_messages_are_refused_and_the_router_keeps_serving(stub: api_pb2_grpc.GenerationStub):
    huge = api_pb2.GenerateRequest(text="x" * (5 * 2**20))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Complete(huge, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = stub.Complete(chat_request("You are terse.", "Say hi.", max_tokens=3), timeout=120)
    assert reply.choices[0].token_ids


def test_bytes_that_do_not_parse_are_invalid_argument_and_the_router_keeps_serving(
        channel: grpc.Channel, stub: api_pb2_grpc.GenerationStub):
    complete = channel.unary_unary("/radixserve.v1.Generation/Complete", request_serializer=None,
                                   response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        complete(b"\xff\xff\xff", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("GenerateRequest: cannot be parsed: "), caught.value.details()
    reply = stub.Complete(chat_request("You are terse.", "Say hi.", max_tokens=3), timeout=120)
    assert reply.choices[0].token_ids
