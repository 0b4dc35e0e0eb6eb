"""The worker's HTTP API (the shared OpenAI front end over its engine, and the SGLang-style info and load
endpoints) over 127.0.0.1 with the tiny model, driven by the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from cluster_calls import wait_for
from gated_engine import GatedEngine

from radixserve.cluster.base.config import CacheConfig, EngineConfig, SchedulerConfig
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint
from radixserve.worker.service import WorkerServer

MAX_WAITING = 2
MESSAGES = [{"role": "system", "content": "You answer in one word. " * 8}, {"role": "user", "content": "Hi"}]


@dataclass
class Worker:
    engine: GatedEngine
    server: WorkerServer
    url: str
    sdk: openai.OpenAI


@pytest.fixture(scope="module")
def worker(tiny_hf_dir: Path) -> Iterator[Worker]:
    checkpoint: Checkpoint = open_checkpoint(tiny_hf_dir)
    config = EngineConfig(model="tiny", cache=CacheConfig(page_size=4, num_pages=256),
                          scheduler=SchedulerConfig(max_waiting_requests=MAX_WAITING))
    engine = GatedEngine(config, checkpoint)
    loop = LoopThread("test").start()
    server = WorkerServer(engine, "w0", http_port=0)
    loop.call(server.start(), 60)
    url = f"http://{server.http_address}"
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    try:
        yield Worker(engine, server, url, sdk)
    finally:
        engine.gate.set()
        loop.call(server.stop(grace_s=5), 60)
        loop.stop()


def loads(worker: Worker) -> dict:
    return httpx.get(f"{worker.url}/v1/loads?include=core,disagg,queues,memory").json()["loads"][0]


def idle(worker: Worker) -> bool:
    load = loads(worker)
    return load["num_total_reqs"] == 0 and load["num_used_tokens"] == 0


def test_chat_and_completions_through_the_sdk_stream_what_they_answer_whole(worker: Worker) -> None:
    whole = worker.sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, n=2,
                                               logprobs=True, top_logprobs=2)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].message.content == whole.choices[1].message.content  # greedy: both samples agree
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens // 2
    assert all(len(lp.top_logprobs) == 2 and bytes(lp.bytes).decode("utf-8", "replace") == lp.token
               for lp in whole.choices[0].logprobs.content)
    stream = worker.sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens // 2
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again

    text = worker.sdk.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0,
                                         logprobs=1, extra_body={"ignore_eos": True})
    choice = text.choices[0]
    assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == 5
    assert choice.logprobs.text_offset[0] == 0 and all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    ids = worker.engine.tokenizer.encode("The quick brown fox")
    by_ids = worker.sdk.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == choice.text
    streamed = worker.sdk.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_the_info_and_load_endpoints_answer_as_sglang_gateways_expect(worker: Worker) -> None:
    for path in ("/get_model_info", "/model_info"):
        info = httpx.get(worker.url + path).json()
        assert info["model_path"] == "tiny" and info["is_generation"] is True
    for path in ("/get_server_info", "/server_info"):
        info = httpx.get(worker.url + path).json()
        assert info["served_model_name"] == "tiny" and info["max_total_num_tokens"] == 256 * 4
    assert [m["id"] for m in httpx.get(worker.url + "/v1/models").json()["data"]] == ["tiny"]
    assert httpx.get(worker.url + "/health").json() == {"status": "ok"}
    report = httpx.get(worker.url + "/loads?model=tiny").json()
    assert report["dp_rank_count"] == 1 and report["loads"][0]["max_running_requests"] == 64
    assert set(report["loads"][0]) >= {"num_running_reqs", "num_waiting_reqs", "num_used_tokens", "token_usage"}


# The bodies the peer gateways forward for a client's streamed request, as logged from vllm-router 0.1.17 and SMG
# 1.13.0 (bench/bench_cluster.py's contenders): each adds fields at their defaults.
VLLM_ROUTER_COMPLETION = {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0.0, "stream": True,
                          "stream_options": {"include_usage": True}, "echo": False, "no_stop_trim": False,
                          "ignore_eos": True, "skip_special_tokens": True, "return_hidden_states": False}
VLLM_ROUTER_CHAT = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 2,
                    "logprobs": False, "no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
                    "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
                    "return_hidden_states": False, "include_reasoning": True}
SMG_COMPLETION = {"prompt": "The quick brown fox", "echo": False, "max_tokens": 2, "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": 0.0, "ignore_eos": True}
SMG_CHAT = {"messages": MESSAGES, "logprobs": False, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("path, body", [("/v1/completions", VLLM_ROUTER_COMPLETION),
                                        ("/v1/chat/completions", VLLM_ROUTER_CHAT),
                                        ("/v1/completions", SMG_COMPLETION), ("/v1/chat/completions", SMG_CHAT)])
def test_the_bodies_peer_gateways_forward_are_served_and_other_values_refused(worker: Worker, path: str,
                                                                              body: dict) -> None:
    with httpx.stream("POST", worker.url + path, json={"model": "tiny", **body}, timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"usage"' in events[-2]
    added = {k: v for k, v in body.items() if k in ("no_stop_trim", "return_hidden_states", "separate_reasoning")}
    for field, value in added.items():
        refused = httpx.post(worker.url + path, json={"model": "tiny", **body, field: not value}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field


def test_a_full_queue_answers_429_and_the_worker_serves_again_after(worker: Worker) -> None:
    worker.engine.gate.clear()
    held = [threading.Thread(target=worker.sdk.completions.create,
                             kwargs=dict(model="tiny", prompt=f"held {i}", max_tokens=2)) for i in range(MAX_WAITING)]
    try:
        for thread in held:
            thread.start()
        wait_for(lambda: loads(worker)["num_total_reqs"] == MAX_WAITING, 10, "the queue to fill")
        with pytest.raises(openai.RateLimitError) as refused:
            worker.sdk.completions.create(model="tiny", prompt="one too many", max_tokens=2)
        assert refused.value.body["code"] == "overloaded"
    finally:
        worker.engine.gate.set()
        for thread in held:
            thread.join(timeout=30)
    assert worker.sdk.completions.create(model="tiny", prompt="again", max_tokens=2).choices[0].text is not None


def test_closing_a_stream_aborts_the_request_and_frees_its_pages(worker: Worker) -> None:
    before = worker.engine.load().num_generated_tokens
    stream = worker.sdk.completions.create(model="tiny", prompt="Tell a long story", max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True})
    for _, chunk in zip(range(3), stream):
        assert chunk.choices
    stream.close()
    wait_for(lambda: idle(worker), 10, "the worker to release the closed stream's request")
    assert worker.engine.load().num_generated_tokens - before < 1000


def test_a_client_giving_up_on_a_whole_answer_aborts_its_request(worker: Worker) -> None:
    before = worker.engine.load()
    num_aborts = len(worker.engine.abort_requests)
    worker.engine.gate.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{worker.url}/v1/completions", timeout=httpx.Timeout(30, read=0.5),
                       json={"model": "tiny", "prompt": "never answered", "max_tokens": 50})
        wait_for(lambda: len(worker.engine.abort_requests) > num_aborts, 10,
                 "the server to abort the request of the closed connection")
    finally:
        worker.engine.gate.set()
    wait_for(lambda: worker.engine.load().num_requests_finished == before.num_requests_finished + 1, 10,
             "the abandoned request to end")
    assert worker.engine.load().num_generated_tokens == before.num_generated_tokens  # aborted before any step
    assert idle(worker)


def test_a_draining_worker_says_so_in_its_load_report(tiny_hf_dir: Path) -> None:
    engine = GatedEngine(EngineConfig(model="tiny", cache=CacheConfig(page_size=4, num_pages=256)),
                         open_checkpoint(tiny_hf_dir))
    loop = LoopThread("test-drain").start()
    server = WorkerServer(engine, "w1", http_port=0)
    loop.call(server.start(), 60)
    url = f"http://{server.http_address}"
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    engine.gate.clear()
    held = threading.Thread(target=sdk.completions.create, kwargs=dict(model="tiny", prompt="held", max_tokens=2))
    try:
        held.start()
        report = httpx.get(f"{url}/v1/loads").json()
        assert report["loads"][0]["draining"] is False and report["aggregate"]["draining"] is False
        wait_for(lambda: httpx.get(f"{url}/v1/loads").json()["loads"][0]["num_total_reqs"] == 1, 10,
                 "the request to be held")
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace_s=30), loop.loop)
        wait_for(lambda: httpx.get(f"{url}/loads").json()["loads"][0]["draining"], 10, "the report to say draining")
        assert httpx.get(f"{url}/v1/loads").json()["aggregate"]["draining"] is True
    finally:
        engine.gate.set()
        held.join(timeout=30)
    stopping.result(60)
    loop.stop()
