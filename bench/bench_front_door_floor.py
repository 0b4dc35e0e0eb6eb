"""The least overhead a Python front door of our shape can add, against vllm-router's, with no model at all.

The HTTP router overhead of ``bench_cluster.py`` is a routed request's TTFT minus the same request's straight to
the worker. Our router takes the request over HTTP (uvicorn) and calls the worker over gRPC (grpcio's asyncio
API); vllm-router (Rust) forwards the HTTP request to the worker's HTTP API. This benchmark puts each in front of
a stub worker that answers at once (one SSE chunk over HTTP, one message over gRPC), so that only the front
doors' own costs remain:

- ``direct``: the stub's HTTP API, as the overhead's baseline;
- ``python_floor``: the least a Python router of our shape does: a bare ASGI app on uvicorn and uvloop that reads
  the body, makes one unary-stream gRPC call to the stub and writes the answer as SSE (no validation, routing,
  metrics or JSON models: each costs more, none costs less);
- ``python_floor_stream``: the same over one long-lived bidirectional gRPC stream (a request is one message
  written on it, its answer one message read), which saves the per-call set-up of gRPC; the benchmark sends one
  request at a time, so no demultiplexing is needed: a lower bound for a router that multiplexes its requests
  over one stream per worker;
- ``vllm_router``: vllm-router (from ``bench/.venv-peers``, ``bash bench/peers/setup.sh``) in front of the stub's
  HTTP API.

Requests go one at a time, the three kinds interleaved in an order shuffled per round; the table gives each
front door's median TTFT and its overhead over ``direct`` (the median of paired differences).

    python bench/bench_front_door_floor.py --pairs 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import httpx
import uvloop
from bench_cluster import CONTENDERS, RESULTS, WorkerEndpoints, peer_router
from machine import cpu_model

from radixserve.cluster.base.openai.server import HttpServer

_HOST = "127.0.0.1"
_METHOD = "/stub.Stub/Generate"
_SESSION_METHOD = "/stub.Stub/Session"
_CHUNK = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" hello"}]}\n\n'
_DONE = b"data: [DONE]\n\n"
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


async def _read_body(receive: Callable) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def _stub_http() -> Callable:
    """The stub worker's HTTP API: SSE for ``/v1/completions``, 200 for anything else (health, models)."""
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        await _read_body(receive)
        if scope["path"] != "/v1/completions":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"status":"ok","data":[]}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": _DONE})
    return app


def _python_floor(stub_grpc: str) -> Callable:
    """The floor proxy: body in, one gRPC call, SSE out."""
    channel = grpc.aio.insecure_channel(stub_grpc)
    call = channel.unary_stream(_METHOD)

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        body = json.loads(await _read_body(receive))
        parts = [part async for part in call(bytes(len(body["prompt"])))]
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await send({"type": "http.response.body", "body": _CHUNK * len(parts), "more_body": True})
        await send({"type": "http.response.body", "body": _DONE})
    return app


def _python_floor_stream(stub_grpc: str) -> Callable:
    """The floor proxy over one bidirectional stream (requests one at a time: answers come back in order)."""
    channel = grpc.aio.insecure_channel(stub_grpc)
    session: list = []

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        body = json.loads(await _read_body(receive))
        if not session:
            session.append(channel.stream_stream(_SESSION_METHOD)())
        await session[0].write(bytes(len(body["prompt"])))
        await session[0].read()
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": _DONE})
    return app


async def _serve_stub(ready: multiprocessing.Queue) -> None:
    async def generate(request: bytes, context: grpc.aio.ServicerContext):  # noqa: ANN202 (an async generator)
        yield request

    async def session(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):  # noqa: ANN202
        async for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler("stub.Stub", {
        "Generate": grpc.unary_stream_rpc_method_handler(generate),
        "Session": grpc.stream_stream_rpc_method_handler(session)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port(f"{_HOST}:0")
    await server.start()
    http = HttpServer(_stub_http(), _HOST, 0)
    ready.put((await http.start(), f"{_HOST}:{grpc_port}"))
    await asyncio.Event().wait()


async def _serve_floor(app: Callable[[str], Callable], stub_grpc: str, ready: multiprocessing.Queue) -> None:
    http = HttpServer(app(stub_grpc), _HOST, 0)
    ready.put(await http.start())
    await asyncio.Event().wait()


def _start(target: Callable, *args: object) -> tuple[multiprocessing.Process, object]:
    ready: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=lambda: uvloop.run(target(*args, ready)), daemon=True)
    process.start()
    return process, ready.get(timeout=60)


async def _ttft(client: httpx.AsyncClient, url: str, body: dict) -> float:
    sent = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:") and '"text"' in line:
                return time.perf_counter() - sent
    raise RuntimeError(f"{url}: no chunk with text")


async def _measure(urls: dict[str, str], pairs: int, seed: int) -> dict[str, list[float]]:
    body = {"model": "stub", "prompt": list(range(1000, 1065)), "max_tokens": 1, "stream": True}
    rng = random.Random(seed)
    ttfts: dict[str, list[float]] = {name: [] for name in urls}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        for name in urls:  # warm the connections
            for _ in range(20):
                await _ttft(client, urls[name], body)
        for _ in range(pairs):
            order = list(urls)
            rng.shuffle(order)
            for name in order:
                ttfts[name].append(await _ttft(client, urls[name], body))
    return ttfts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600, help="requests per front door")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "front_door_floor.json")
    args = parser.parse_args()
    stub, (stub_http, stub_grpc) = _start(_serve_stub)
    floor, floor_address = _start(_serve_floor, _python_floor, stub_grpc)
    floor_stream, floor_stream_address = _start(_serve_floor, _python_floor_stream, stub_grpc)
    stub_url = f"http://{stub_http}"
    try:
        with peer_router(CONTENDERS["vllm_router_cache_aware"], [WorkerEndpoints("stub", stub_url, "")],
                         Path("/tmp/radixserve-bench-floor-vllm-router.log")) as vllm_url:
            ttfts = asyncio.run(_measure({"direct": stub_url, "python_floor": f"http://{floor_address}",
                                          "python_floor_stream": f"http://{floor_stream_address}",
                                          "vllm_router": vllm_url}, args.pairs, args.seed))
    finally:
        for process in (floor, floor_stream, stub):
            process.terminate()
    rows = {name: {"ttft_p50_us": statistics.median(values) * 1e6,
                   "overhead_p50_us": statistics.median(v - d for v, d in zip(values, ttfts["direct"], strict=True)) * 1e6}
            for name, values in ttfts.items()}
    print(f"CPU: {cpu_model()}; {args.pairs} requests per front door\n")
    print("| front door | TTFT p50 | overhead p50 over direct |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['ttft_p50_us']:.0f} us | {row['overhead_p50_us']:.0f} us |")
    args.out.write_text(json.dumps({"cpu": cpu_model(), "pairs": args.pairs, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
