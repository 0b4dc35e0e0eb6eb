"""Drive a KServe v2 gRPC server with the real, unchanged ``tritonclient.grpc``; print what it saw as JSON.

Run as ``python tritonclient_calls.py ADDRESS MODEL PROMPT MAX_TOKENS`` in a process of its own: tritonclient
registers the ``inference.*`` messages in protobuf's default pool, as radixserve's own stubs do, so the two cannot
be imported in one process.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0


def _bool_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def _bytes_input(name: str, value: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=np.object_))
    return tensor


def vllm_inputs(prompt: str, sampling: dict[str, Any], stream: bool | None = None,
                exclude_input: bool | None = True) -> list[grpcclient.InferInput]:
    """The tensors Triton's vLLM backend takes, every additional output asked for."""
    inputs = [_bytes_input("text_input", prompt), _bytes_input("sampling_parameters", json.dumps(sampling))]
    if stream is not None:
        inputs.append(_bool_input("stream", stream))
    if exclude_input is not None:
        inputs.append(_bool_input("exclude_input_in_output", exclude_input))
    inputs += [_bool_input(f"return_{name}", True) for name in ("finish_reason", "num_input_tokens",
                                                                 "num_output_tokens")]
    return inputs


def outputs_of(result: grpcclient.InferResult) -> dict[str, Any]:
    """Each output as plain JSON values (strings decoded), and the response's id and final flag."""
    response = result.get_response()
    seen: dict[str, Any] = {"id": response.id}
    if "triton_final_response" in response.parameters:
        seen["final"] = response.parameters["triton_final_response"].bool_param
    for output in response.outputs:
        array = result.as_numpy(output.name)
        seen[output.name] = [v.decode("utf-8") if isinstance(v, bytes) else int(v) for v in array.reshape(-1)]
    return seen


def refusal(call: Any) -> str:
    """The status a call failed with (``"OK"`` if it did not)."""
    try:
        call()
    except InferenceServerException as error:
        return f"{error.status()}: {error.message()}"
    return "OK"


class Stream:
    """One ``start_stream`` stream; ``send`` waits for the request's final response (or its error)."""

    def __init__(self, client: grpcclient.InferenceServerClient, model: str) -> None:
        self._client, self._model = client, model
        self._received: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self._received.put((result, error)))

    def send(self, inputs: list[grpcclient.InferInput], request_id: str) -> list[dict[str, Any]]:
        self._client.async_stream_infer(self._model, inputs, request_id=request_id)
        responses: list[dict[str, Any]] = []
        while True:
            result, error = self._received.get(timeout=TIMEOUT_S)
            if error is not None:
                return [*responses, {"error": str(error)}]
            responses.append(outputs_of(result))
            if responses[-1].get("final"):
                return responses


def main(address: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    greedy = {"max_tokens": max_tokens, "temperature": 0}
    with grpcclient.InferenceServerClient(address) as client:
        seen: dict[str, Any] = {
            "live": client.is_server_live(), "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model),
            "unknown_model_ready": refusal(lambda: client.is_model_ready("no-such-model")),
            "server_metadata": client.get_server_metadata(as_json=True),
            "model_metadata": client.get_model_metadata(model, as_json=True),
            "infer": outputs_of(client.infer(model, vllm_inputs(prompt, greedy), request_id="u1",
                                             client_timeout=TIMEOUT_S)),
            "infer_with_prompt": outputs_of(client.infer(model, vllm_inputs(prompt, greedy, exclude_input=None),
                                                         client_timeout=TIMEOUT_S)),
            "infer_string_numbers": outputs_of(client.infer(
                model, vllm_inputs(prompt, {k: str(v) for k, v in greedy.items()}),
                outputs=[grpcclient.InferRequestedOutput("text_output")], client_timeout=TIMEOUT_S)),
            "infer_unknown_model": refusal(lambda: client.infer("no-such-model", vllm_inputs(prompt, greedy))),
            "infer_streaming": refusal(lambda: client.infer(model, vllm_inputs(prompt, greedy, stream=True))),
        }
        stream = Stream(client, model)
        seen["stream_true"] = stream.send(vllm_inputs(prompt, greedy, stream=True, exclude_input=None), "s1")
        seen["stream_false"] = stream.send(vllm_inputs(prompt, greedy, stream=False), "s2")
        seen["stream_bad"] = stream.send(vllm_inputs(prompt, {**greedy, "temperature": -1}, stream=True), "s3")
        seen["stream_after_bad"] = stream.send(vllm_inputs(prompt, greedy, stream=True), "s4")
        client.stop_stream()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
