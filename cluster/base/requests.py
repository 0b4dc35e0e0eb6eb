"""Turning a ``GenerationRequest`` into what an engine runs: validated, templated and tokenized once.

The router core and a worker's own front ends both prepare requests here. Every problem raises a
``GenerationError`` (INVALID_ARGUMENT) naming the request field (``prompt``, ``messages[0].role``,
``token_ids``, ``stop_token_ids``, ``timeout_s``, ``request_id``). A ``max_tokens`` beyond what the context
leaves after the prompt is capped to it: the engine stops there anyway (finish reason ``length``), and the
router's load estimates stay bounded.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass

from radixserve.cluster.base.generation import GenerationError, GenerationRequest, Prompt, Status
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.tokenizer import Tokenizer

MAX_REQUEST_ID_LEN = 128


@dataclass(frozen=True)
class ModelLimits:
    """What the model accepts: ids below ``vocab_size``, prompts shorter than ``max_model_len``."""

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


def prepare(request: GenerationRequest, tokenizer: Tokenizer, limits: ModelLimits) -> PreparedRequest:
    """Validate ``request`` and tokenize its prompt; see the module docstring for errors."""
    request_id = _request_id(request.request_id)
    _check_ids(request.params.stop_token_ids, "stop_token_ids", limits.vocab_size)
    token_ids = _prompt_ids(request.prompt, tokenizer, limits)
    params = _capped(request.params, limits.max_model_len - len(token_ids))
    timeout_s = request.timeout_s
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise _invalid("timeout_s", f"must be a finite number > 0, got {timeout_s!r}")
    return PreparedRequest(request_id, tuple(token_ids), params, timeout_s)


def _invalid(field: str, message: str) -> GenerationError:
    return GenerationError(Status.INVALID_ARGUMENT, message, field)


def _capped(params: SamplingParams, room: int) -> SamplingParams:
    """``params`` with at most ``room`` tokens to generate per sample."""
    if params.max_tokens <= room:
        return params
    return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))


def _request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise _invalid("request_id", f"must be at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")
    if request_id and not request_id.isprintable():
        raise _invalid("request_id", "must hold printable characters only")
    return request_id or uuid.uuid4().hex


def _prompt_ids(prompt: Prompt, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    given = [name for name in ("text", "messages", "token_ids") if getattr(prompt, name) is not None]
    if len(given) != 1:
        raise _invalid("prompt", "set exactly one of text, messages or token_ids")
    if prompt.text is not None:
        if not prompt.text:
            raise _invalid("prompt", "must not be empty")
        ids, name = tokenizer.encode(prompt.text), "prompt"
    elif prompt.messages is not None:
        ids, name = tokenizer.encode(_render_chat(prompt, tokenizer)), "messages"
    else:
        ids, name = list(prompt.token_ids or ()), "token_ids"
        if not ids:
            raise _invalid("token_ids", "must not be empty")
        _check_ids(ids, "token_ids", limits.vocab_size)
    if len(ids) >= limits.max_model_len:
        raise _invalid(name, f"the prompt is {len(ids)} tokens, which leaves no room to generate within the "
                             f"context of {limits.max_model_len} tokens")
    return ids


def _render_chat(prompt: Prompt, tokenizer: Tokenizer) -> str:
    messages = [{"role": m.role, "content": m.content} for m in prompt.messages or ()]
    if not messages:
        raise _invalid("messages", "must hold at least one message")
    for i, message in enumerate(messages):
        if not message["role"]:
            raise _invalid(f"messages[{i}].role", "must not be empty")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt.add_generation_prompt)
    except ValueError as error:
        raise GenerationError.invalid(error) from None


def _check_ids(ids: tuple[int, ...] | list[int], name: str, vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise _invalid(name, f"token id {bad} is outside the vocabulary [0, {vocab_size})")
