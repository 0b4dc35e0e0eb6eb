"""The tensors of Triton's vLLM backend, as the KServe v2 front end reads and writes them.

Inputs, each holding one element (shape ``[1]`` or ``[1, 1]``), in ``contents`` or ``raw_input_contents``:

- ``text_input`` (BYTES, required): the prompt, UTF-8, tokenized as is;
- ``sampling_parameters`` (BYTES): a JSON object with vLLM's ``SamplingParams`` names (``SAMPLING_NAMES``); a
  number may also be given as a string holding one, as vLLM's backend takes them; null keeps the default;
- ``stream`` (BOOL): one response per step (ModelStreamInfer only);
- ``exclude_input_in_output`` (BOOL): ``text_output`` without the prompt. By default the prompt is prepended to
  a whole answer and never to a stream's responses (which must not ask for it);
- ``return_finish_reason``, ``return_num_input_tokens``, ``return_num_output_tokens`` (BOOL): add that output.

Outputs, one element per sample (``n``) except ``num_input_tokens``: ``text_output`` (BYTES; in a stream, the text
since the previous response), ``finish_reason`` (BYTES: ``stop``, ``length``, ``abort``, or ``None`` while the
sample runs, as vLLM writes it), ``num_input_tokens`` (UINT32, the prompt's tokens; in a stream, on the final
response only, where the core reports it), ``num_output_tokens`` (UINT32, the tokens since the previous response).
A request's ``outputs``, when listed, select among those. Outputs are answered in ``raw_output_contents``.

Every problem raises ``GenerationError`` INVALID_ARGUMENT naming the tensor (``sampling_parameters.<name>`` for a
sampling parameter); the values themselves are validated by ``SamplingParams``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from radixserve.cluster.base.generation import Generation, GenerationDelta, GenerationError, Status
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.kserve.v2 import grpc_service_pb2 as pb


class TensorSpec(NamedTuple):
    """A tensor's datatype and shape as ``ModelMetadata`` advertises them (-1: one element per sample)."""

    datatype: str
    shape: tuple[int, ...]


BYTES, BOOL, UINT32 = "BYTES", "BOOL", "UINT32"
SAMPLING = "sampling_parameters"
_ONE_BOOL = TensorSpec(BOOL, (1,))
INPUTS = {"text_input": TensorSpec(BYTES, (1,)), "stream": _ONE_BOOL, SAMPLING: TensorSpec(BYTES, (1,)),
          "exclude_input_in_output": _ONE_BOOL, "return_finish_reason": _ONE_BOOL,
          "return_num_input_tokens": _ONE_BOOL, "return_num_output_tokens": _ONE_BOOL}
OUTPUTS = {"text_output": TensorSpec(BYTES, (-1,)), "finish_reason": TensorSpec(BYTES, (-1,)),
           "num_input_tokens": TensorSpec(UINT32, (1,)), "num_output_tokens": TensorSpec(UINT32, (-1,))}
_SHAPES = ((1,), (1, 1))
_CONTENTS_FIELD = {BYTES: "bytes_contents", BOOL: "bool_contents"}
_LENGTH = struct.Struct("<I")


def _number(kind: type) -> Callable[[Any], Any]:
    """A number, or a string holding one, as ``kind``; anything else as given, for SamplingParams to refuse."""
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                return value
        return value
    return convert


def _strings(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


def _as_given(value: Any) -> Any:
    return value


_SAMPLING_CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    **{name: _number(int) for name in ("max_tokens", "min_tokens", "top_k", "seed", "n")},
    **{name: _number(float) for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                         "repetition_penalty")},
    "stop": _strings, "stop_token_ids": _as_given, "ignore_eos": _as_given,
}
SAMPLING_NAMES = frozenset(_SAMPLING_CONVERSIONS)
OutputValues = dict[str, list[Any]]  # each output's elements, by name
_SAMPLING_LIST = ", ".join(sorted(SAMPLING_NAMES))


@dataclass(frozen=True)
class InferInputs:
    """A request's inputs, decoded: the prompt, its sampling, whether to stream, whether ``text_output`` starts
    with the prompt, and the outputs to answer with (in the order of ``OUTPUTS``)."""

    text: str
    params: SamplingParams
    stream: bool
    prepend_input: bool
    outputs: tuple[str, ...]


def _invalid(tensor: str, message: str) -> GenerationError:
    return GenerationError(Status.INVALID_ARGUMENT, message, tensor)


def decode_inputs(request: pb.ModelInferRequest) -> InferInputs:
    """The inputs of ``request``; see the module docstring for what is accepted."""
    elements = _elements(request)
    if "text_input" not in elements:
        raise _invalid("text_input", "is required (BYTES, shape [1]: the prompt)")
    try:
        text = elements["text_input"].decode("utf-8")
    except UnicodeDecodeError as error:
        raise _invalid("text_input", f"must be UTF-8 text: {error}") from None
    stream = elements.get("stream", False)
    exclude = elements.get("exclude_input_in_output")
    if stream and exclude is False:
        raise _invalid("exclude_input_in_output", "must be true or absent when stream is true: a stream's "
                                                  "responses carry the new text only")
    return InferInputs(text, _sampling_params(elements.get(SAMPLING)), stream, not stream and not exclude,
                       _outputs(request, elements))


def _outputs(request: pb.ModelInferRequest, elements: dict[str, Any]) -> tuple[str, ...]:
    requested = [output.name for output in request.outputs]
    for name in requested:
        if name not in OUTPUTS:
            raise _invalid(name or "outputs.name", f"unknown output; expected one of {', '.join(OUTPUTS)}")
    enabled = [name for name in OUTPUTS if name == "text_output" or elements.get(f"return_{name}", False)]
    return tuple(name for name in enabled if not requested or name in requested)


def _elements(request: pb.ModelInferRequest) -> dict[str, Any]:
    """Each input's one element by name: bytes for BYTES, bool for BOOL."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _invalid("raw_input_contents", f"must hold one entry per input ({len(request.inputs)}), got {len(raw)}")
    elements: dict[str, Any] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name or f"inputs[{i}].name"
        if tensor.name in elements:
            raise _invalid(name, "is given more than once")
        elements[tensor.name] = _element(name, tensor, raw[i] if raw else None)
    return elements


def _element(name: str, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Any:
    spec = INPUTS.get(tensor.name)
    if spec is None:
        raise _invalid(name, f"unknown input; expected one of {', '.join(INPUTS)}")
    datatype = spec.datatype
    if tensor.datatype != datatype:
        raise _invalid(name, f"datatype must be {datatype}, got {tensor.datatype!r}")
    if tuple(tensor.shape) not in _SHAPES:
        raise _invalid(name, f"shape must be [1] or [1, 1], got {list(tensor.shape)}")
    if raw is None:
        values = _from_contents(name, datatype, tensor.contents)
    elif tensor.HasField("contents"):
        raise _invalid(name, "elements are given both in contents and in raw_input_contents")
    else:
        values = _from_raw(name, datatype, raw)
    if len(values) != 1:
        raise _invalid(name, f"shape {list(tensor.shape)} holds 1 element, got {len(values)}")
    return values[0]


def _from_contents(name: str, datatype: str, contents: pb.InferTensorContents) -> Sequence[Any]:
    expected = _CONTENTS_FIELD[datatype]
    for field, _ in contents.ListFields():
        if field.name != expected:
            raise _invalid(name, f"{datatype} elements go in contents.{expected}, got contents.{field.name}")
    return list(getattr(contents, expected))


def _from_raw(name: str, datatype: str, raw: bytes) -> Sequence[Any]:
    if datatype == BOOL:
        if any(byte > 1 for byte in raw):
            raise _invalid(name, "raw BOOL elements must be bytes 0 or 1")
        return [byte == 1 for byte in raw]
    values, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise _invalid(name, "raw BYTES element cut short in its 4-byte length")
        (length,), offset = _LENGTH.unpack_from(raw, offset), offset + _LENGTH.size
        if offset + length > len(raw):
            raise _invalid(name, f"raw BYTES element of {length} bytes cut short at {len(raw) - offset}")
        values.append(raw[offset:offset + length])
        offset += length
    return values


def _sampling_params(data: bytes | None) -> SamplingParams:
    if data is None:
        return SamplingParams()
    try:
        given = json.loads(data)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _invalid(SAMPLING, f"must be a JSON object: {error}") from None
    if not isinstance(given, dict):
        raise _invalid(SAMPLING, f"must be a JSON object, got {type(given).__name__}")
    kwargs = {}
    for key, value in given.items():
        if key not in _SAMPLING_CONVERSIONS:
            raise _invalid(f"{SAMPLING}.{key}", f"unknown sampling parameter; expected one of {_SAMPLING_LIST}")
        if value is not None:
            kwargs[key] = _SAMPLING_CONVERSIONS[key](value)
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:
        raise GenerationError.invalid(error).renamed(lambda field: f"{SAMPLING}.{field}") from None


class StreamOutputs:
    """The output values of each response of a stream of ``num_samples`` samples, one delta at a time."""

    def __init__(self, num_samples: int) -> None:
        self._finish_reasons: list[str | None] = [None] * num_samples

    def of(self, delta: GenerationDelta) -> OutputValues:
        """The values of the response to ``delta`` (``num_input_tokens`` only once the usage is known)."""
        texts = [""] * len(self._finish_reasons)
        num_tokens = [0] * len(self._finish_reasons)
        for choice in delta.choices:
            texts[choice.index] += choice.text
            num_tokens[choice.index] += len(choice.token_ids)
            self._finish_reasons[choice.index] = choice.finish_reason or self._finish_reasons[choice.index]
        values: OutputValues = {"text_output": texts, "finish_reason": [str(r) for r in self._finish_reasons],
                                "num_output_tokens": num_tokens}
        if delta.usage is not None:
            values["num_input_tokens"] = [delta.usage.prompt_tokens]
        return values


def answer_outputs(generation: Generation, prefix: str) -> OutputValues:
    """The output values of a whole answer, each sample's text after ``prefix``."""
    assert generation.usage is not None, "the last delta of every answer carries its usage"
    return {"text_output": [prefix + c.text for c in generation.choices],
            "finish_reason": [str(c.finish_reason) for c in generation.choices],
            "num_input_tokens": [generation.usage.prompt_tokens],
            "num_output_tokens": [len(c.token_ids) for c in generation.choices]}


def add_outputs(response: pb.ModelInferResponse, names: Sequence[str], values: OutputValues) -> None:
    """Append the outputs ``names`` that ``values`` holds to ``response``, elements in ``raw_output_contents``."""
    for name in names:
        if name not in values:
            continue
        datatype = OUTPUTS[name].datatype
        items = values[name]
        response.outputs.add(name=name, datatype=datatype, shape=[len(items)])
        response.raw_output_contents.append(_raw(datatype, items))


def _raw(datatype: str, items: list[Any]) -> bytes:
    if datatype == UINT32:
        return struct.pack(f"<{len(items)}I", *items)
    encoded = [item.encode("utf-8") for item in items]
    return b"".join(_LENGTH.pack(len(item)) + item for item in encoded)


def tensor_metadata(specs: dict[str, TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """``ModelMetadata``'s entries for ``INPUTS`` or ``OUTPUTS``."""
    return [pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=spec.datatype, shape=spec.shape)
            for name, spec in specs.items()]
