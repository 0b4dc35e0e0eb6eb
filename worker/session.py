"""The worker's end of ``Worker.Session``: Generate requests multiplexed over one stream.

A router keeps one such stream per worker, because setting up a gRPC call costs more than routing a request
(``bench/bench_front_door_floor.py``). ``serve_session`` reads the stream's messages as they come: a ``generate``
starts the request as a task of its own, an ``abort`` cancels that task (which aborts the request in the engine
and frees its pages). Each request's responses are tagged with its id; one that is refused or fails ends with a
response carrying the gRPC status code and details its own Generate call would have ended with. When the client
closes its side, the requests still running finish first; when the stream ends otherwise (cancelled, the router
gone), every request still running is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from radixserve.cluster.base.generation import GenerationError, Status
from radixserve.cluster.base.wire import Undecodable, grpc_code
from radixserve.v1 import worker_pb2

log = logging.getLogger(__name__)
Responses = Callable[[worker_pb2.WorkerGenerateRequest], AsyncIterator[worker_pb2.WorkerGenerateResponse]]
_Answer = worker_pb2.WorkerSessionResponse | Undecodable | None


async def serve_session(requests: AsyncIterator[worker_pb2.WorkerSessionRequest | Undecodable],
                        responses: Responses) -> AsyncIterator[worker_pb2.WorkerSessionResponse | Undecodable]:
    """The answers to a Session stream's ``requests``, each request served by ``responses`` (which raises
    ``GenerationError`` for a request refused or failed). A message that does not parse is yielded as the
    ``Undecodable`` it is, and ends the stream: its request cannot be named."""
    outbox: asyncio.Queue[_Answer] = asyncio.Queue()
    running: dict[str, asyncio.Task[None]] = {}
    reader = asyncio.create_task(_read(requests, responses, outbox, running))
    try:
        while (answer := await outbox.get()) is not None:
            yield answer
            if isinstance(answer, Undecodable):
                return
    finally:
        reader.cancel()
        for task in list(running.values()):
            task.cancel()
        await asyncio.gather(reader, *running.values(), return_exceptions=True)


async def _read(requests: AsyncIterator[worker_pb2.WorkerSessionRequest | Undecodable], responses: Responses,
                outbox: asyncio.Queue[_Answer], running: dict[str, asyncio.Task[None]]) -> None:
    async for message in requests:
        if isinstance(message, Undecodable):
            outbox.put_nowait(message)
            return
        if message.WhichOneof("kind") == "abort":
            task = running.get(message.abort)
            if task is not None:
                task.cancel()
            continue
        request = message.generate
        request_id = request.request_id
        if not request_id:
            outbox.put_nowait(_error(request_id, GenerationError(Status.INVALID_ARGUMENT, "must not be empty on a "
                                                                 "session stream", "request_id")))
            continue
        if request_id in running:
            outbox.put_nowait(_error(request_id, GenerationError(Status.ALREADY_EXISTS, f"{request_id!r} is in "
                                                                 "flight on this stream", "request_id")))
            continue
        running[request_id] = asyncio.create_task(_serve(request, responses, outbox, running))
    await asyncio.gather(*running.values(), return_exceptions=True)  # the client is done sending: finish the rest
    outbox.put_nowait(None)


async def _serve(request: worker_pb2.WorkerGenerateRequest, responses: Responses, outbox: asyncio.Queue[_Answer],
                 running: dict[str, asyncio.Task[None]]) -> None:
    request_id = request.request_id
    try:
        async with contextlib.aclosing(responses(request)) as parts:
            async for part in parts:
                outbox.put_nowait(worker_pb2.WorkerSessionResponse(request_id=request_id, response=part))
    except GenerationError as error:
        outbox.put_nowait(_error(request_id, error))
    except Exception:  # a bug: the request still gets its end, and the stream's other requests go on
        log.exception("request %s failed on a session stream", request_id)
        outbox.put_nowait(_error(request_id, GenerationError(Status.INTERNAL, "internal error")))
    finally:
        running.pop(request_id, None)


def _error(request_id: str, error: GenerationError) -> worker_pb2.WorkerSessionResponse:
    return worker_pb2.WorkerSessionResponse(request_id=request_id, error_code=grpc_code(error.status).value[0],
                                            error_details=str(error))
