"""The client and its commands against a real gRPC server running a fake ``Generation`` service.

The fake echoes the prompt's last message (or raw text) back word by word, validates sampling options with the
same code the router uses, and records every request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cluster_calls import closed_port
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from radixserve.cluster.control.client import (DEFAULT_TARGET, ClusterClient, add_client_commands, channel_target,
                                              default_target, format_status)
from radixserve.cluster.control.launcher import ClusterState
from radixserve.cluster.base.wire import sampling_params_from_proto
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2

TIMEOUT_S = 5.0
HOLD = "hold on"  # the fake sends its first word, then waits for FakeGeneration.release()
NUM_CACHED = 8

WORKERS = api_pb2.ListWorkersResponse(policy="prefix", workers=[
    api_pb2.WorkerStatus(worker_id="worker-0", address="127.0.0.1:7001", http_address="127.0.0.1:8001", model="m",
                         state="up",
                         load=types_pb2.LoadReport(num_running=3, num_waiting=1, num_pages_used=30, num_pages_free=70,
                                                   hit_ratio=0.375),
                         num_routed=120, num_in_flight=4, num_indexed_pages=29, events_live=True),
    api_pb2.WorkerStatus(worker_id="worker-1", address="127.0.0.1:7002", model="m", state="down",
                         load=types_pb2.LoadReport(num_pages_used=1, num_pages_free=2, hit_ratio=1.0),
                         num_routed=7, events_live=False),
])


def prompt_words(request: api_pb2.GenerateRequest) -> list[str]:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return request.text.split()
    if kind == "chat":
        return "".join(message.content for message in request.chat.messages[-1:]).split()
    return [str(i) for i in request.token_ids.ids]


def echo_chunks(words: list[str]) -> list[str]:
    return words[:1] + [f" {word}" for word in words[1:]]


class FakeGeneration(api_pb2_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.requests: list[api_pb2.GenerateRequest] = []
        self.cancelled = threading.Event()
        self._released = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def release(self) -> None:
        """Let a held request go on (call from any thread)."""
        self._loop.call_soon_threadsafe(self._released.set)

    async def Generate(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        self.requests.append(request)
        try:
            num_samples = sampling_params_from_proto(request.sampling).n
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        words = prompt_words(request)
        try:
            for position, text in enumerate(echo_chunks(words)):
                if position == 1 and request.text == HOLD:
                    await self._released.wait()
                chunks = [types_pb2.CompletionChunk(index=i, text=text) for i in range(num_samples)]
                yield api_pb2.GenerateResponse(request_id=request.request_id, choices=chunks, worker_id="fake-0")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        usage = api_pb2.Usage(prompt_tokens=len(words) + NUM_CACHED, cached_tokens=NUM_CACHED,
                              completion_tokens=num_samples * len(words))
        yield api_pb2.GenerateResponse(request_id=request.request_id, worker_id="fake-0", usage=usage)

    async def Complete(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> api_pb2.CompleteResponse:
        self.requests.append(request)
        text = "".join(echo_chunks(prompt_words(request)))
        return api_pb2.CompleteResponse(request_id=request.request_id, worker_id="fake-0",
                                        choices=[api_pb2.Completion(text=text, finish_reason="stop")])

    async def ListWorkers(self, request: api_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> api_pb2.ListWorkersResponse:
        return WORKERS


class Server:
    """A grpc.aio server on 127.0.0.1 (a free port) with the fake and a health service, in its own thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self.call(self._start())
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.servicer = FakeGeneration()
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server()
        api_pb2_grpc.add_GenerationServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def call(self, coroutine: object) -> object:
        """Run ``coroutine`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT_S)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.servicer.release()
        self.call(self._server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT_S)
        self._loop.close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.stop()


@pytest.fixture
def client(server: Server) -> Iterator[ClusterClient]:
    with ClusterClient(server.target, timeout_s=TIMEOUT_S) as opened:
        yield opened


@pytest.fixture
def closed_target() -> Iterator[str]:
    """An address that refuses connections."""
    with closed_port() as port:
        yield f"127.0.0.1:{port}"


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_generate_streams_each_response_as_the_server_sends_it(server: Server, client: ClusterClient) -> None:
    responses = client.generate(HOLD)
    first = next(responses)  # the server holds the rest until released: a buffering client would time out
    assert [chunk.text for chunk in first.choices] == ["hold"]
    server.servicer.release()
    rest = list(responses)
    assert [chunk.text for response in rest for chunk in response.choices] == [" on"]
    assert rest[-1].usage.completion_tokens == 2


def test_closing_the_stream_early_cancels_the_call(server: Server, client: ClusterClient) -> None:
    responses = client.generate(HOLD)
    next(responses)
    responses.close()
    assert server.servicer.cancelled.wait(TIMEOUT_S)


def test_each_prompt_kind_reaches_the_server(server: Server, client: ClusterClient) -> None:
    sampling = types_pb2.SamplingOptions(max_tokens=7)
    list(client.generate("a b", sampling=sampling, request_id="r1"))
    list(client.generate(chat=[{"role": "system", "content": "s"}, {"role": "user", "content": "c d"}]))
    answer = client.complete(token_ids=[5, 6])
    first, second, third = server.servicer.requests
    assert (first.text, first.sampling.max_tokens, first.request_id) == ("a b", 7, "r1")
    assert [(m.role, m.content) for m in second.chat.messages] == [("system", "s"), ("user", "c d")]
    assert list(third.token_ids.ids) == [5, 6]
    assert answer.choices[0].text == "5 6"


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "token_ids": [1]}, {"prompt": "a", "chat": []}])
def test_generate_needs_exactly_one_prompt(client: ClusterClient, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"^prompt: give exactly one"):
        client.generate(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("chat", "field"), [([{"role": "user"}], r"chat\[0\]"),
                                             ([{"role": "user", "content": "x"}, {"role": 1, "content": "y"}],
                                              r"chat\[1\]\.role")])
def test_a_bad_chat_message_is_named(client: ClusterClient, chat: list[dict[str, str]], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        client.complete(chat=chat)


@pytest.mark.parametrize("token_ids", [[-1], [2**32], ["7"]])
def test_bad_token_ids_are_named(client: ClusterClient, token_ids: list[int]) -> None:
    with pytest.raises(ValueError, match=r"^token_ids: "):
        client.complete(token_ids=token_ids)


def test_an_empty_chat_is_still_sent_as_a_chat(server: Server, client: ClusterClient) -> None:
    client.complete(chat=[])
    assert server.servicer.requests[-1].WhichOneof("prompt") == "chat"


def test_list_workers(client: ClusterClient) -> None:
    assert client.list_workers() == WORKERS


def test_wait_ready_polls_health_until_serving(server: Server, client: ClusterClient) -> None:
    server.call(server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    with pytest.raises(TimeoutError, match="NOT_SERVING"):
        client.wait_ready(0.3)
    server.call(server.health.set("", health_pb2.HealthCheckResponse.SERVING))
    client.wait_ready(TIMEOUT_S)


def test_wait_ready_gives_up_on_an_unreachable_target(closed_target: str) -> None:
    with ClusterClient(closed_target) as unreachable, pytest.raises(
            TimeoutError, match=r"not serving after 0\.3 s \(last: UNAVAILABLE\)$"):
        unreachable.wait_ready(0.3)


def test_generate_command_streams_the_chat_answer_and_summarizes(server: Server,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = run_command(["generate", "hello there world", "--target", server.target, "--system", "be brief",
                        "--max-tokens", "5"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "hello there world\n"
    assert "3 tokens" in err and f"{NUM_CACHED}/{NUM_CACHED + 3} prompt tokens cached" in err
    assert "worker fake-0" in err and "tok/s" in err
    request = server.servicer.requests[-1]
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "be brief"),
                                                                    ("user", "hello there world")]
    assert request.sampling.max_tokens == 5 and request.sampling.temperature == 0
    assert not request.sampling.HasField("top_p") and not request.sampling.HasField("seed")


def test_generate_command_raw_with_samples(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_command(["generate", "one two", "--raw", "--target", server.target, "--n", "2", "--top-p", "0.5",
                        "--top-k", "4", "--seed", "9"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "one two\n--- sample 1 ---\none two\n"
    assert "4 tokens" in err
    request = server.servicer.requests[-1]
    assert request.text == "one two"
    assert (request.sampling.n, request.sampling.top_p, request.sampling.top_k, request.sampling.seed) == (2, 0.5, 4, 9)


def test_generate_command_reports_a_refused_request(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_command(["generate", "x", "--target", server.target, "--top-p", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: sampling.top_p: must be in (0, 1]")
    assert "radixserve up" not in err


@pytest.mark.parametrize("command", [["generate", "x"], ["status"]])
def test_an_unreachable_cluster_is_reported_with_a_hint(closed_target: str, command: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = run_command([*command, "--target", closed_target])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: UNAVAILABLE: ")
    assert "start it with `radixserve up`" in err


def test_status_command_prints_the_table(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_command(["status", "--target", server.target])
    assert code == 0
    assert capsys.readouterr().out == format_status(WORKERS) + "\n"


def test_the_target_defaults_to_the_environment_then_the_running_clusters_routers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RADIXSERVE_HOME", str(tmp_path))
    monkeypatch.delenv("RADIXSERVE_TARGET", raising=False)
    assert default_target() == DEFAULT_TARGET
    ClusterState(os.getpid(), "127.0.0.1:7001", "", "", "", router_addresses=("127.0.0.1:7001", "127.0.0.1:7002")).save()
    assert default_target() == "127.0.0.1:7001,127.0.0.1:7002"
    monkeypatch.setenv("RADIXSERVE_TARGET", "10.0.0.5:6000")
    assert default_target() == "10.0.0.5:6000"
    parser = argparse.ArgumentParser()
    add_client_commands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["status"]).target is None  # resolved when the command runs


def test_several_router_addresses_become_one_static_grpc_address_list() -> None:
    assert channel_target("127.0.0.1:1") == "127.0.0.1:1"
    assert channel_target("127.0.0.1:1, localhost:2") in ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv6:[::1]:1,[::1]:2")
    assert channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    for bad in ("", "127.0.0.1:1,nohost", "127.0.0.1:1,127.0.0.1:x"):
        with pytest.raises(ValueError, match="^target: "):
            channel_target(bad)


def test_a_client_of_two_routers_goes_on_through_the_live_one(server: Server, closed_target: str) -> None:
    with ClusterClient([closed_target, server.target], timeout_s=10) as client:
        for _ in range(4):
            assert client.list_workers() == WORKERS


def test_a_bad_target_is_an_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(["status", "--target", "127.0.0.1:1,nohost"]) == 2
    assert capsys.readouterr().err.startswith("error: target: ")


def parse_table(text: str) -> tuple[str, list[dict[str, str]]]:
    """The title and the rows of ``format_status``'s table as header-to-cell dicts (cells split on 2+ spaces)."""
    title, header, *rows = text.splitlines()
    names = re.split(r"\s{2,}", header.strip())
    return title, [dict(zip(names, re.split(r"\s{2,}", row.strip()), strict=True)) for row in rows]


def test_format_status_shows_every_column_per_worker() -> None:
    title, rows = parse_table(format_status(WORKERS))
    assert title == "policy: prefix, 2 worker(s)"
    assert rows == [
        {"WORKER": "worker-0", "STATE": "up", "ADDRESS": "127.0.0.1:7001", "HTTP": "127.0.0.1:8001", "RUNNING": "3", "WAITING": "1",
         "KV PAGES": "30/100 (30.0%)", "HIT": "37.5%", "ROUTED": "120", "IN FLIGHT": "4", "INDEXED": "29",
         "EVENTS": "live"},
        {"WORKER": "worker-1", "STATE": "down", "ADDRESS": "127.0.0.1:7002", "HTTP": "-", "RUNNING": "0", "WAITING": "0",
         "KV PAGES": "1/3 (33.3%)", "HIT": "100.0%", "ROUTED": "7", "IN FLIGHT": "0", "INDEXED": "0",
         "EVENTS": "stale"},
    ]


def test_format_status_aligns_columns_and_handles_an_empty_pool() -> None:
    _, header, *rows = format_status(WORKERS).splitlines()
    end = header.index("ROUTED") + len("ROUTED")
    assert [row[:end].split()[-1] for row in rows] == ["120", "7"]  # numbers end under their header
    empty = api_pb2.ListWorkersResponse(policy="round_robin",
                                        workers=[api_pb2.WorkerStatus(worker_id="w", state="up", address="h:1")])
    assert parse_table(format_status(empty))[1][0]["KV PAGES"] == "0/0 (-)"
    assert format_status(api_pb2.ListWorkersResponse()).splitlines()[0] == "policy: ?, 0 worker(s)"
