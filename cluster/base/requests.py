"""Turning a ``GenerationRequest`` into what an engine runs: validated, templated and tokenized once.

The router core and a worker's own front ends both prepare requests here. Every problem raises a
``GenerationError`` (INVALID_ARGUMENT) naming the request field (``prompt``, ``messages[0].role``,
``token_ids``, ``stop_token_ids``, ``timeout_s``, ``request_id``): among them a prompt that yields no token (a
tokenizer may drop characters its vocabulary lacks), one UTF-8 cannot encode, and one that leaves no room in the
context, which a long text is refused for by its length before it is tokenized (``Tokenizer.min_num_tokens``).
A ``max_tokens`` beyond what the context leaves after the prompt is capped to it: the engine stops there anyway
(finish reason ``length``), and the router's load estimates stay bounded.

``Preparer`` runs ``prepare`` for an event loop, templating and tokenizing long prompts on threads of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from radixserve.cluster.base.generation import ROLES, GenerationError, GenerationRequest, Prompt, Status
from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.tokenizer import LONG_TEXT_CHARS, Tokenizer

MAX_REQUEST_ID_LEN = 128
PREPARE_THREADS = 2


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
        return _text_ids(prompt.text, "prompt", tokenizer, limits)
    if prompt.messages is not None:
        return _text_ids(_render_chat(prompt, tokenizer), "messages", tokenizer, limits)
    ids = list(prompt.token_ids or ())
    if not ids:
        raise _invalid("token_ids", "must not be empty")
    _check_ids(ids, "token_ids", limits.vocab_size)
    _check_room(len(ids), "token_ids", limits)
    return ids


def _text_ids(text: str, name: str, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    """The ids of ``text``, refused naming ``name`` before tokenizing when UTF-8 cannot encode it or its length
    shows it cannot fit the context, and after when it yields no token or does not fit."""
    try:
        at_least = tokenizer.min_num_tokens(text)
    except ValueError as error:
        raise _invalid(name, str(error).partition(": ")[2]) from None
    _check_room(at_least, name, limits, "at least ")
    ids = tokenizer.encode(text)
    if not ids:
        raise _invalid(name, "must not be empty: none of its characters is in the model's vocabulary")
    _check_room(len(ids), name, limits)
    return ids


def _check_room(num_tokens: int, name: str, limits: ModelLimits, qualifier: str = "") -> None:
    if num_tokens >= limits.max_model_len:
        raise _invalid(name, f"the prompt is {qualifier}{num_tokens} tokens, which leaves no room to generate "
                             f"within the context of {limits.max_model_len} tokens")


def _render_chat(prompt: Prompt, tokenizer: Tokenizer) -> str:
    messages = [{"role": m.role, "content": m.content} for m in prompt.messages or ()]
    if not messages:
        raise _invalid("messages", "must hold at least one message")
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise _invalid(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {message['role']!r:.40}")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt.add_generation_prompt)
    except ValueError as error:
        raise GenerationError.invalid(error) from None


def _check_ids(ids: tuple[int, ...] | list[int], name: str, vocab_size: int) -> None:
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):  # at C speed; the loop below only names the culprit
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise _invalid(name, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _prompt_chars(prompt: Prompt) -> int:
    """The characters of text the prompt holds (0 for token ids)."""
    if prompt.messages is not None:
        return sum(len(m.role) + len(m.content) for m in prompt.messages)
    return len(prompt.text or "")


class Preparer:
    """``prepare`` for an event loop: a request whose prompt holds over ``LONG_TEXT_CHARS`` characters is
    templated and tokenized on one of ``num_threads`` threads (tokenizing without the GIL), so that it delays no
    other request; a shorter one inline, where the work costs less than a hop to a thread. ``close`` when done."""

    def __init__(self, num_threads: int = PREPARE_THREADS) -> None:
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="radixserve-prepare")

    async def prepare(self, request: GenerationRequest, tokenizer: Tokenizer, limits: ModelLimits) -> PreparedRequest:
        if _prompt_chars(request.prompt) <= LONG_TEXT_CHARS:
            return prepare(request, tokenizer, limits)
        return await asyncio.get_running_loop().run_in_executor(self._executor, prepare, request, tokenizer, limits)

    def close(self) -> None:
        """Stop the threads once the preparations under way end; later ones are not run."""
        self._executor.shutdown(wait=False, cancel_futures=True)
