"""Conversions between the OpenAI schema and the generation contract, one ``ApiFormat`` per request.

``ChatFormat`` (``/v1/chat/completions``) and ``CompletionFormat`` (``/v1/completions``) turn a validated body into
a ``GenerationRequest`` and the backend's deltas into OpenAI's objects: streamed chunks (``opening``, ``chunks``,
``usage_chunk``) or the whole answer (``whole``). ``field_name`` renames the backend's neutral field names
(``prompt``, ``max_tokens``, ``logprobs``) to the names this request used (``messages``, ``max_completion_tokens``,
``top_logprobs``).

Defaults: a chat request without ``max_tokens`` / ``max_completion_tokens`` may generate up to the context (as
OpenAI's chat API); a completion request defaults to 16 tokens (as OpenAI's completions API).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from radixserve.cluster.base import generation as gen
from radixserve.cluster.base.generation import (ChoiceDelta, Generation, GenerationDelta, GenerationError,
                                                GenerationRequest, Prompt, ServedModel, Status, TokenLogprob, Usage)
from radixserve.cluster.base.openai import protocol as api
from radixserve.cluster.base.openai.errors import from_validation_error
from radixserve.cluster.base.sampling_params import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16
# Sampling options passed to SamplingParams under their own name when given.
_PASSED = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
           "repetition_penalty", "min_tokens", "ignore_eos")

Body = TypeVar("Body", bound=api.SamplingRequest)


def _invalid(field: str, message: str) -> GenerationError:
    return GenerationError(Status.INVALID_ARGUMENT, message, field)


def usage_info(usage: Usage) -> api.UsageInfo:
    return api.UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                         total_tokens=usage.prompt_tokens + usage.completion_tokens,
                         prompt_tokens_details=api.PromptTokensDetails(cached_tokens=usage.cached_tokens))


class ApiFormat(ABC, Generic[Body]):
    """One request of an OpenAI endpoint; see the module docstring. ``method`` labels it in the metrics."""

    method: ClassVar[str]
    schema: ClassVar[type[api.SamplingRequest]]
    id_prefix: ClassVar[str]

    def __init__(self, body: Body, served: ServedModel) -> None:
        self.body = body
        self.served = served
        self.created = int(time.time())

    @classmethod
    def parse(cls, data: bytes) -> Body:
        """The validated body; ``ApiError`` 400 naming the field when it is not JSON or breaks the schema."""
        try:
            return cls.schema.model_validate_json(data)  # type: ignore[return-value]
        except ValidationError as error:
            raise from_validation_error(error) from None

    @property
    def streaming(self) -> bool:
        return bool(self.body.stream)

    def generation_request(self) -> GenerationRequest:
        """The neutral request; ``GenerationError`` (neutral field names) for bad input."""
        body = self.body
        if body.stream_options is not None and not body.stream:
            raise _invalid("stream_options", "is only allowed when stream is true")
        given = {name: getattr(body, name) for name in _PASSED if getattr(body, name) is not None}
        try:
            params = SamplingParams(**given, max_tokens=self._max_tokens(), logprobs=self._logprobs(),
                                    stop=body.stop, stop_token_ids=tuple(body.stop_token_ids or ()))
        except ValueError as error:
            raise GenerationError.invalid(error) from None
        return GenerationRequest(self._prompt(), params)

    def field_name(self, name: str) -> str:
        """The name this request used for the backend's field ``name``."""
        return name

    def usage_chunk(self, request_id: str, usage: Usage) -> BaseModel:
        """The last streamed chunk under ``stream_options.include_usage``: no choices, the usage."""
        return self._chunk(request_id, [], usage_info(usage))

    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    def opening(self, request_id: str) -> list[BaseModel]:
        """Chunks streamed before the first delta's."""
        return []

    def chunks(self, delta: GenerationDelta) -> list[BaseModel]:
        """One chunk for each choice that moved in ``delta`` (its text, logprobs or finish)."""
        return [self._chunk(delta.request_id, [self._chunk_choice(choice)])
                for choice in delta.choices if choice.text or choice.logprobs or choice.finish_reason]

    def _response_id(self, request_id: str) -> str:
        return f"{self.id_prefix}{request_id}"

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """A token as logprobs show it: its text (U+FFFD for part of a character) and its bytes."""
        raw = self.served.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    @abstractmethod
    def _prompt(self) -> Prompt: ...

    @abstractmethod
    def _max_tokens(self) -> int: ...

    @abstractmethod
    def _logprobs(self) -> int | None: ...

    @abstractmethod
    def _chunk(self, request_id: str, choices: list[BaseModel], usage: api.UsageInfo | None = None) -> BaseModel: ...

    @abstractmethod
    def _chunk_choice(self, choice: ChoiceDelta) -> BaseModel: ...

    @abstractmethod
    def whole(self, generation: Generation) -> BaseModel:
        """The non-streaming answer."""


class ChatFormat(ApiFormat[api.ChatCompletionRequest]):
    method = "chat.completions"
    schema = api.ChatCompletionRequest
    id_prefix = "chatcmpl-"

    def field_name(self, name: str) -> str:
        if name in ("prompt", "token_ids"):
            return "messages"
        if name == "max_tokens" and self.body.max_completion_tokens is not None:
            return "max_completion_tokens"
        return "top_logprobs" if name == "logprobs" else name

    def _prompt(self) -> Prompt:
        return Prompt(messages=tuple(gen.ChatMessage(m.role, m.content) for m in self.body.messages))

    def _max_tokens(self) -> int:
        body = self.body
        if body.max_completion_tokens is not None:
            return body.max_completion_tokens
        return body.max_tokens if body.max_tokens is not None else self.served.max_model_len

    def _logprobs(self) -> int | None:
        body = self.body
        if body.top_logprobs is not None and not body.logprobs:
            raise _invalid("logprobs", "top_logprobs requires logprobs to be true")
        return (body.top_logprobs or 0) if body.logprobs else None

    def opening(self, request_id: str) -> list[BaseModel]:
        """The assistant's role, once per choice."""
        return [self._chunk(request_id, [api.ChatChunkChoice(index=i, delta=api.ChoiceDeltaMessage(
            role="assistant", content=""))]) for i in range(self.body.n or 1)]

    def _chunk(self, request_id: str, choices: list[BaseModel],
               usage: api.UsageInfo | None = None) -> api.ChatCompletionChunk:
        return api.ChatCompletionChunk(id=self._response_id(request_id), created=self.created,
                                       model=self.served.name, choices=choices, usage=usage)

    def _chunk_choice(self, choice: ChoiceDelta) -> api.ChatChunkChoice:
        return api.ChatChunkChoice(index=choice.index, delta=api.ChoiceDeltaMessage(content=choice.text),
                                   logprobs=self._chat_logprobs(choice.logprobs), finish_reason=choice.finish_reason)

    def whole(self, generation: Generation) -> api.ChatCompletion:
        choices = [api.ChatChoice(index=c.index, message=api.AssistantMessage(content=c.text),
                                  logprobs=self._chat_logprobs(c.logprobs), finish_reason=c.finish_reason)
                   for c in generation.choices]
        usage = usage_info(generation.usage) if generation.usage is not None else None
        return api.ChatCompletion(id=self._response_id(generation.request_id), created=self.created,
                                  model=self.served.name, choices=choices, usage=usage)

    def _chat_logprobs(self, logprobs: tuple[TokenLogprob, ...]) -> api.ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        content = []
        for lp in logprobs:
            token, raw = self._token(lp.token_id)
            top = [self._top_logprob(token_id, value) for token_id, value in lp.top]
            content.append(api.ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=raw, top_logprobs=top))
        return api.ChatLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> api.TopLogprob:
        token, raw = self._token(token_id)
        return api.TopLogprob(token=token, logprob=logprob, bytes=raw)


class CompletionFormat(ApiFormat[api.CompletionRequest]):
    method = "completions"
    schema = api.CompletionRequest
    id_prefix = "cmpl-"

    def __init__(self, body: api.CompletionRequest, served: ServedModel) -> None:
        super().__init__(body, served)
        self._text_offsets: dict[int, int] = {}  # per choice: characters of text its logprobs covered so far

    def field_name(self, name: str) -> str:
        return "prompt" if name == "token_ids" else name

    def _prompt(self) -> Prompt:
        prompt = self.body.prompt
        return Prompt(text=prompt) if isinstance(prompt, str) else Prompt(token_ids=prompt)

    def _max_tokens(self) -> int:
        max_tokens = self.body.max_tokens
        return max_tokens if max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS

    def _logprobs(self) -> int | None:
        return self.body.logprobs

    def _chunk(self, request_id: str, choices: list[BaseModel], usage: api.UsageInfo | None = None) -> api.Completion:
        return api.Completion(id=self._response_id(request_id), created=self.created, model=self.served.name,
                              choices=choices, usage=usage)

    def _chunk_choice(self, choice: ChoiceDelta) -> api.CompletionChoice:
        return api.CompletionChoice(index=choice.index, text=choice.text,
                                    logprobs=self._completion_logprobs(choice.index, choice.logprobs),
                                    finish_reason=choice.finish_reason)

    def whole(self, generation: Generation) -> api.Completion:
        choices = [api.CompletionChoice(index=c.index, text=c.text,
                                        logprobs=self._completion_logprobs(c.index, c.logprobs),
                                        finish_reason=c.finish_reason) for c in generation.choices]
        usage = usage_info(generation.usage) if generation.usage is not None else None
        return self._chunk(generation.request_id, choices, usage)

    def _completion_logprobs(self, index: int, logprobs: tuple[TokenLogprob, ...]) -> api.CompletionLogprobs | None:
        """The legacy shape: parallel lists, ``top_logprobs`` mapping token text to logprob (the chosen token
        included), ``text_offset`` where each token's text starts in the choice's text."""
        if self.body.logprobs is None:
            return None
        tokens, offsets, tops = [], [], []
        offset = self._text_offsets.get(index, 0)
        for lp in logprobs:
            token = self._token(lp.token_id)[0]
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            top = {self._token(t)[0]: value for t, value in lp.top}
            top.setdefault(token, lp.logprob)
            tops.append(top)
        self._text_offsets[index] = offset
        return api.CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs],
                                      top_logprobs=tops, text_offset=offsets)

