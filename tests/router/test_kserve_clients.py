"""Real clients others wrote against the router's gRPC port, unchanged: ``tritonclient.grpc`` (in a process of its
own, see ``tritonclient_calls.py``) and the ``grpcurl`` binary through server reflection."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from test_router_service import TIMEOUT_S, Cluster, background_cluster, checkpoint, raw_channel  # noqa: F401

from radixserve.kserve.v2 import grpc_service_pb2
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

MODEL = "tiny"
PROMPT = "Hello there"
MAX_TOKENS = 4
TRITONCLIENT_CALLS = Path(__file__).parents[1] / "fixtures" / "tritonclient_calls.py"
GRPCURL = Path(sys.executable).with_name("grpcurl")


@pytest.fixture(scope="module")
def v1_choice(raw_channel: grpc.Channel) -> tuple[api_pb2.Completion, api_pb2.Usage]:
    """What radixserve.v1 answers for ``PROMPT``, greedy, ``MAX_TOKENS`` tokens."""
    request = api_pb2.GenerateRequest(text=PROMPT, sampling=types_pb2.SamplingOptions(max_tokens=MAX_TOKENS,
                                                                                      temperature=0))
    answer = api_pb2_grpc.GenerationStub(raw_channel).Complete(request, timeout=TIMEOUT_S)
    return answer.choices[0], answer.usage


@pytest.fixture(scope="module")
def tritonclient_saw(background_cluster: Cluster) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(TRITONCLIENT_CALLS), background_cluster.router.address, MODEL, PROMPT,
                           str(MAX_TOKENS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _messages(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of ``proto`` by full name, nested ones included."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}
    pending = [(f".{proto.package}", message) for message in proto.message_type]
    while pending:
        scope, message = pending.pop()
        found[f"{scope}.{message.name}"] = message
        pending += [(f"{scope}.{message.name}", nested) for nested in message.nested_type]
    return found


def _wire_view(message: descriptor_pb2.DescriptorProto) -> set[tuple[Any, ...]]:
    """What decides a message's bytes and its JSON: each field's number, name, type, label and message type."""
    return {(f.number, f.name, f.type, f.label, f.type_name, f.HasField("oneof_index")) for f in message.field}


def test_our_protocol_is_tritonclients_for_every_message_and_call_we_keep():
    done = subprocess.run([sys.executable, str(TRITONCLIENT_CALLS), "descriptor"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(done.stdout))
    ours = descriptor_pb2.FileDescriptorProto()
    grpc_service_pb2.DESCRIPTOR.CopyToProto(ours)
    assert ours.package == theirs.package == "inference"
    their_messages = _messages(theirs)
    for name, message in _messages(ours).items():
        assert _wire_view(message) == _wire_view(their_messages[name]), name
    [our_service], [their_service] = ours.service, theirs.service
    assert our_service.name == their_service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in their_service.method}
    for method in our_service.method:
        theirs_ = their_methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == (
            theirs_.input_type, theirs_.output_type, theirs_.client_streaming, theirs_.server_streaming)


def test_tritonclient_sees_a_live_ready_server_and_the_model_schema(tritonclient_saw: dict[str, Any]):
    assert tritonclient_saw["live"] and tritonclient_saw["ready"] and tritonclient_saw["model_ready"]
    assert tritonclient_saw["unknown_model_ready"].startswith("StatusCode.NOT_FOUND")
    assert tritonclient_saw["server_metadata"]["name"] == "radixserve"
    metadata = tritonclient_saw["model_metadata"]
    assert (metadata["name"], metadata["versions"]) == (MODEL, ["1"])
    assert {t["name"]: t["datatype"] for t in metadata["inputs"]}["text_input"] == "BYTES"
    assert {t["name"]: t["datatype"] for t in metadata["outputs"]} == {
        "text_output": "BYTES", "finish_reason": "BYTES", "num_input_tokens": "UINT32", "num_output_tokens": "UINT32"}


def test_tritonclient_infer_answers_what_the_v1_api_answers(tritonclient_saw: dict[str, Any],
                                                            v1_choice: tuple[api_pb2.Completion, api_pb2.Usage]):
    choice, usage = v1_choice
    assert tritonclient_saw["infer"] == {"id": "u1", "text_output": [choice.text],
                                         "finish_reason": [choice.finish_reason],
                                         "num_input_tokens": [usage.prompt_tokens],
                                         "num_output_tokens": [len(choice.token_ids)]}
    assert tritonclient_saw["infer_with_prompt"]["text_output"] == [PROMPT + choice.text]
    assert tritonclient_saw["infer_string_numbers"] == {"id": "", "text_output": [choice.text]}
    assert tritonclient_saw["infer_unknown_model"].startswith("StatusCode.NOT_FOUND")
    assert tritonclient_saw["infer_streaming"].startswith("StatusCode.INVALID_ARGUMENT: stream: ")


def test_tritonclient_stream_infer_streams_deltas_and_flags_the_final_response(
        tritonclient_saw: dict[str, Any], v1_choice: tuple[api_pb2.Completion, api_pb2.Usage]):
    choice, usage = v1_choice
    for key in ("stream_true", "stream_after_bad"):
        responses = tritonclient_saw[key]
        assert [r["final"] for r in responses] == [False] * (len(responses) - 1) + [True]
        assert "".join(r["text_output"][0] for r in responses) == choice.text
        assert sum(r["num_output_tokens"][0] for r in responses) == len(choice.token_ids)
        assert responses[-1]["finish_reason"] == [choice.finish_reason]
        assert responses[-1]["num_input_tokens"] == [usage.prompt_tokens]
    [whole] = tritonclient_saw["stream_false"]
    assert whole == {"id": "s2", "final": True, "text_output": [choice.text], "finish_reason": [choice.finish_reason],
                     "num_input_tokens": [usage.prompt_tokens], "num_output_tokens": [len(choice.token_ids)]}
    [refusal] = tritonclient_saw["stream_bad"]
    assert refusal["error"].startswith("INVALID_ARGUMENT: sampling_parameters.temperature: "), refusal


# ---- grpcurl --------------------------------------------------------------------------------------------------

def grpcurl(address: str, *args: str, data: dict[str, Any] | None = None) -> str:
    command = [str(GRPCURL), "-plaintext", "-max-time", str(TIMEOUT_S)]
    if data is not None:
        command += ["-d", json.dumps(data)]
    done = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_lists_and_describes_both_apis_through_reflection(background_cluster: Cluster):
    address = background_cluster.router.address
    services = grpcurl(address, "list").split()
    assert {"radixserve.v1.Generation", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(services)
    described = grpcurl(address, "describe", "inference.GRPCInferenceService")
    assert ("rpc ModelStreamInfer ( stream .inference.ModelInferRequest ) returns "
            "( stream .inference.ModelStreamInferResponse );") in described
    assert "bytes_contents" in grpcurl(address, "describe", "inference.InferTensorContents")


def test_grpcurl_calls_complete_server_live_and_model_infer_with_json(
        background_cluster: Cluster, v1_choice: tuple[api_pb2.Completion, api_pb2.Usage]):
    address = background_cluster.router.address
    choice, _ = v1_choice
    completed = json.loads(grpcurl(address, "radixserve.v1.Generation/Complete", data={
        "text": PROMPT, "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0}}))
    assert completed["choices"][0]["text"] == choice.text
    assert json.loads(grpcurl(address, "inference.GRPCInferenceService/ServerLive", data={})) == {"live": True}
    sampling = json.dumps({"max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    inferred = json.loads(grpcurl(address, "inference.GRPCInferenceService/ModelInfer", data={
        "model_name": MODEL, "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1],
             "contents": {"bytes_contents": [base64.b64encode(PROMPT.encode()).decode()]}},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
             "contents": {"bytes_contents": [base64.b64encode(sampling).decode()]}},
            {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1],
             "contents": {"bool_contents": [True]}}]}))
    assert inferred["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": ["1"]}]
    raw = base64.b64decode(inferred["raw_output_contents"][0])
    assert struct.unpack_from("<I", raw)[0] == len(raw) - 4 and raw[4:].decode() == choice.text
