"""The router's end of ``Worker.Session``: every request routed to one worker over one long-lived stream.

Setting up a gRPC call costs more than routing a request (``bench/bench_front_door_floor.py``: about 0.9 ms on a
2-core EPYC), so a ``WorkerSession`` opens one stream on first use and writes each request on it as a message.
The stream's reader hands each answer to the request it names; its writer sends the messages queued by the
requests (a request never awaits a write, so closing one never blocks).

Guarantees, as a Generate call of its own would give them:

- each request ends with its finished response or ``WorkerCallFailed`` (the worker's status and details);
- a request that ends early (its consumer closed the stream, or ``timeout_s`` passed: DEADLINE_EXCEEDED) is
  aborted on the worker, which frees its pages;
- when the stream fails (the worker went away), every request on it fails with the stream's status, and the
  next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from radixserve.cluster.base.generation import Status
from radixserve.cluster.base.wire import status_of
from radixserve.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class WorkerCallFailed(Exception):
    """A worker call ended with ``status`` and ``details`` (the worker's own words)."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


_Answer = worker_pb2.WorkerSessionResponse | WorkerCallFailed


class _Stream:
    """One open Session call: its outgoing messages and the requests waiting for answers on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.outbox: asyncio.Queue[worker_pb2.WorkerSessionRequest] = asyncio.Queue()
        self.waiting: dict[str, asyncio.Queue[_Answer]] = {}
        self.failure: WorkerCallFailed | None = None


class WorkerSession:
    """Requests to one worker over one Session stream (``stub``), each call carrying ``metadata``."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata
        self._stream: _Stream | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def generate(self, request: worker_pb2.WorkerGenerateRequest,
                       timeout_s: float | None) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        """The worker's responses to ``request`` (its ``request_id`` unique among this session's requests in
        flight), up to the finished one; ``WorkerCallFailed`` when it fails."""
        stream = self._open()
        request_id = request.request_id
        answers: asyncio.Queue[_Answer] = asyncio.Queue()
        stream.waiting[request_id] = answers
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        ended = False
        stream.outbox.put_nowait(worker_pb2.WorkerSessionRequest(generate=request))
        try:
            while not ended:
                answer = await _next(answers, deadline)
                if isinstance(answer, WorkerCallFailed):
                    ended = True
                    raise answer
                if answer.error_code:
                    ended = True
                    code = _CODES.get(answer.error_code, grpc.StatusCode.UNKNOWN)
                    raise WorkerCallFailed(status_of(code), answer.error_details or code.name)
                ended = answer.response.finished
                yield answer.response
        finally:
            stream.waiting.pop(request_id, None)
            if not ended and stream.failure is None:
                stream.outbox.put_nowait(worker_pb2.WorkerSessionRequest(abort=request_id))

    async def close(self) -> None:
        """End the stream (the worker aborts what still runs on it); requests waiting on it fail CANCELLED."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.call.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _open(self) -> _Stream:
        if self._stream is None or self._stream.failure is not None:
            stream = _Stream(self._stub.Session(metadata=self._metadata))
            self._stream = stream
            for work in (self._write(stream), self._read(stream)):
                task = asyncio.get_running_loop().create_task(work)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return self._stream

    async def _write(self, stream: _Stream) -> None:
        try:
            while True:
                await stream.call.write(await stream.outbox.get())
        except asyncio.CancelledError:
            raise
        except Exception:  # the call ended: the reader hears why and fails its requests
            stream.call.cancel()

    async def _read(self, stream: _Stream) -> None:
        try:
            async for answer in stream.call:
                waiting = stream.waiting.get(answer.request_id)
                if waiting is not None:
                    waiting.put_nowait(answer)
            failure = WorkerCallFailed(Status.UNAVAILABLE, "the worker ended the session stream")
        except grpc.aio.AioRpcError as error:
            failure = WorkerCallFailed(status_of(error.code()), error.details() or error.code().name)
        except asyncio.CancelledError:
            failure = WorkerCallFailed(Status.CANCELLED, "the session stream was closed")
            raise
        except Exception as error:  # a bug: the requests on the stream still end
            log.exception("a worker session stream failed")
            failure = WorkerCallFailed(Status.INTERNAL, f"the session stream failed: {error!r}")
        finally:
            stream.failure = failure
            stream.call.cancel()
            for waiting in stream.waiting.values():
                waiting.put_nowait(failure)


async def _next(answers: asyncio.Queue[_Answer], deadline: float | None) -> _Answer:
    if deadline is None:
        return await answers.get()
    try:
        return await asyncio.wait_for(answers.get(), max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise WorkerCallFailed(Status.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
