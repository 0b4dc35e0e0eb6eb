"""``EngineBackend``: one engine as a ``GenerationBackend``, so the shared front ends serve a worker directly.

Requests are prepared as the router prepares them (``cluster.base.requests.Preparer``, with the engine's
tokenizer and limits), then run on the engine. Errors, as ``GenerationError``: bad input INVALID_ARGUMENT naming
the field; a request id already in flight ALREADY_EXISTS; a full queue (``EngineOverloaded``) RESOURCE_EXHAUSTED;
a draining worker UNAVAILABLE; the request's own work failing (``RequestFailed``) or a failed engine step INTERNAL;
``timeout_s`` passing DEADLINE_EXCEEDED. Closing the stream aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from radixserve.cluster.base.generation import (GenerationDelta, GenerationError, GenerationRequest, ServedModel,
                                                Status, Usage)
from radixserve.cluster.base.requests import ModelLimits, Preparer
from radixserve.worker.engine import Engine, EngineOverloaded, RequestFailed, RequestIdInUse
from radixserve.worker.in_flight import InFlight
from radixserve.worker.outputs import RequestOutput

# The engine's own field names -> the neutral request's.
_FIELDS = {"prompt_token_ids": "token_ids"}


class EngineBackend:
    """Serves ``engine``'s model under ``engine.config.model``; deltas carry ``worker_id``.

    ``draining`` refuses new requests (UNAVAILABLE) and makes ``ready`` false; ``in_flight`` counts the
    requests being served.
    """

    def __init__(self, engine: Engine, worker_id: str) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._served = ServedModel(engine.config.model, engine.max_model_len, engine.tokenizer)
        self._limits = ModelLimits(engine.model_config.vocab_size, engine.max_model_len)
        self._preparer = Preparer()
        self.draining = False
        self.in_flight = InFlight()

    def served_model(self) -> ServedModel:
        return self._served

    def ready(self) -> bool:
        return not self.draining

    def close(self) -> None:
        """Release the threads requests are prepared on (after the last request)."""
        self._preparer.close()

    async def generate(self, request: GenerationRequest, method: str) -> AsyncIterator[GenerationDelta]:
        if self.draining:
            raise GenerationError(Status.UNAVAILABLE, "the worker is draining; send to another worker")
        prepared = await self._preparer.prepare(request, self._engine.tokenizer, self._limits)
        deadline = None if prepared.timeout_s is None else time.monotonic() + prepared.timeout_s
        num_tokens = 0
        with self.in_flight.track():
            try:
                outputs = self._engine.generate(list(prepared.token_ids), prepared.params, prepared.request_id)
                async with contextlib.aclosing(outputs):
                    while (output := await _next(outputs, deadline)) is not None:
                        num_tokens += sum(len(o.token_ids) for o in output.outputs)
                        yield self._delta(output, num_tokens)
            except (ValueError, EngineOverloaded, RequestFailed, RuntimeError) as error:
                raise engine_error(error) from None

    def _delta(self, output: RequestOutput, num_tokens: int) -> GenerationDelta:
        usage = Usage(output.num_prompt_tokens, output.num_cached_tokens, num_tokens) if output.finished else None
        return GenerationDelta(output.request_id, output.outputs, self._worker_id, usage)


async def _next(outputs: AsyncIterator[RequestOutput], deadline: float | None) -> RequestOutput | None:
    """The next output (None at the end), DEADLINE_EXCEEDED past ``deadline`` (the wait is then cancelled,
    which closes ``outputs``)."""
    if deadline is None:
        return await anext(outputs, None)
    try:
        return await asyncio.wait_for(anext(outputs, None), max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise GenerationError(Status.DEADLINE_EXCEEDED, "the request's timeout passed") from None


def engine_error(error: Exception) -> GenerationError:
    """The ``GenerationError`` of an engine refusing or failing a request: a request id in flight ALREADY_EXISTS
    naming ``request_id``, another ValueError INVALID_ARGUMENT naming its field (``token_ids`` for the engine's
    ``prompt_token_ids``), a full queue RESOURCE_EXHAUSTED, anything else INTERNAL. Every front end of a worker
    (HTTP through ``EngineBackend``, the gRPC service) maps the engine's errors through it."""
    if isinstance(error, RequestIdInUse):
        return GenerationError(Status.ALREADY_EXISTS, str(error).partition(": ")[2], "request_id")
    if isinstance(error, ValueError):
        invalid = GenerationError.invalid(error)
        return invalid.renamed(lambda name: _FIELDS.get(name, name))
    if isinstance(error, EngineOverloaded):
        return GenerationError(Status.RESOURCE_EXHAUSTED, f"worker overloaded, retry later or elsewhere: {error}")
    return GenerationError(Status.INTERNAL, str(error))
