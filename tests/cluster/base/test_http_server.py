"""cluster.base.openai.server.HttpServer over 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

import httpx

from radixserve.cluster.base.openai.server import HttpServer


async def _ok(scope: dict, receive: object, send: object) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


def test_accepted_connections_send_without_nagle_delay() -> None:
    """Every accepted connection has TCP_NODELAY: with Nagle's algorithm on, a streamed answer's first event waits
    for the client's delayed ACK of the headers (40 ms on Linux; seen through SMG, which delays its ACKs)."""

    async def accepted_nodelay() -> list[int]:
        server = HttpServer(_ok, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                assert (await client.get(f"{server.url}/")).text == "ok"
                connections = server._server.server_state.connections  # uvicorn's open connections
                return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                        for c in connections]
        finally:
            await server.stop(grace_s=1)

    assert asyncio.run(accepted_nodelay()) == [1]
