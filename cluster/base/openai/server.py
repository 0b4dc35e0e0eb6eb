"""``HttpServer``: uvicorn serving an ASGI app on the running asyncio loop, from ``start`` until ``stop``.

The listening socket is bound by ``start`` itself, so port 0 gives a free port and ``address`` tells which.
The server never touches signal handlers (the process that hosts it owns them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import uvicorn
from starlette.types import ASGIApp

_START_POLL_S = 0.01


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``, made with ``IPPROTO_TCP`` as its protocol.

    asyncio sets TCP_NODELAY only on sockets whose protocol is ``IPPROTO_TCP``, and accepted connections inherit
    the listener's; one made by ``socket.create_server`` (protocol 0) leaves Nagle's algorithm on, so a streamed
    response's first event waits for the client's delayed ACK of the headers (about 40 ms on Linux).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:  # as socket.create_server sets it up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """Serves ``app`` on ``host:port`` (0: a free port); ``tls`` holds ``uvicorn.Config``'s TLS arguments
    (``cluster.base.security.uvicorn_tls``), empty for plain HTTP. Runs once: ``start``, then ``stop``."""

    def __init__(self, app: ASGIApp, host: str, port: int, tls: Mapping[str, Any] | None = None) -> None:
        # No X-Forwarded-* rewriting (nothing here reads the client's address) and no Server header: each is
        # work on every request.
        self._config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_level="warning",
                                      access_log=False, proxy_headers=False, server_header=False, **dict(tls or {}))
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None
        self.address: str | None = None

    @property
    def url(self) -> str:
        """``http(s)://host:port`` once started."""
        scheme = "https" if self._config.is_ssl else "http"
        return f"{scheme}://{self.address}"

    async def start(self) -> str:
        """Bind, serve, and return the bound ``host:port``; OSError when the port cannot be bound."""
        if self._task is not None:
            raise RuntimeError("HttpServer: already started")
        host = self._config.host
        sock = _listening_socket(host, self._config.port)
        port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # failed before serving: raise its error
                await self._task
                raise RuntimeError("HttpServer: uvicorn exited before serving")
            await asyncio.sleep(_START_POLL_S)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.address

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let the requests in flight finish for up to ``grace_s`` (then cancel them), return
        once stopped. A no-op before ``start``."""
        if self._task is None:
            return
        self._config.timeout_graceful_shutdown = max(grace_s, 0.0)
        self._server.should_exit = True
        await self._task
