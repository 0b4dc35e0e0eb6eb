"""The worker's framed Session: ``Worker.Session``'s messages over plain TCP (``cluster.base.framing``).

A routed request crosses the Session twice (the request in, its tokens out); over gRPC each message costs both
sides a hop through grpcio's completion-queue thread, over a framed stream one write and one read on the event loop
(``cluster.base.framing`` gives the figures). The messages and their meaning are the gRPC Session's
(``worker.session.SessionServer``):

- the client's first frame is a ``WorkerSessionHello`` carrying what gRPC metadata would (``authorization``); a
  worker with a cluster key answers a wrong or missing one with a ``WorkerSessionResponse`` whose ``request_id``
  is empty and whose ``error_code`` is UNAUTHENTICATED, and closes the connection;
- then each frame is a ``WorkerSessionRequest`` and each frame back a ``WorkerSessionResponse``; a frame that does
  not parse, or is over ``max_message_bytes``, is answered like the hello's refusal (INVALID_ARGUMENT) and ends the
  connection;
- the connection's end, however it ends, aborts every request still running on it (which frees their pages).

It serves plain TCP only: a worker configured for TLS offers none (``WorkerInfo.session_port`` 0) and its routers
use the gRPC Session.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from google.protobuf.message import DecodeError

from radixserve.cluster.base.framing import FrameDecoder, FrameError, frame
from radixserve.cluster.base.generation import Status
from radixserve.cluster.base.security import ApiKeys
from radixserve.cluster.base.wire import Undecodable, grpc_code
from radixserve.v1 import worker_pb2
from radixserve.worker.session import Admit, SessionServer


class SessionListener:
    """Serves framed Sessions on ``host`` (``start``: port 0 takes a free port), taking requests in with
    ``admit`` (the worker's ``WorkerService.admit``), to clients with one of ``keys`` (any client when none is
    required), with frames up to ``max_message_bytes``. Runs once: ``start``, then ``stop``."""

    def __init__(self, admit: Admit, keys: ApiKeys, max_message_bytes: int) -> None:
        self._admit = admit
        self._keys = keys
        self._max_bytes = max_message_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self, host: str, port: int = 0) -> int:
        """Listen and return the bound port; OSError when it cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self._admit, self._keys, self._max_bytes, self._connections), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every connection (aborting what still runs on them)."""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        await asyncio.gather(*(connection.ended() for connection in connections), return_exceptions=True)


class _Connection(asyncio.Protocol):
    """One framed Session connection: the hello, then each frame handed to a ``SessionServer`` in the I/O callback
    that read it, the requests writing their answers on the transport. Listed in ``connections`` until its
    requests were aborted after its end.

    Answers are written without waiting for the transport to drain: each is a few tokens, the requests on a
    connection are bounded by the worker's queue, so what the transport may buffer is too."""

    def __init__(self, admit: Admit, keys: ApiKeys, max_message_bytes: int, connections: set[_Connection]) -> None:
        self._admit = admit
        self._keys = keys
        self._decoder = FrameDecoder(max_message_bytes)
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._server: SessionServer | None = None  # once the hello was accepted
        self._closing: asyncio.Task[None] | None = None
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self._decoder.feed(data):
                if self._server is None:
                    self._hello(payload)
                elif isinstance(message := _parse(payload), Undecodable):
                    self._refuse(Status.INVALID_ARGUMENT, message.details)
                else:
                    self._server.receive(message)
                if self._transport is None or self._transport.is_closing():
                    return
        except FrameError as error:
            self._refuse(Status.INVALID_ARGUMENT, f"{self._expected()}: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = asyncio.get_running_loop().create_task(self._end())

    def abort(self) -> None:
        """End the connection now, without flushing what is left to write."""
        if self._transport is not None:
            self._transport.abort()

    def ended(self) -> asyncio.Future[None]:
        """Done once the connection ended and its requests were aborted."""
        return self._ended

    async def _end(self) -> None:
        try:
            if self._server is not None:
                await self._server.close()  # aborts every request still running on the connection
        finally:
            self._connections.discard(self)
            self._ended.set_result(None)

    def _expected(self) -> str:
        return "WorkerSessionHello" if self._server is None else "WorkerSessionRequest"

    def _hello(self, payload: bytes) -> None:
        """Accept the client, or refuse it (and say why) without an accepted key."""
        try:
            hello = worker_pb2.WorkerSessionHello.FromString(payload)
        except DecodeError:
            self._refuse(Status.INVALID_ARGUMENT, "WorkerSessionHello: cannot be parsed")
            return
        if not self._keys.check(hello.authorization or None):
            self._refuse(Status.UNAUTHENTICATED, "missing or invalid cluster key")
            return
        self._server = SessionServer(self._admit, self._send)

    def _send(self, answer: worker_pb2.WorkerSessionResponse) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(answer.SerializeToString()))

    def _refuse(self, status: Status, details: str) -> None:
        """The connection-wide refusal: an answer naming no request, then the connection's end (once written)."""
        self._send(worker_pb2.WorkerSessionResponse(error_code=grpc_code(status).value[0], error_details=details))
        assert self._transport is not None
        self._transport.close()


def _parse(data: bytes) -> worker_pb2.WorkerSessionRequest | Undecodable:
    try:
        return worker_pb2.WorkerSessionRequest.FromString(data)
    except DecodeError as error:
        return Undecodable(f"WorkerSessionRequest: cannot be parsed: {error}")
