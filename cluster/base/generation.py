"""The transport-neutral generation contract every front end adapts: one request type in, a stream of deltas out.

A *backend* (``GenerationBackend``) is what serves generation: the router core (routing to workers) or one
worker's engine. A *front end* (radixserve.v1 gRPC, OpenAI HTTP, KServe v2 gRPC) converts its protocol's request
into a ``GenerationRequest``, iterates the backend's ``generate`` stream of ``GenerationDelta`` and converts each
back; a non-streaming answer is the fold of that stream (``fold``). Front ends only convert formats and map
``Status`` to their own codes; they never carry transport objects into a backend.

Contract of ``generate``:

- it raises ``GenerationError`` (a ``Status`` and, for bad input, the field it names) before its first delta
  when the request is refused, and may raise it later when serving fails part way;
- closing the stream (``aclose``, which a front end does when its client disconnects or cancels) ends the
  request wherever it runs and frees its KV pages;
- the last delta carries ``usage``; every accepted request ends with that delta or a ``GenerationError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.cluster.base.tokenizer import Tokenizer


class Status(StrEnum):
    """Why a request ended without its tokens. The names are gRPC's status codes (the metrics label them so);
    HTTP front ends map them with ``http_status``."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"      # bad input; ``field`` names it
    NOT_FOUND = "NOT_FOUND"                    # an unknown model or resource
    UNAUTHENTICATED = "UNAUTHENTICATED"        # no or a wrong API key
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # every queue full, or a message too large
    UNAVAILABLE = "UNAVAILABLE"                # no worker up, draining, or a worker failed mid-stream
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"    # the request's timeout passed
    CANCELLED = "CANCELLED"                    # the client went away
    ALREADY_EXISTS = "ALREADY_EXISTS"          # a request id already in flight
    INTERNAL = "INTERNAL"                      # the request's own work failed


_HTTP_STATUS = {Status.INVALID_ARGUMENT: 400, Status.NOT_FOUND: 404, Status.UNAUTHENTICATED: 401,
                Status.RESOURCE_EXHAUSTED: 429, Status.UNAVAILABLE: 503, Status.DEADLINE_EXCEEDED: 504,
                Status.CANCELLED: 499, Status.ALREADY_EXISTS: 409, Status.INTERNAL: 500}


def http_status(status: Status) -> int:
    """The HTTP status code an HTTP front end answers ``status`` with."""
    return _HTTP_STATUS[status]


class GenerationError(Exception):
    """A request ended with ``status``; ``field`` is the request field at fault (for INVALID_ARGUMENT), in the
    backend's neutral names (``prompt``, ``messages[0].role``, ``token_ids``, ``max_tokens``, ``timeout_s``,
    ``request_id``, ``stop_token_ids``), which a front end may rename to its own schema's.

    ``str(error)`` is ``"<field>: <message>"`` when a field is named, else the message.
    """

    def __init__(self, status: Status, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.message = message
        self.field = field

    @classmethod
    def invalid(cls, error: ValueError) -> GenerationError:
        """INVALID_ARGUMENT from a ``ValueError("<field>: <message>")`` as configs and params raise them."""
        name, sep, message = str(error).partition(": ")
        if not sep or " " in name:
            return cls(Status.INVALID_ARGUMENT, str(error))
        return cls(Status.INVALID_ARGUMENT, message, name)

    def renamed(self, rename: Callable[[str], str]) -> GenerationError:
        """The same error with its field renamed by ``rename`` (a front end's schema names)."""
        if self.field is None:
            return self
        return GenerationError(self.status, self.message, rename(self.field))


# The roles a chat message may have (OpenAI's).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation; ``role`` is one of ``ROLES``."""

    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Exactly one of ``text`` (tokenized as is), ``messages`` (rendered with the model's chat template, with the
    assistant's turn opened when ``add_generation_prompt``) or ``token_ids`` (already tokenized)."""

    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    """One request as every backend takes it. ``request_id`` empty: the backend makes one. ``timeout_s``: seconds
    the request may take (None: no limit beyond the front end's own deadline)."""

    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    timeout_s: float | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the best alternatives (``(token_id, logprob)``, most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """What sample ``index`` produced since the previous delta; ``finish_reason`` None while it runs, then
    ``"stop"``, ``"length"`` or ``"abort"`` (an engine's own outputs may also say ``"error"``)."""

    index: int
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    completion_tokens: int  # over all samples


@dataclass(frozen=True)
class GenerationDelta:
    """One step of a request's stream. ``usage`` is set on the last delta only."""

    request_id: str
    choices: tuple[ChoiceDelta, ...]
    worker_id: str = ""
    usage: Usage | None = None


@dataclass(frozen=True)
class Choice:
    """A whole sample, folded from its deltas."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None


@dataclass(frozen=True)
class Generation:
    """A whole answer: the fold of a request's stream."""

    request_id: str
    choices: tuple[Choice, ...]
    worker_id: str
    usage: Usage | None


async def fold(deltas: AsyncIterator[GenerationDelta]) -> Generation:
    """The whole answer of a stream, samples in index order. Consumes (and closes) ``deltas``."""
    request_id = worker_id = ""
    usage: Usage | None = None
    parts: dict[int, list[ChoiceDelta]] = {}
    try:
        async for delta in deltas:
            request_id, worker_id = delta.request_id, delta.worker_id or worker_id
            usage = delta.usage or usage
            for choice in delta.choices:
                parts.setdefault(choice.index, []).append(choice)
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    choices = tuple(_fold_choice(index, parts[index]) for index in sorted(parts))
    return Generation(request_id, choices, worker_id, usage)


def _fold_choice(index: int, parts: list[ChoiceDelta]) -> Choice:
    return Choice(index, "".join(p.text for p in parts), tuple(t for p in parts for t in p.token_ids),
                  tuple(lp for p in parts for lp in p.logprobs),
                  next((p.finish_reason for p in reversed(parts) if p.finish_reason), None))


@dataclass(frozen=True)
class ServedModel:
    """What a backend serves: the model's name, its context and its tokenizer (for token strings in logprobs)."""

    name: str
    max_model_len: int
    tokenizer: Tokenizer


class GenerationBackend(Protocol):
    """What front ends serve from; see the module docstring for the contract of ``generate``."""

    def served_model(self) -> ServedModel | None:
        """The model requests are served under now; None while nothing can serve (no worker up yet)."""

    def ready(self) -> bool:
        """Whether requests would be accepted now (health endpoints answer this)."""

    def generate(self, request: GenerationRequest, method: str) -> AsyncIterator[GenerationDelta]:
        """Serve ``request``; ``method`` labels it in the metrics (``"Generate"``, ``"chat.completions"``, ...)."""
