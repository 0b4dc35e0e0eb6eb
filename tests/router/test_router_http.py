"""The router's OpenAI-compatible HTTP API over real worker servers (tiny engines, no Ray): API keys, the
metrics it counts, no worker up, and draining on stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import router_cluster
from router_cluster import Cluster

from radixserve.cluster.base.bus import InProcessBus
from radixserve.cluster.base.config import RouterConfig, SecurityConfig
from radixserve.cluster.base.generation import ROLES
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.cluster.base.metrics import scrape, total
from radixserve.cluster.base.sampling_params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from radixserve.cluster.base.tokenizer import LONG_TEXT_CHARS, Tokenizer
from radixserve.router.server import Router
from radixserve.worker.models.loading import open_checkpoint

KEY = "sk-test-0123456789"
KEY_ENV = "RADIXSERVE_TEST_API_KEYS"
TIMEOUT_S = 30.0
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def cluster(tiny_hf_dir: Path, num_workers: int, security: SecurityConfig | None = None,
            drain_timeout_s: float = 10) -> contextlib.AbstractAsyncContextManager[Cluster]:
    """``num_workers`` tiny workers behind a router serving HTTP on a free port."""
    return router_cluster.cluster(open_checkpoint(tiny_hf_dir), num_workers, num_pages=128, http_port=0,
                                  security=security, drain_timeout_s=drain_timeout_s)


@pytest.fixture(scope="module")
def keyed(tiny_hf_dir: Path) -> Iterator[Cluster]:
    """One worker behind a router that requires ``KEY``."""
    loop = LoopThread("test").start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, f"other-key, {KEY}")
        context = cluster(tiny_hf_dir, 1, SecurityConfig(api_keys_env=KEY_ENV, cluster_key="ck-router-http"))
        started = loop.call(context.__aenter__(), 60)
    try:
        yield started
    finally:
        loop.call(context.__aexit__(None, None, None), 60)
        loop.stop()


def test_api_keys_are_required_except_for_health_and_never_echoed(keyed: Cluster,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            answer = httpx.request(method, keyed.url + path, json=CHAT, headers=headers)
            assert answer.status_code == 401, (headers, path)
            assert answer.json()["error"]["code"] == "invalid_api_key" and KEY not in answer.text
    assert httpx.get(keyed.url + "/health").status_code == 200
    sdk = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert sdk.chat.completions.create(**CHAT).choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert KEY not in caplog.text


def test_requests_are_counted_under_their_method_and_status(tiny_hf_dir: Path) -> None:
    async def main() -> None:
        async with cluster(tiny_hf_dir, 2) as c, httpx.AsyncClient(base_url=c.url) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            completion = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "stream": True}
            async with http.stream("POST", "/v1/completions", json=completion) as streamed:
                assert (await streamed.aread()).endswith(b"data: [DONE]\n\n")
            assert (await http.post("/v1/completions", json={**completion, "top_p": 2.0})).status_code == 400
            assert (await http.post("/v1/completions", content=b"{")).status_code == 400
            assert (await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"})).status_code == 404
            metrics = scrape(c.router.metrics_address)

            def counted(method: str, code: str) -> float:
                return total(metrics, "radixserve_router_requests_total", method=method, code=code)
            assert counted("chat.completions", "OK") == 1 and counted("completions", "OK") == 1
            assert counted("completions", "INVALID_ARGUMENT") == 2  # refused by the core and before it
            assert counted("chat.completions", "NOT_FOUND") == 1
    asyncio.run(asyncio.wait_for(main(), 120))


def test_without_a_worker_the_router_answers_503_and_health_says_so(tiny_hf_dir: Path) -> None:
    async def main() -> None:
        bus = InProcessBus()
        router = Router(RouterConfig(port=0, http_port=0), bus)
        await router.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://{router.http_address}") as http:
                refused = await http.post("/v1/chat/completions", json=CHAT)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
                assert (await http.get("/health")).status_code == 503
                assert (await http.get("/v1/models")).json()["data"] == []
        finally:
            await router.stop()
            await bus.close()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_stopping_the_router_drains_http_requests(tiny_hf_dir: Path) -> None:
    async def main() -> None:
        async with cluster(tiny_hf_dir, 1) as c, httpx.AsyncClient(base_url=c.url, timeout=30) as http:
            c.engines[0].gate.clear()
            held = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
            while c.router.core.num_in_flight == 0:
                await asyncio.sleep(0.01)  # the poll interval (main's deadline bounds it)
            stopping = asyncio.create_task(c.router.stop())
            while not c.router.core.draining:
                await asyncio.sleep(0.01)  # the poll interval (main's deadline bounds it)
            assert (await http.get("/health")).status_code == 503
            refused = await http.post("/v1/chat/completions", json=CHAT)
            assert refused.status_code == 503
            c.engines[0].gate.set()
            assert (await held).status_code == 200
            await stopping
            with pytest.raises(httpx.ConnectError):
                await http.get("/health")
    asyncio.run(asyncio.wait_for(main(), 120))



def test_the_openapi_document_and_docs_show_the_generation_endpoints_and_their_limits(keyed: Cluster) -> None:
    document = httpx.get(keyed.url + "/openapi.json")
    assert document.status_code == 200
    schema = document.json()
    bodies = {path: schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
              for path in ("/v1/chat/completions", "/v1/completions")}
    assert bodies == {"/v1/chat/completions": "#/components/schemas/ChatCompletionRequest",
                      "/v1/completions": "#/components/schemas/CompletionRequest"}
    models = schema["components"]["schemas"]
    stop_list = next(s for s in models["CompletionRequest"]["properties"]["stop"]["anyOf"] if s["type"] == "array")
    assert stop_list["maxItems"] == MAX_STOP_SEQUENCES and stop_list["items"]["maxLength"] == MAX_STOP_CHARS
    assert set(models["ChatMessage"]["properties"]["role"]["enum"]) == set(ROLES)
    docs = httpx.get(keyed.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize(("param", "body"), [
    ("stop", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}),
    ("stop", {**CHAT, "stop": "x" * (MAX_STOP_CHARS + 1)}),
    ("messages[1].role", {**CHAT, "messages": [{"role": "system", "content": "Be terse."},
                                                {"role": "wizard", "content": "Hi"}]}),
])
def test_too_many_or_too_long_stops_and_unknown_roles_are_400_naming_them(keyed: Cluster, param: str,
                                                                         body: dict[str, object]) -> None:
    reply = httpx.post(keyed.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_long_prompt_is_tokenized_off_the_event_loop_while_a_short_request_is_served(
        tiny_hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The long prompt's tokenization is held until the short request has its answer: were it on the event loop,
    the short request could not be served meanwhile."""
    tokenizing, released = threading.Event(), threading.Event()
    threads: list[int] = []
    encode = Tokenizer.encode

    def held(self: Tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > LONG_TEXT_CHARS:
            threads.append(threading.get_ident())
            tokenizing.set()
            assert released.wait(TIMEOUT_S)
        return encode(self, text, add_special_tokens)
    monkeypatch.setattr(Tokenizer, "encode", held)

    async def main() -> None:
        async with cluster(tiny_hf_dir, 1) as c, httpx.AsyncClient(base_url=c.url, timeout=TIMEOUT_S) as http:
            long = {"model": "tiny", "prompt": "a" * (LONG_TEXT_CHARS + 100), "max_tokens": 2}
            big = asyncio.ensure_future(http.post("/v1/completions", json=long))
            assert await asyncio.to_thread(tokenizing.wait, TIMEOUT_S)
            small = await http.post("/v1/chat/completions", json=CHAT)
            released.set()
            assert small.status_code == 200, small.text
            assert (await big).status_code in (200, 400)
            assert threads and threading.get_ident() not in threads
    asyncio.run(asyncio.wait_for(main(), 4 * TIMEOUT_S))
