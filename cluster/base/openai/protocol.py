"""The parts of the OpenAI API schema radixserve serves, as pydantic models.

Requests are validated strictly, as OpenAI's own API does: JSON types must match (no ``"5"`` for 5, no ``1`` for
``true``), and a field the schema does not know is refused (an *unrecognized request argument*), so a typo never
passes silently. Integers must fit int64 (what travels to a worker). A few fields of OpenAI's schema that
radixserve does not implement (``logit_bias``, ``tools``, ``tool_choice``, ``response_format``; ``echo``,
``best_of``, ``suffix`` of completions), and the SGLang fields vllm-router adds to every request it forwards
(``no_stop_trim``, ``skip_special_tokens``, ``return_hidden_states``; in chat also ``continue_final_message``,
``separate_reasoning``, ``stream_reasoning``, ``include_reasoning``), are accepted at their neutral value only, so
clients and gateways that send defaults explicitly still work; ``user`` and a message's ``name`` are accepted and
ignored. vLLM's and SGLang's sampling extras are accepted (``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``). Ranges of sampling options are checked where the options are
built (``SamplingParams``).

Responses follow OpenAI's objects; ``usage.prompt_tokens_details.cached_tokens`` counts the prompt tokens served
from the prefix cache.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator

from radixserve.cluster.base.generation import ROLES
from radixserve.cluster.base.sampling_params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES

Int64 = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ValueError("must be a string or a list of strings")


def _content(value: object) -> str:
    """A message's content: a string, null, or a list of text parts (joined by newlines)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                and part.keys() == {"type", "text"}):
            raise ValueError(f"part {i}: only {{\"type\": \"text\", \"text\": <string>}} parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(value: object) -> str | tuple[int, ...]:
    """One prompt: a string or a list of token ids; a list holding exactly one of those is unwrapped."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and set(map(type, value)) == {int}:  # bool is not int here
        return tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ValueError("one prompt per request is served; send several requests")
    raise ValueError("must be a string or a non-empty list of token ids")


# What the schema shows of the fields validated by a function: the JSON each accepts (the OpenAPI document).
_StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
_StopJson = _StopString | Annotated[list[_StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None
_TextPart = dict[Literal["type", "text"], str]
Stop = Annotated[tuple[str, ...], PlainValidator(_stop, json_schema_input_type=_StopJson)]
Content = Annotated[str, PlainValidator(_content, json_schema_input_type=str | list[_TextPart] | None)]
PromptInput = Annotated[str | tuple[int, ...], PlainValidator(
    _prompt, json_schema_input_type=str | Annotated[list[Int64], Field(min_length=1)])]
Role = Annotated[str, Field(json_schema_extra={"enum": list(ROLES)})]  # checked where the prompt is prepared


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatMessage(_Strict):
    role: Role
    content: Content = ""
    name: str | None = None  # a participant's name: accepted, not rendered


def _neutral(value: object, allowed: tuple[object, ...]) -> bool:
    return any(type(value) is type(a) and value == a for a in allowed)


class SamplingRequest(_Strict):
    """What chat and completion requests share: the model, streaming and the sampling options.

    ``NEUTRAL`` maps each accepted-but-unimplemented field to the values it may take.
    """

    NEUTRAL: ClassVar[dict[str, tuple[object, ...]]] = {
        "logit_bias": (None, {}), "no_stop_trim": (None, False), "skip_special_tokens": (None, True),
        "return_hidden_states": (None, False)}

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Int64 | None = None
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    stop: Stop = ()
    user: str | None = None  # accepted, ignored
    logit_bias: Any = None
    # vLLM's and SGLang's extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int64] | None = None
    # SGLang's, at their defaults only: vllm-router adds them to every request it forwards
    no_stop_trim: Any = None
    skip_special_tokens: Any = None
    return_hidden_states: Any = None

    @field_validator("logit_bias", "tools", "tool_choice", "response_format", "echo", "best_of", "suffix",
                     "no_stop_trim", "skip_special_tokens", "return_hidden_states", "continue_final_message",
                     "separate_reasoning", "stream_reasoning", "include_reasoning", check_fields=False)
    @classmethod
    def _only_neutral(cls, value: object, info: ValidationInfo) -> object:
        allowed = cls.NEUTRAL[info.field_name or ""]
        if not _neutral(value, allowed):
            shown = " or ".join("null" if a is None else repr(a) for a in allowed)
            raise ValueError(f"is not supported by this server; omit it or send {shown}")
        return value


class ChatCompletionRequest(SamplingRequest):
    NEUTRAL: ClassVar[dict[str, tuple[object, ...]]] = {
        **SamplingRequest.NEUTRAL, "tools": (None, []), "tool_choice": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}), "continue_final_message": (None, False),
        "separate_reasoning": (None, True), "stream_reasoning": (None, True), "include_reasoning": (None, True)}

    messages: list[ChatMessage]
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = None
    top_logprobs: Int64 | None = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    continue_final_message: Any = None  # vllm-router's additions to chat, at their defaults only
    separate_reasoning: Any = None
    stream_reasoning: Any = None
    include_reasoning: Any = None


class CompletionRequest(SamplingRequest):
    NEUTRAL: ClassVar[dict[str, tuple[object, ...]]] = {
        **SamplingRequest.NEUTRAL, "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}

    prompt: PromptInput
    logprobs: Int64 | None = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


# ---- responses ----------------------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None
    system_fingerprint: str | None = None


class ChoiceDeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    """A whole completion (``object`` ``text_completion``), also each streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "radixserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo
