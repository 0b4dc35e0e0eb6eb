"""The OpenAI-compatible HTTP API of the real cluster, through the openai SDK unchanged: against the router and
against a worker directly (each worker serves the same API over its own engine)."""

from __future__ import annotations

import httpx
import openai
import pytest
from cluster_calls import chat_request, system_prompt, wait_for, workers_by_id

from radixserve.cluster.base.config import DEFAULT_MODEL
from radixserve.v1 import api_pb2_grpc

TARGETS = ["router", "worker"]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, router_url: str, worker_urls: list[str]) -> str:
    """The base URL of the router's HTTP API, or of the first worker's."""
    return router_url if request.param == "router" else worker_urls[0]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_greedy_chat_equals_the_grpc_api_and_streams_the_same_text(target: str,
                                                                   stub: api_pb2_grpc.GenerationStub) -> None:
    system, user = "You are terse.", "Name three primary colours."
    expected = stub.Complete(chat_request(system, user, max_tokens=12), timeout=300).choices[0]
    whole = sdk(target).chat.completions.create(model=DEFAULT_MODEL, messages=messages(system, user),
                                                max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.completion_tokens == len(expected.token_ids)
    chunks = list(sdk(target).chat.completions.create(model=DEFAULT_MODEL, messages=messages(system, user),
                                                      max_completion_tokens=12, temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_of_text_and_of_token_ids_stream_what_they_answer_whole(target: str) -> None:
    client = sdk(target)
    whole = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=6,
                                      temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == 6 and "".join(choice.logprobs.tokens) == choice.text
    streamed = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text
    by_ids = client.completions.create(model=DEFAULT_MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})  # the same prompt's ids
    assert by_ids.usage.prompt_tokens == 5 and by_ids.choices[0].text == choice.text


def test_n_samples_come_back_as_indexed_choices(target: str) -> None:
    reply = sdk(target).chat.completions.create(model=DEFAULT_MODEL, messages=messages("Be creative.", "A name?"),
                                                max_tokens=8, temperature=0.9, seed=7, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage.completion_tokens <= 3 * 8
    streamed = sdk(target).chat.completions.create(model=DEFAULT_MODEL, messages=messages("Be creative.", "A name?"),
                                                   max_tokens=8, temperature=0.9, seed=7, n=3, stream=True)
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason}
    assert finished.keys() == {0, 1, 2}


def test_a_repeated_long_prefix_reports_cached_tokens(target: str) -> None:
    system = system_prompt(f"volcanoes via {target}", 30)
    client = sdk(target)
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages(system, "What is lava?"),
                                           max_tokens=2)
    again = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages(system, "What is ash?"),
                                           max_tokens=2)
    assert first.usage.prompt_tokens > 300
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 32


def test_closing_a_stream_frees_its_pages_on_the_worker(target: str, stub: api_pb2_grpc.GenerationStub,
                                                        worker_urls: list[str]) -> None:
    stream = sdk(target).chat.completions.create(
        model=DEFAULT_MODEL, messages=messages(system_prompt("rivers", 20), "Write a long story."), max_tokens=2000,
        stream=True, extra_body={"ignore_eos": True})
    for _, chunk in zip(range(4), stream):
        assert chunk.choices
    busy = [w for w in workers_by_id(stub).values() if w.load.num_running]
    assert len(busy) == 1, "the stream runs on one worker"
    stream.close()

    def released() -> bool:
        load = workers_by_id(stub)[busy[0].worker_id].load
        # Nothing runs or waits, and every used page is evictable: no request holds a page.
        return load.num_running == 0 and load.num_waiting == 0 and load.num_pages_used == load.num_pages_evictable

    wait_for(released, 20, f"worker {busy[0].worker_id} to release the closed stream's request")
    for url in worker_urls:  # the workers' own load reports agree
        report = httpx.get(f"{url}/v1/loads").json()["loads"][0]
        assert report["num_total_reqs"] == 0 and report["num_used_tokens"] == 0
