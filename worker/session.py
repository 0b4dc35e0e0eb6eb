"""The worker's end of ``Worker.Session``: Generate requests multiplexed over one stream.

A router keeps one such stream per worker, because setting up a gRPC call costs more than routing a request
(``bench/bench_front_door_floor.py``). A ``SessionServer`` takes the stream's messages as they come: a ``generate``
is taken in by the engine there and then and its responses forwarded by a task of its own; an ``abort`` cancels
that task (which aborts the request in the engine and frees its pages). Each request's responses are tagged with
its id and handed to the transport by the request's own task as the engine yields them: no queue and no task
stands between the frame's arrival and the engine, or between the engine and the socket (each such hop costs a
turn of the event loop, with the caches cold after a model step). One that is refused or fails ends with a response
carrying the gRPC status code and details its own Generate call would have ended with. ``serve_session`` adapts it
to the gRPC ``Session`` call; ``worker.session_tcp`` to the framed one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from radixserve.cluster.base.generation import GenerationError, Status
from radixserve.cluster.base.wire import Undecodable, grpc_code
from radixserve.v1 import worker_pb2

log = logging.getLogger(__name__)
Send = Callable[[worker_pb2.WorkerSessionResponse], None]


class Admitted(Protocol):
    """A request the worker took in: its responses (``async for``; ``GenerationError`` when its own work
    failed), and ``close`` (idempotent), which ends it, aborting it when it has not finished."""

    def __aiter__(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]: ...

    def close(self) -> None: ...


# Takes a request in at once, or raises ``GenerationError`` (the worker's ``WorkerService.admit``).
Admit = Callable[[worker_pb2.WorkerGenerateRequest], Admitted]
_Answer = worker_pb2.WorkerSessionResponse | Undecodable | None


class SessionServer:
    """One Session stream's requests: ``receive`` each message as it arrives; every answer goes to ``send``
    (which must not block: a transport write, a queue put). A ``generate`` is taken in by ``admit`` there and then
    (so the engine steps it at the loop's next turn) and its responses forwarded by a task of its own; an ``abort``
    cancels that task. However the task ends, even cancelled before it ran, its request is closed (aborted in the
    engine unless it finished). ``finish`` when the client is done sending (the requests still running end
    first), ``close`` when the stream ended otherwise (every request still running is aborted)."""

    def __init__(self, admit: Admit, send: Send) -> None:
        self._admit = admit
        self._send = send
        self._running: dict[str, asyncio.Task[None]] = {}

    def receive(self, message: worker_pb2.WorkerSessionRequest) -> None:
        if message.WhichOneof("kind") == "abort":
            task = self._running.get(message.abort)
            if task is not None:
                task.cancel()
            return
        request = message.generate
        request_id = request.request_id
        if not request_id:
            self._send(_error(request_id, GenerationError(Status.INVALID_ARGUMENT, "must not be empty on a "
                                                          "session stream", "request_id")))
        elif request_id in self._running:
            self._send(_error(request_id, GenerationError(Status.ALREADY_EXISTS, f"{request_id!r} is in "
                                                          "flight on this stream", "request_id")))
        else:
            self._start(request_id, request)

    async def finish(self) -> None:
        """Wait for the requests still running to end."""
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def close(self) -> None:
        """Abort every request still running, and wait for them to end."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, request_id: str, request: worker_pb2.WorkerGenerateRequest) -> None:
        try:
            admitted = self._admit(request)
        except GenerationError as error:
            self._send(_error(request_id, error))
            return
        except Exception:  # a bug: the request still gets its end, and the stream's other requests go on
            log.exception("request %s could not be taken in on a session stream", request_id)
            self._send(_error(request_id, GenerationError(Status.INTERNAL, "internal error")))
            return
        task = asyncio.get_running_loop().create_task(self._forward(request_id, admitted))
        self._running[request_id] = task

        def ended(_: asyncio.Task[None]) -> None:
            admitted.close()
            if self._running.get(request_id) is task:
                del self._running[request_id]

        task.add_done_callback(ended)

    async def _forward(self, request_id: str, admitted: Admitted) -> None:
        try:
            async for part in admitted:
                self._send(worker_pb2.WorkerSessionResponse(request_id=request_id, response=part))
        except GenerationError as error:
            self._send(_error(request_id, error))
        except Exception:  # a bug: the request still gets its end, and the stream's other requests go on
            log.exception("request %s failed on a session stream", request_id)
            self._send(_error(request_id, GenerationError(Status.INTERNAL, "internal error")))


async def serve_session(requests: AsyncIterator[worker_pb2.WorkerSessionRequest | Undecodable],
                        admit: Admit) -> AsyncIterator[worker_pb2.WorkerSessionResponse | Undecodable]:
    """The answers to a gRPC Session stream's ``requests``, each request taken in by ``admit``. A message that
    does not parse is yielded as the ``Undecodable`` it is, and ends the stream: its request cannot be named. When
    the client closes its side, the requests still running finish first; when the stream ends otherwise, every
    request still running is aborted."""
    outbox: asyncio.Queue[_Answer] = asyncio.Queue()
    server = SessionServer(admit, outbox.put_nowait)

    async def read() -> None:
        async for message in requests:
            if isinstance(message, Undecodable):
                outbox.put_nowait(message)
                return
            server.receive(message)
        await server.finish()
        outbox.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (answer := await outbox.get()) is not None:
            yield answer
            if isinstance(answer, Undecodable):
                return
    finally:
        reader.cancel()
        await server.close()
        await asyncio.gather(reader, return_exceptions=True)


def _error(request_id: str, error: GenerationError) -> worker_pb2.WorkerSessionResponse:
    return worker_pb2.WorkerSessionResponse(request_id=request_id, error_code=grpc_code(error.status).value[0],
                                            error_details=str(error))
