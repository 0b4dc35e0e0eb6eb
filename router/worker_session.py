"""The router's end of ``Worker.Session``: every request routed to one worker over one long-lived stream.

Setting up a gRPC call costs more than routing a request (``bench/bench_front_door_floor.py``: about 0.9 ms on a
2-core EPYC), so a ``WorkerSession`` opens one stream on first use and sends each request on it as a message. The
stream is the worker's framed Session (``worker.session_tcp``: the same messages over plain TCP, a write on the
event loop each, and each answer handed to its request in the I/O callback that read it) where the worker offers
one, else the gRPC ``Session`` call (a TLS cluster), whose messages a task of its own writes and another reads. A
request never awaits a send, so closing one never blocks.

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
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from radixserve.cluster.base.framing import FrameDecoder, FrameError, frame
from radixserve.cluster.base.generation import Status
from radixserve.cluster.base.wire import status_of
from radixserve.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_CONNECT_TIMEOUT_S = 10.0


class WorkerCallFailed(Exception):
    """A worker call ended with ``status`` and ``details`` (the worker's own words)."""

    def __init__(self, status: Status, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


_Answer = worker_pb2.WorkerSessionResponse | WorkerCallFailed
FramedTarget = Callable[[], tuple[str, int] | None]


class _Stream(ABC):
    """One open session: the requests waiting for answers on it, and how a message is sent."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Queue[_Answer]] = {}
        self.failure: WorkerCallFailed | None = None

    @abstractmethod
    def send(self, message: worker_pb2.WorkerSessionRequest) -> None:
        """Send ``message`` without waiting (an error of the connection shows in the answers)."""

    @abstractmethod
    def cancel(self) -> None:
        """End the session: the worker aborts every request still running on it."""

    def deliver(self, answer: worker_pb2.WorkerSessionResponse) -> None:
        """Hand ``answer`` to the request it names (none when that request already ended)."""
        waiting = self.waiting.get(answer.request_id)
        if waiting is not None:
            waiting.put_nowait(answer)

    def fail(self, failure: WorkerCallFailed) -> None:
        """The session ended: every request still on it fails with ``failure``, and the next request opens a new
        session. Only the first call counts."""
        if self.failure is None:
            self.failure = failure
            self.cancel()
            for waiting in self.waiting.values():
                waiting.put_nowait(failure)


class _GrpcStream(_Stream):
    """A ``Worker.Session`` call; its messages are written by a task of its own, one at a time, and its answers
    read by another (``read``)."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        super().__init__()
        self.call = call
        self.outbox: asyncio.Queue[worker_pb2.WorkerSessionRequest] = asyncio.Queue()

    def send(self, message: worker_pb2.WorkerSessionRequest) -> None:
        self.outbox.put_nowait(message)

    def cancel(self) -> None:
        self.call.cancel()

    async def write(self) -> None:
        try:
            while True:
                await self.call.write(await self.outbox.get())
        except asyncio.CancelledError:
            raise
        except Exception:  # the call ended: the reader hears why and fails its requests
            self.call.cancel()

    async def read(self) -> None:
        """Deliver each answer; when the call ends, fail every request still on it."""
        failure = WorkerCallFailed(Status.UNAVAILABLE, "the worker ended the session stream")
        try:
            async for answer in self.call:
                self.deliver(answer)
        except grpc.aio.AioRpcError as error:
            failure = WorkerCallFailed(status_of(error.code()), error.details() or error.code().name)
        except asyncio.CancelledError:
            failure = WorkerCallFailed(Status.CANCELLED, "the session stream was closed")
            raise
        except Exception as error:  # a bug: the requests on the stream still end
            log.exception("a worker session stream failed")
            failure = WorkerCallFailed(Status.INTERNAL, f"the session stream failed: {error!r}")
        finally:
            self.fail(failure)


class _FramedStream(_Stream, asyncio.Protocol):
    """A framed Session connection (``worker.session_tcp``): a message is one write on the transport, and each
    answer is delivered in the I/O callback that brought it (no reader task between)."""

    def __init__(self, max_message_bytes: int) -> None:
        super().__init__()
        self._decoder = FrameDecoder(max_message_bytes)
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, host: str, port: int, metadata: tuple[tuple[str, str], ...],
                   max_message_bytes: int) -> _FramedStream:
        """Connect and send the hello (the ``authorization`` of ``metadata``); ``WorkerCallFailed``
        (UNAVAILABLE) when the worker cannot be reached."""
        loop = asyncio.get_running_loop()
        try:
            transport, stream = await asyncio.wait_for(
                loop.create_connection(lambda: cls(max_message_bytes), host, port), _CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            raise WorkerCallFailed(Status.UNAVAILABLE, f"framed session to {host}:{port}: {error!r}") from None
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        authorization = dict(metadata).get("authorization", "")
        transport.write(frame(worker_pb2.WorkerSessionHello(authorization=authorization).SerializeToString()))
        return stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self._decoder.feed(data):
                answer = worker_pb2.WorkerSessionResponse.FromString(payload)
                if not answer.request_id and answer.error_code:  # the worker refused the whole session
                    self.fail(_failure(answer))
                    return
                self.deliver(answer)
        except (FrameError, DecodeError) as error:
            self.fail(WorkerCallFailed(Status.UNAVAILABLE, f"the framed session failed: {error}"))
        except Exception as error:  # a bug: the requests on the stream still end
            log.exception("a worker session stream failed")
            self.fail(WorkerCallFailed(Status.INTERNAL, f"the session stream failed: {error!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._decoder.check_ended()
            failure = WorkerCallFailed(Status.UNAVAILABLE, "the worker ended the session stream" if exc is None
                                       else f"the framed session failed: {exc}")
        except FrameError as error:
            failure = WorkerCallFailed(Status.UNAVAILABLE, f"the framed session failed: {error}")
        self.fail(failure)

    def send(self, message: worker_pb2.WorkerSessionRequest) -> None:
        assert self._transport is not None
        self._transport.write(frame(message.SerializeToString()))

    def cancel(self) -> None:
        if self._transport is not None:
            self._transport.close()


class WorkerSession:
    """Requests to one worker over one session: the framed one at ``framed()`` (``(host, port)``, or None where
    the worker offers none), else the gRPC ``Session`` of ``stub``; each carries ``metadata``. The target is
    asked again whenever a session is opened (a restarted worker may listen elsewhere)."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, metadata: tuple[tuple[str, str], ...],
                 framed: FramedTarget = lambda: None, max_message_bytes: int = 4 * 2**20) -> None:
        self._stub = stub
        self._metadata = metadata
        self._framed = framed
        self._max_bytes = max_message_bytes
        self._stream: _Stream | None = None
        self._opening = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def generate(self, request: worker_pb2.WorkerGenerateRequest,
                       timeout_s: float | None) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        """The worker's responses to ``request`` (its ``request_id`` unique among this session's requests in
        flight), up to the finished one; ``WorkerCallFailed`` when it fails."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        stream = self._stream
        if stream is None or stream.failure is not None:
            stream = await self._open()
        request_id = request.request_id
        answers: asyncio.Queue[_Answer] = asyncio.Queue()
        stream.waiting[request_id] = answers
        ended = False
        stream.send(worker_pb2.WorkerSessionRequest(generate=request))
        try:
            while not ended:
                answer = await _next(answers, deadline)
                if isinstance(answer, WorkerCallFailed):
                    ended = True
                    raise answer
                if answer.error_code:
                    ended = True
                    raise _failure(answer)
                ended = answer.response.finished
                yield answer.response
        finally:
            stream.waiting.pop(request_id, None)
            if not ended and stream.failure is None:
                stream.send(worker_pb2.WorkerSessionRequest(abort=request_id))

    async def close(self) -> None:
        """End the session (the worker aborts what still runs on it); requests waiting on it fail CANCELLED."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail(WorkerCallFailed(Status.CANCELLED, "the session stream was closed"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _open(self) -> _Stream:
        async with self._opening:  # one opening at a time: the requests waiting for it share its stream
            if self._stream is None or self._stream.failure is not None:
                target = self._framed()
                if target is None:
                    grpc_stream = _GrpcStream(self._stub.Session(metadata=self._metadata))
                    self._start(grpc_stream.write())
                    self._start(grpc_stream.read())
                    self._stream = grpc_stream
                else:
                    self._stream = await _FramedStream.open(*target, self._metadata, self._max_bytes)
            return self._stream

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _failure(answer: worker_pb2.WorkerSessionResponse) -> WorkerCallFailed:
    """The failure an answer carrying an error code reports."""
    code = _CODES.get(answer.error_code, grpc.StatusCode.UNKNOWN)
    return WorkerCallFailed(status_of(code), answer.error_details or code.name)


async def _next(answers: asyncio.Queue[_Answer], deadline: float | None) -> _Answer:
    if deadline is None:
        return await answers.get()
    try:
        return await asyncio.wait_for(answers.get(), max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise WorkerCallFailed(Status.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
