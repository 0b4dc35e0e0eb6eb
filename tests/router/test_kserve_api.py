"""The router's KServe v2 front end over a real worker (tiny engine) through radixserve's own stubs: answers equal
to the radixserve.v1 API's, streaming, every malformed tensor refused naming it, a fuzz, undecodable bytes, metrics.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_router_service import (TIMEOUT_S, Cluster, background_cluster, checkpoint, counted,  # noqa: F401 (fixtures)
                                 raw_channel)
from undecodable import call_raw, refused, request_class, undecodable

from radixserve.kserve.v2 import grpc_service_pb2 as pb
from radixserve.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from radixserve.router import kserve_api
from radixserve.router.kserve_tensors import INPUTS, SAMPLING_NAMES
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

MODEL = "tiny"  # the tiny cluster's model name
PROMPT = "Hello there"
GREEDY = {"max_tokens": 3, "temperature": 0}
KSERVE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
InputTensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def stub(raw_channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(raw_channel)


@pytest.fixture(scope="module")
def v1_answer(raw_channel: grpc.Channel) -> api_pb2.CompleteResponse:
    """What radixserve.v1 answers for ``PROMPT`` with ``GREEDY`` sampling."""
    request = api_pb2.GenerateRequest(text=PROMPT, sampling=types_pb2.SamplingOptions(**GREEDY))
    return api_pb2_grpc.GenerationStub(raw_channel).Complete(request, timeout=TIMEOUT_S)


def bytes_tensor(name: str, *values: bytes, shape: Iterable[int] = (1,)) -> InputTensor:
    return InputTensor(name=name, datatype="BYTES", shape=list(shape), contents=pb.InferTensorContents(
        bytes_contents=list(values)))


def bool_tensor(name: str, *values: bool, shape: Iterable[int] = (1,)) -> InputTensor:
    return InputTensor(name=name, datatype="BOOL", shape=list(shape), contents=pb.InferTensorContents(
        bool_contents=list(values)))


def infer_request(text: str | None = PROMPT, sampling: dict[str, Any] | None = GREEDY, model: str = MODEL,
                  request_id: str = "", **flags: bool) -> pb.ModelInferRequest:
    """A request with the vLLM backend's tensors: ``flags`` are the BOOL inputs (``stream=True``, ...)."""
    inputs = [] if text is None else [bytes_tensor("text_input", text.encode())]
    if sampling is not None:
        inputs.append(bytes_tensor("sampling_parameters", json.dumps(sampling).encode()))
    inputs += [bool_tensor(name, value) for name, value in flags.items()]
    return pb.ModelInferRequest(model_name=model, id=request_id, inputs=inputs)


def with_extra_outputs(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    extra = [bool_tensor(f"return_{name}", True) for name in ("finish_reason", "num_input_tokens", "num_output_tokens")]
    request.inputs.extend(extra)
    return request


def as_raw(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    """``request`` with every input's elements moved to ``raw_input_contents``."""
    raw = pb.ModelInferRequest()
    raw.CopyFrom(request)
    for tensor in raw.inputs:
        if tensor.datatype == "BOOL":
            raw.raw_input_contents.append(bytes(tensor.contents.bool_contents))
        else:
            raw.raw_input_contents.append(b"".join(struct.pack("<I", len(v)) + v
                                                   for v in tensor.contents.bytes_contents))
        tensor.ClearField("contents")
    return raw


def outputs(response: pb.ModelInferResponse) -> dict[str, list[Any]]:
    """Each output's elements, read from ``raw_output_contents`` (strings decoded)."""
    values: dict[str, list[Any]] = {}
    assert len(response.outputs) == len(response.raw_output_contents)
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype == "UINT32":
            values[tensor.name] = list(struct.unpack(f"<{len(raw) // 4}I", raw))
        else:
            assert tensor.datatype == "BYTES", tensor.datatype
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4:offset + 4 + length].decode())
                offset += 4 + length
            values[tensor.name] = items
        assert len(values[tensor.name]) == math.prod(tensor.shape), tensor
    return values


def stream(stub: pb_grpc.GRPCInferenceServiceStub,
           requests: Iterable[pb.ModelInferRequest]) -> list[pb.ModelStreamInferResponse]:
    return list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))


def by_id(responses: list[pb.ModelStreamInferResponse]) -> dict[str, list[pb.ModelStreamInferResponse]]:
    grouped: dict[str, list[pb.ModelStreamInferResponse]] = {}
    for response in responses:
        grouped.setdefault(response.infer_response.id, []).append(response)
    return grouped


def final_flags(responses: list[pb.ModelStreamInferResponse]) -> list[bool]:
    return [r.infer_response.parameters["triton_final_response"].bool_param for r in responses]


def settle(c: Cluster) -> None:
    """Wait until the router holds no request (a stream's requests may end just after its last response)."""
    deadline = time.monotonic() + TIMEOUT_S
    while c.router.core.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)  # the poll interval
    assert c.router.core.num_in_flight == 0


# ---- answers --------------------------------------------------------------------------------------------------

def test_model_infer_answers_what_the_v1_api_answers(stub: pb_grpc.GRPCInferenceServiceStub,
                                                     v1_answer: api_pb2.CompleteResponse):
    choice = v1_answer.choices[0]
    request = with_extra_outputs(infer_request(request_id="r1", exclude_input_in_output=True))
    response = stub.ModelInfer(request, timeout=TIMEOUT_S)
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r1")
    assert outputs(response) == {"text_output": [choice.text], "finish_reason": [choice.finish_reason],
                                 "num_input_tokens": [v1_answer.usage.prompt_tokens],
                                 "num_output_tokens": [len(choice.token_ids)]}
    assert outputs(stub.ModelInfer(as_raw(request), timeout=TIMEOUT_S)) == outputs(response)
    by_default = stub.ModelInfer(infer_request(), timeout=TIMEOUT_S)
    assert outputs(by_default) == {"text_output": [PROMPT + choice.text]}  # the vLLM backend prepends the prompt


def test_model_infer_takes_shape_1_1_string_numbers_samples_and_a_choice_of_outputs(
        stub: pb_grpc.GRPCInferenceServiceStub, v1_answer: api_pb2.CompleteResponse):
    request = with_extra_outputs(infer_request(sampling={"max_tokens": "3", "temperature": "0", "n": 2},
                                               exclude_input_in_output=True))
    for tensor in request.inputs:
        tensor.shape[:] = [1, 1]
    request.outputs.add(name="text_output")
    request.outputs.add(name="num_output_tokens")
    values = outputs(stub.ModelInfer(request, timeout=TIMEOUT_S))
    assert values == {"text_output": [v1_answer.choices[0].text] * 2,
                      "num_output_tokens": [len(v1_answer.choices[0].token_ids)] * 2}


def test_stream_infer_serves_requests_concurrently_one_response_per_delta(
        background_cluster: Cluster, stub: pb_grpc.GRPCInferenceServiceStub, v1_answer: api_pb2.CompleteResponse):
    choice = v1_answer.choices[0]
    streamed = [with_extra_outputs(infer_request(request_id=f"s{i}", stream=True)) for i in range(3)]
    whole = with_extra_outputs(infer_request(request_id="whole", exclude_input_in_output=True))
    grouped = by_id(stream(stub, [*streamed, whole]))
    assert sorted(grouped) == ["s0", "s1", "s2", "whole"]
    for request_id in ("s0", "s1", "s2"):
        responses = grouped[request_id]
        assert final_flags(responses) == [False] * (len(responses) - 1) + [True]
        values = [outputs(r.infer_response) for r in responses]
        assert "".join(v["text_output"][0] for v in values) == choice.text
        assert sum(v["num_output_tokens"][0] for v in values) == len(choice.token_ids)
        assert [v["finish_reason"] for v in values] == [["None"]] * (len(values) - 1) + [[choice.finish_reason]]
        assert [v.get("num_input_tokens") for v in values][-1] == [v1_answer.usage.prompt_tokens]
    [answer] = grouped["whole"]
    assert final_flags([answer]) == [True]
    assert outputs(answer.infer_response)["text_output"] == [choice.text]
    settle(background_cluster)


def test_server_and_model_readiness_metadata_and_health(background_cluster: Cluster,
                                                        stub: pb_grpc.GRPCInferenceServiceStub,
                                                        raw_channel: grpc.Channel):
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT_S).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT_S).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=TIMEOUT_S).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"), timeout=TIMEOUT_S).ready
    assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=TIMEOUT_S).name == "radixserve"
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=TIMEOUT_S)
    assert (metadata.name, list(metadata.versions)) == (MODEL, ["1"])
    assert {(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs} == {
        ("text_input", "BYTES", (1,)), ("sampling_parameters", "BYTES", (1,)), ("stream", "BOOL", (1,)),
        ("exclude_input_in_output", "BOOL", (1,)), ("return_finish_reason", "BOOL", (1,)),
        ("return_num_input_tokens", "BOOL", (1,)), ("return_num_output_tokens", "BOOL", (1,))}
    assert {(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs} == {
        ("text_output", "BYTES", (-1,)), ("finish_reason", "BYTES", (-1,)), ("num_input_tokens", "UINT32", (1,)),
        ("num_output_tokens", "UINT32", (-1,))}
    health = health_pb2_grpc.HealthStub(raw_channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=KSERVE.full_name), timeout=TIMEOUT_S)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("call", ["ModelInfer", "ModelReady", "ModelMetadata", "ModelStreamInfer"])
@pytest.mark.parametrize(("name", "version"), [("no-such-model", ""), (MODEL, "2")])
def test_an_unknown_model_or_version_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub, call: str, name: str,
                                                  version: str):
    if call == "ModelStreamInfer":
        request = infer_request(model=name, request_id="x")
        request.model_version = version
        [response] = stream(stub, [request])
        assert response.error_message.startswith("NOT_FOUND: ") and name in response.error_message
        assert response.infer_response.id == "x"
        return
    request = {"ModelInfer": pb.ModelInferRequest(model_name=name, model_version=version,
                                                  inputs=infer_request().inputs),
               "ModelReady": pb.ModelReadyRequest(name=name, version=version),
               "ModelMetadata": pb.ModelMetadataRequest(name=name, version=version)}[call]
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request, timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    assert name in caught.value.details()


# ---- malformed tensors ----------------------------------------------------------------------------------------

def _replaced(name: str, tensor: InputTensor, request: pb.ModelInferRequest | None = None) -> pb.ModelInferRequest:
    """``request`` (a good one by default) with its input ``name`` replaced by ``tensor`` (or added)."""
    if request is None:
        request = infer_request(exclude_input_in_output=True)
    kept = [t for t in request.inputs if t.name != name]
    del request.inputs[:]
    request.inputs.extend([*kept, tensor])
    return request


def _sampling(**params: Any) -> pb.ModelInferRequest:
    return infer_request(sampling={**GREEDY, **params})


def _raw(request: pb.ModelInferRequest, index: int, data: bytes) -> pb.ModelInferRequest:
    raw = as_raw(request)
    raw.raw_input_contents[index] = data
    return raw


_INT_TEXT = InputTensor(name="text_input", datatype="INT32", shape=[1], contents=pb.InferTensorContents(
    int_contents=[5]))
_MISFILED_TEXT = InputTensor(name="text_input", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(
    int_contents=[5]))
_BOTH = as_raw(infer_request())
_BOTH.inputs[0].contents.bytes_contents.append(b"Hello")
_UNKNOWN_OUTPUT = infer_request()
_UNKNOWN_OUTPUT.outputs.add(name="logits")

# (what the error names, the request)
BAD_REQUESTS = [
    ("text_input", infer_request(text=None)),
    ("text_input", _replaced("text_input", _INT_TEXT)),
    ("text_input", _replaced("text_input", _MISFILED_TEXT)),
    ("text_input", _replaced("text_input", bytes_tensor("text_input", b"a", b"b", shape=[2]))),
    ("text_input", _replaced("text_input", bytes_tensor("text_input", b"a", b"b"))),
    ("text_input", _replaced("text_input", bytes_tensor("text_input", shape=[]))),
    ("text_input", _replaced("text_input", bytes_tensor("text_input", b"\xff\xfe"))),
    ("text_input", infer_request(text="")),
    ("text_input", infer_request(text="x" * 2000)),  # beyond the tiny model's 256-token context
    ("text_input", _replaced("sampling_parameters", bytes_tensor("text_input", b"again"))),  # given twice
    ("text_input", _raw(infer_request(), 0, b"\x09\x00\x00\x00Hel")),
    ("text_input", _raw(infer_request(), 0, b"\x05\x00")),
    ("text_input", _BOTH),
    ("stream", _replaced("stream", bytes_tensor("stream", b"true"))),
    ("stream", infer_request(stream=True)),  # ModelInfer does not stream
    ("stream", _raw(infer_request(stream=False), 2, b"\x02")),
    ("exclude_input_in_output", _replaced("exclude_input_in_output",
                                          InputTensor(name="exclude_input_in_output", datatype="INT8", shape=[1],
                                                      contents=pb.InferTensorContents(int_contents=[1])))),
    ("return_finish_reason", _replaced("return_finish_reason", bool_tensor("return_finish_reason", True, False,
                                                                            shape=[2]))),
    ("sampling_parameters", _replaced("sampling_parameters", bytes_tensor("sampling_parameters", b"{max_tokens: 3"))),
    ("sampling_parameters", _replaced("sampling_parameters", bytes_tensor("sampling_parameters", b"[3]"))),
    ("sampling_parameters", _replaced("sampling_parameters", bytes_tensor("sampling_parameters", b"\xff"))),
    ("sampling_parameters", _replaced("sampling_parameters", bool_tensor("sampling_parameters", True))),
    ("sampling_parameters.best_of", _sampling(best_of=2)),
    ("sampling_parameters.logprobs", _sampling(logprobs=1)),
    ("sampling_parameters.max_tokens", _sampling(max_tokens=0)),
    ("sampling_parameters.max_tokens", _sampling(max_tokens="three")),
    ("sampling_parameters.max_tokens", _sampling(max_tokens=2.5)),
    ("sampling_parameters.temperature", _sampling(temperature=-1)),
    ("sampling_parameters.temperature", _sampling(temperature="hot")),
    ("sampling_parameters.top_p", _sampling(top_p=1.5)),
    ("sampling_parameters.top_k", _sampling(top_k=-2)),
    ("sampling_parameters.min_p", _sampling(min_p="NaN")),
    ("sampling_parameters.seed", _sampling(seed=-1)),
    ("sampling_parameters.n", _sampling(n=0)),
    ("sampling_parameters.presence_penalty", _sampling(presence_penalty=3)),
    ("sampling_parameters.frequency_penalty", _sampling(frequency_penalty=-3)),
    ("sampling_parameters.repetition_penalty", _sampling(repetition_penalty=0)),
    ("sampling_parameters.ignore_eos", _sampling(ignore_eos="yes")),
    ("sampling_parameters.min_tokens", _sampling(min_tokens=9)),
    ("sampling_parameters.stop", _sampling(stop=[""])),
    ("sampling_parameters.stop", _sampling(stop=7)),
    ("sampling_parameters.stop", _sampling(stop=["a", "b", "c", "d", "e"])),
    ("sampling_parameters.stop", _sampling(stop="x" * 300)),
    ("sampling_parameters.stop", _sampling(stop=["\ud800"])),
    ("sampling_parameters.top_k", _sampling(top_k=2**70)),
    ("sampling_parameters.max_tokens", _sampling(max_tokens=2**63)),
    ("sampling_parameters.stop_token_ids", _sampling(stop_token_ids=[2**64])),
    ("sampling_parameters.stop_token_ids", _sampling(stop_token_ids=[10**9])),
    ("sampling_parameters.stop_token_ids", _sampling(stop_token_ids=[-1])),
    ("prompt", _replaced("prompt", bytes_tensor("prompt", b"hi"))),
    ("inputs[3].name", _replaced("", bool_tensor("", True), infer_request(stream=False))),
    ("raw_input_contents", pb.ModelInferRequest(model_name=MODEL, inputs=infer_request().inputs,
                                                raw_input_contents=[b"\x02\x00\x00\x00hi"])),
    ("logits", _UNKNOWN_OUTPUT),
    ("id", infer_request(request_id="r" * 200)),
]


@pytest.mark.parametrize(("field", "request_"), BAD_REQUESTS, ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD_REQUESTS)])
def test_every_malformed_tensor_is_invalid_argument_naming_it(stub: pb_grpc.GRPCInferenceServiceStub, field: str,
                                                              request_: pb.ModelInferRequest):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details().startswith(f"{field}: "), (field, caught.value.details())


def test_in_a_stream_each_malformed_request_gets_its_error_and_the_stream_goes_on(
        background_cluster: Cluster, stub: pb_grpc.GRPCInferenceServiceStub):
    cases = {}
    for i, (field, bad) in enumerate(BAD_REQUESTS):
        if field == "stream":
            continue  # streaming is ModelStreamInfer's to do
        request = pb.ModelInferRequest()
        request.CopyFrom(bad)
        request.id = request.id or f"bad{i}"
        cases[request.id] = (field, request)
    good = infer_request(request_id="good", stream=True)
    bad_streamed = infer_request(request_id="bad-stream", stream=True, exclude_input_in_output=False)
    grouped = by_id(stream(stub, [*(r for _, r in cases.values()), bad_streamed, good]))
    for request_id, (field, _) in cases.items():
        [response] = grouped[request_id]
        assert response.error_message.startswith(f"INVALID_ARGUMENT: {field}: "), (field, response.error_message)
        assert not response.infer_response.outputs
    assert grouped["bad-stream"][0].error_message.startswith("INVALID_ARGUMENT: exclude_input_in_output: ")
    assert final_flags(grouped["good"])[-1]
    settle(background_cluster)


@pytest.mark.parametrize(("field", "sampling"), [("top_k", {"top_k": 2**70}), ("stop", {"stop": ["\ud800"]}),
                                               ("seed", {"seed": 2**70})])
def test_one_bad_request_of_a_stream_fails_alone(background_cluster: Cluster, stub: pb_grpc.GRPCInferenceServiceStub,
                                                 field: str, sampling: dict[str, Any]):
    requests = [infer_request(request_id=f"r{i}", stream=i % 2 == 0, sampling={**GREEDY, **(sampling if i == 2 else {})})
                for i in range(5)]
    grouped = by_id(stream(stub, requests))
    [error] = grouped.pop("r2")
    assert error.error_message.startswith(f"INVALID_ARGUMENT: sampling_parameters.{field}: "), error.error_message
    assert sorted(grouped) == ["r0", "r1", "r3", "r4"]
    assert all(final_flags(responses)[-1] and not any(r.error_message for r in responses)
               for responses in grouped.values())
    settle(background_cluster)


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (RuntimeError) under the request whose id is "boom"."""
    decode = kserve_api.decode_inputs

    def failing(request: pb.ModelInferRequest) -> Any:
        if request.id == "boom":
            raise RuntimeError("a bug")
        return decode(request)
    monkeypatch.setattr(kserve_api, "decode_inputs", failing)


def test_a_failure_in_one_request_of_a_stream_fails_it_alone(background_cluster: Cluster,
                                                             stub: pb_grpc.GRPCInferenceServiceStub, boom: None):
    requests = [infer_request(request_id=f"r{i}", stream=True) for i in range(3)]
    grouped = by_id(stream(stub, [*requests[:2], infer_request(request_id="boom"), requests[2]]))
    assert grouped.pop("boom")[0].error_message.startswith("INTERNAL: ")
    assert sorted(grouped) == ["r0", "r1", "r2"] and all(final_flags(r)[-1] for r in grouped.values())
    settle(background_cluster)


def test_a_bug_under_model_infer_is_internal_and_the_server_serves_on(background_cluster: Cluster,
                                                                      stub: pb_grpc.GRPCInferenceServiceStub,
                                                                      boom: None):
    with pytest.raises(grpc.RpcError) as failed:
        stub.ModelInfer(infer_request(request_id="boom"), timeout=TIMEOUT_S)
    assert failed.value.code() == grpc.StatusCode.INTERNAL and failed.value.details() == "internal error"
    assert outputs(stub.ModelInfer(infer_request(request_id="after"), timeout=TIMEOUT_S))["text_output"]
    settle(background_cluster)


def test_a_stream_serves_a_bounded_number_of_requests_at_once(background_cluster: Cluster,
                                                             stub: pb_grpc.GRPCInferenceServiceStub,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(kserve_api, "MAX_STREAM_REQUESTS", 2)
    engine = background_cluster.engines[0]
    engine.gate.clear()
    try:
        call = stub.ModelStreamInfer(iter([infer_request(request_id=f"r{i}") for i in range(6)]), timeout=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while engine.load().num_waiting + engine.load().num_running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the poll interval
        held = background_cluster.router.core.num_in_flight
    finally:
        engine.gate.set()
    assert held == 2
    assert sorted(by_id(list(call))) == [f"r{i}" for i in range(6)]
    settle(background_cluster)


# ---- undecodable bytes, cancellation, metrics -----------------------------------------------------------------

MODEL_INFER = KSERVE.methods_by_name["ModelInfer"]
MODEL_STREAM_INFER = KSERVE.methods_by_name["ModelStreamInfer"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=undecodable(pb.ModelInferRequest), streaming=st.booleans())
def test_undecodable_bytes_are_invalid_argument_counted_and_a_stream_goes_on(
        background_cluster: Cluster, raw_channel: grpc.Channel, garbage: bytes, streaming: bool):
    method = MODEL_STREAM_INFER if streaming else MODEL_INFER
    refusals = counted(background_cluster, method=method.name, code="INVALID_ARGUMENT")
    if not streaming:
        with refused(MODEL_INFER):
            call_raw(raw_channel, MODEL_INFER, garbage, TIMEOUT_S)
    else:
        call = raw_channel.stream_stream(f"/{KSERVE.full_name}/{method.name}", request_serializer=None,
                                         response_deserializer=pb.ModelStreamInferResponse.FromString)
        good = infer_request(request_id="after").SerializeToString()
        responses = list(call(iter([garbage, good]), timeout=TIMEOUT_S))
        [error] = [r for r in responses if r.error_message]
        assert error.error_message.startswith("INVALID_ARGUMENT: ModelInferRequest: cannot be parsed: ")
        assert [r.infer_response.id for r in responses if not r.error_message] == ["after"]
    assert counted(background_cluster, method=method.name, code="INVALID_ARGUMENT") == refusals + 1


def test_cancelling_a_stream_ends_its_requests_on_the_worker(background_cluster: Cluster,
                                                             stub: pb_grpc.GRPCInferenceServiceStub):
    c = background_cluster
    engine = c.engines[0]
    cancelled = counted(c, method="ModelStreamInfer", code="CANCELLED")
    engine.gate.clear()
    try:
        call = stub.ModelStreamInfer(iter([infer_request(stream=True, sampling={"max_tokens": 40})]),
                                     timeout=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while c.router.core.num_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the poll interval
        call.cancel()
        settle(c)
    finally:
        engine.gate.set()
    deadline = time.monotonic() + TIMEOUT_S
    while engine.load().num_running + engine.load().num_waiting and time.monotonic() < deadline:
        time.sleep(0.01)  # the poll interval
    assert engine.load().num_running + engine.load().num_waiting == 0
    assert counted(c, method="ModelStreamInfer", code="CANCELLED") == cancelled + 1


def test_requests_are_counted_by_method_and_code_before_their_answer(background_cluster: Cluster,
                                                                     stub: pb_grpc.GRPCInferenceServiceStub):
    c = background_cluster
    labels = [(m, code) for m in ("ModelInfer", "ModelStreamInfer") for code in ("OK", "INVALID_ARGUMENT")]
    before = {label: counted(c, method=label[0], code=label[1]) for label in labels}
    stub.ModelInfer(infer_request(), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(_sampling(top_p=2), timeout=TIMEOUT_S)
    responses = stub.ModelStreamInfer(iter([infer_request(request_id="ok", stream=True), _sampling(top_p=2)]),
                                      timeout=TIMEOUT_S)
    for response in responses:
        if response.infer_response.parameters["triton_final_response"].bool_param:
            assert counted(c, method="ModelStreamInfer", code="OK") == before["ModelStreamInfer", "OK"] + 1
    after = {label: counted(c, method=label[0], code=label[1]) for label in labels}
    assert {label: after[label] - before[label] for label in labels} == dict.fromkeys(labels, 1)


# ---- fuzz -----------------------------------------------------------------------------------------------------

DATATYPES = ["BOOL", "UINT8", "UINT32", "UINT64", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "BF16",
             "", "bytes"]
CONTENTS = {"bool_contents": st.booleans(), "int_contents": st.integers(-2**31, 2**31 - 1),
            "int64_contents": st.integers(-2**63, 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
            "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
            "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8)}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=2), max_leaves=5)
# Values SamplingParams accepts (the tiny model's vocabulary has 320 tokens), some numbers as strings.
GOOD_SAMPLING = {
    "max_tokens": st.integers(1, 6), "min_tokens": st.just(0), "top_k": st.integers(-1, 50), "n": st.integers(1, 3),
    "seed": st.integers(0, 2**63 - 1), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2) | st.text(min_size=1, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 319), max_size=2),
}


@st.composite
def good_sampling(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(GOOD_SAMPLING)), max_size=4, unique=True))
    params = {name: draw(GOOD_SAMPLING[name]) for name in names}
    params.setdefault("max_tokens", draw(st.integers(1, 6)))
    return {name: str(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
            and draw(st.booleans()) else value for name, value in params.items()}


@st.composite
def good_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A request ``ModelInfer`` or ``ModelStreamInfer`` answers (``stream`` set only where it may be)."""
    flags = {name: draw(st.booleans()) for name in INPUTS if INPUTS[name].datatype == "BOOL" and draw(st.booleans())}
    if flags.get("stream"):
        flags.pop("exclude_input_in_output", None)
    request = infer_request(draw(st.text(min_size=1, max_size=12)), draw(good_sampling()), **flags)
    for _ in range(draw(st.integers(0, 2))):
        request.outputs.add(name=draw(st.sampled_from(list(OUTPUT_NAMES))))
    if draw(st.booleans()):
        for tensor in request.inputs:
            tensor.shape[:] = [1, 1]
    return request


OUTPUT_NAMES = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")


def _flaw(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """Make one thing about ``request`` (its elements in ``contents``) wrong, or unusual."""
    kind = draw(st.sampled_from(["drop", "duplicate", "rename", "datatype", "shape", "contents", "count", "sampling",
                                 "sampling_value", "model", "output"]))
    if kind == "model":
        request.model_name = draw(st.sampled_from(["", "other", MODEL.upper()]))
    elif kind == "output":
        request.outputs.add(name=draw(st.text(max_size=5)))
    elif kind in ("sampling", "sampling_value"):
        params = {"best_of": 2} if kind == "sampling" else {draw(st.sampled_from(sorted(SAMPLING_NAMES))):
                                                            draw(JSON_VALUES)}
        data = draw(st.sampled_from([json.dumps({**GREEDY, **params}).encode(), b"{"]) | st.binary(max_size=9)
                    | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
        _replaced("sampling_parameters", bytes_tensor("sampling_parameters", data), request)
    elif request.inputs:
        _flaw_tensor(draw, request, kind, draw(st.integers(0, len(request.inputs) - 1)))


def _flaw_tensor(draw: st.DrawFn, request: pb.ModelInferRequest, kind: str, i: int) -> None:
    tensor = request.inputs[i]
    if kind == "drop":
        del request.inputs[i]
    elif kind == "duplicate":
        request.inputs.append(tensor)
    elif kind == "rename":
        tensor.name = draw(st.sampled_from(list(INPUTS)) | st.text(max_size=5))
    elif kind == "datatype":
        tensor.datatype = draw(st.sampled_from(DATATYPES))
    elif kind == "shape":
        tensor.shape[:] = draw(st.lists(st.integers(-1, 3), max_size=3))
    elif kind == "contents":
        field = draw(st.sampled_from(list(CONTENTS)))
        tensor.contents.CopyFrom(pb.InferTensorContents(**{field: draw(st.lists(CONTENTS[field], max_size=2))}))
    else:  # count
        field = "bool_contents" if tensor.datatype == "BOOL" else "bytes_contents"
        values = list(getattr(tensor.contents, field)) * draw(st.sampled_from([0, 2]))
        tensor.contents.CopyFrom(pb.InferTensorContents(**{field: values}))


@st.composite
def fuzz_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A good request with up to three flaws, its elements in ``contents`` or (maybe cut) ``raw_input_contents``."""
    request = draw(good_requests())
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))):
        _flaw(draw, request)
    if draw(st.booleans()):
        request = as_raw(request)
        if request.raw_input_contents and draw(st.integers(0, 3)) == 0:
            i = draw(st.integers(0, len(request.raw_input_contents) - 1))
            data = request.raw_input_contents[i]
            request.raw_input_contents[i] = draw(st.sampled_from([data[:-1], data + b"\x01", b""])
                                                 | st.binary(max_size=9))
        if request.raw_input_contents and draw(st.integers(0, 5)) == 0:
            del request.raw_input_contents[-1]
    return request


def _names_a_tensor_of(request: pb.ModelInferRequest, details: str) -> bool:
    """Whether ``details`` starts by naming a tensor of ``request`` (or a sampling parameter, or the missing
    text_input), or says the model is unknown."""
    names = {t.name or f"inputs[{i}].name" for i, t in enumerate(request.inputs)}
    names |= {o.name or "outputs.name" for o in request.outputs} | {"text_input", "raw_input_contents"}
    return details.startswith(tuple(f"{name}: " for name in names)) or details.startswith("sampling_parameters.")


def _check_refusal(request: pb.ModelInferRequest, code: str, details: str) -> None:
    event(f"refused {code}")
    assert code in ("INVALID_ARGUMENT", "NOT_FOUND"), (code, details)
    if code == "INVALID_ARGUMENT":
        assert _names_a_tensor_of(request, details), details
    else:
        assert request.model_name != MODEL, details


@settings(max_examples=150, deadline=timedelta(seconds=30), suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                 HealthCheck.too_slow])
@given(request=fuzz_requests(), streaming=st.booleans())
def test_fuzzed_tensors_are_answered_or_refused_naming_a_tensor_never_internal(
        background_cluster: Cluster, stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest,
        streaming: bool):
    if not streaming:
        try:
            response = stub.ModelInfer(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            _check_refusal(request, error.code().name, error.details())
        else:
            event("answered")
            assert set(outputs(response)) <= {"text_output", "finish_reason", "num_input_tokens", "num_output_tokens"}
    else:
        request.id = "fuzzed"
        responses = stream(stub, [request])
        assert responses and all(r.infer_response.id == "fuzzed" for r in responses)
        *running, last = responses
        assert not any(r.error_message for r in running)
        if last.error_message:
            code, _, details = last.error_message.partition(": ")
            _check_refusal(request, code, details)
        else:
            event("answered")
            assert final_flags(responses) == [False] * len(running) + [True]
            for response in responses:
                outputs(response.infer_response)
    settle(background_cluster)


def test_the_front_end_serves_after_bad_input(stub: pb_grpc.GRPCInferenceServiceStub,
                                              v1_answer: api_pb2.CompleteResponse):
    response = stub.ModelInfer(infer_request(exclude_input_in_output=True), timeout=TIMEOUT_S)
    assert outputs(response)["text_output"] == [v1_answer.choices[0].text]
