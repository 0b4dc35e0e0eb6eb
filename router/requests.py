"""Turning a public ``GenerateRequest`` into what a worker runs: validated, templated and tokenized once.

Every problem raises ValueError whose message starts with the request field's path (``chat.messages[0].role``,
``sampling.top_p``, ``token_ids``), which the router answers with INVALID_ARGUMENT. A ``max_tokens`` beyond what
the context leaves after the prompt is capped to it: the engine stops there anyway (finish reason ``length``),
and the router's load estimates stay bounded.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass

from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.cluster.base.wire import sampling_params_from_proto
from radixserve.v1 import api_pb2

MAX_REQUEST_ID_LEN = 128


@dataclass(frozen=True)
class ModelLimits:
    """What the workers' model accepts: ids below ``vocab_size``, prompts shorter than ``max_model_len``."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: ``params`` are the sampling options as given, but ``max_tokens`` (and ``min_tokens``
    with it) at most the context's room after the prompt."""

    request_id: str
    token_ids: tuple[int, ...]
    params: SamplingParams
    timeout_s: float | None


def prepare(request: api_pb2.GenerateRequest, tokenizer: Tokenizer, limits: ModelLimits) -> PreparedRequest:
    """Validate ``request`` and tokenize its prompt; see the module docstring for errors."""
    request_id = _request_id(request.request_id)
    params = sampling_params_from_proto(request.sampling)
    _check_ids(params.stop_token_ids, "sampling.stop_token_ids", limits.vocab_size)
    token_ids = _prompt_ids(request, tokenizer, limits)
    params = _capped(params, limits.max_model_len - len(token_ids))
    timeout_s = None
    if request.HasField("timeout_seconds"):
        timeout_s = request.timeout_seconds
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_seconds: must be a finite number > 0, got {timeout_s!r}")
    return PreparedRequest(request_id, tuple(token_ids), params, timeout_s)


def _capped(params: SamplingParams, room: int) -> SamplingParams:
    """``params`` with at most ``room`` tokens to generate per sample."""
    if params.max_tokens <= room:
        return params
    return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))


def _request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise ValueError(f"request_id: must be at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")
    if request_id and not request_id.isprintable():
        raise ValueError("request_id: must hold printable characters only")
    return request_id or uuid.uuid4().hex


def _prompt_ids(request: api_pb2.GenerateRequest, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt: set one of text, chat or token_ids")
    if kind == "text":
        if not request.text:
            raise ValueError("text: must not be empty")
        ids = tokenizer.encode(request.text)
    elif kind == "chat":
        ids = tokenizer.encode(_render_chat(request.chat, tokenizer))
    else:
        ids = list(request.token_ids.ids)
        if not ids:
            raise ValueError("token_ids: must not be empty")
        _check_ids(ids, "token_ids", limits.vocab_size)
    if len(ids) >= limits.max_model_len:
        raise ValueError(f"{kind}: the prompt is {len(ids)} tokens, which leaves no room to generate within the "
                         f"context of {limits.max_model_len} tokens")
    return ids


def _render_chat(chat: api_pb2.Chat, tokenizer: Tokenizer) -> str:
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    for i, message in enumerate(messages):
        if not message["role"]:
            raise ValueError(f"chat.messages[{i}].role: must not be empty")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as error:
        raise ValueError(f"chat.{error}") from None


def _check_ids(ids: tuple[int, ...] | list[int], name: str, vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
