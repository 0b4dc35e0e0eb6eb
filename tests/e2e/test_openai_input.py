"""Bad input to the real cluster's OpenAI-compatible HTTP API, through raw HTTP: each answered with its status and
OpenAI's error object naming the field, and the server keeps serving; a property-based fuzz of the schema."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from radixserve.cluster.base.config import DEFAULT_MODEL

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"model": DEFAULT_MODEL, "messages": MESSAGES, "max_tokens": 1}
TEXT = {"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 1}


def chat(**fields: Any) -> tuple[str, dict[str, Any]]:
    return CHAT_PATH, {**CHAT, **fields}


def text(**fields: Any) -> tuple[str, dict[str, Any]]:
    return COMPLETIONS_PATH, {**TEXT, **fields}


def without(field: str, path_body: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    path, body = path_body
    return path, {k: v for k, v in body.items() if k != field}


# (the param the error names, the request)
BAD_REQUESTS = [
    # wrong types
    ("messages", chat(messages="Hi")),
    ("messages[0].content", chat(messages=[{"role": "user", "content": 5}])),
    ("messages[0].content", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
    ("messages[0].role", chat(messages=[{"role": 1, "content": "Hi"}])),
    ("max_tokens", chat(max_tokens="5")),
    ("max_tokens", text(max_tokens=1.5)),
    ("temperature", chat(temperature="hot")),
    ("stream", chat(stream=1)),
    ("n", text(n=True)),
    ("stop", chat(stop=[1])),
    ("stop", text(stop=5)),
    ("prompt", text(prompt={"text": "Hi"})),
    ("prompt", text(prompt=[1, "a"])),
    ("logprobs", chat(logprobs="yes")),
    ("stream_options.include_usage", chat(stream=True, stream_options={"include_usage": "yes"})),
    ("stop_token_ids[0]", text(stop_token_ids=["2"])),
    # missing, unknown
    ("model", without("model", chat())),
    ("messages", without("messages", chat())),
    ("prompt", without("prompt", text())),
    ("foo", chat(foo=1)),
    ("messages[0].tool_calls", chat(messages=[{"role": "assistant", "content": "x", "tool_calls": []}])),
    ("stream_options.chunked", chat(stream=True, stream_options={"chunked": True})),
    # out of range
    ("temperature", chat(temperature=-1)),
    ("top_p", text(top_p=0)),
    ("top_k", text(top_k=-2)),
    ("min_p", chat(min_p=2)),
    ("repetition_penalty", text(repetition_penalty=0)),
    ("presence_penalty", chat(presence_penalty=3)),
    ("frequency_penalty", text(frequency_penalty=-3)),
    ("n", chat(n=0)),
    ("n", text(n=65)),
    ("seed", chat(seed=-1)),
    ("max_tokens", text(max_tokens=0)),
    ("max_tokens", text(max_tokens=2**64)),
    ("max_completion_tokens", chat(max_completion_tokens=0)),
    ("min_tokens", text(min_tokens=2)),
    ("top_logprobs", chat(logprobs=True, top_logprobs=21)),
    ("top_logprobs", chat(top_logprobs=2)),
    ("logprobs", text(logprobs=21)),
    ("stop", text(stop=[""])),
    ("stop_token_ids", text(stop_token_ids=[10**6])),
    ("prompt", text(prompt="")),
    ("prompt", text(prompt="\x13")),  # a character SmolLM2's vocabulary lacks: no token
    ("prompt", text(prompt="\x04", stream=True)),
    ("stop", text(stop=["a", "b", "c", "d", "e"])),
    ("stop", chat(stop="x" * 300)),
    ("messages[0].role", chat(messages=[{"role": "wizard", "content": "Hi"}])),
    ("prompt", text(prompt=[])),
    ("prompt", text(prompt=[5, 49152])),
    ("prompt", text(prompt=["one", "two"])),
    ("prompt", text(prompt="word " * 5000)),
    ("messages", chat(messages=[])),
    ("messages", chat(messages=[{"role": "user", "content": "word " * 5000}])),
    ("messages[0].role", chat(messages=[{"role": "", "content": "Hi"}])),
    ("stream_options", chat(stream_options={"include_usage": True})),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}])),
    ("echo", text(echo=True)),
    ("logit_bias", text(logit_bias={"5": 100})),
]


@pytest.fixture(scope="module")
def http(router_url: str) -> httpx.Client:
    with httpx.Client(base_url=router_url, timeout=300) as client:
        yield client


def served_after(http: httpx.Client) -> None:
    reply = http.post(CHAT_PATH, json=CHAT)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("param", "request_"), BAD_REQUESTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_REQUESTS)])
def test_bad_input_is_400_naming_the_field_and_the_router_keeps_serving(http: httpx.Client, param: str,
                                                                        request_: tuple[str, dict]) -> None:
    path, body = request_
    reply = http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param) or error["code"] == "unknown_parameter", error
    served_after(http)


@pytest.mark.parametrize("data", [b"{", b'{"model": ', b"\xff\xfe", b"[1, 2]", b"null", b"", b'"text"'])
def test_a_body_that_is_no_json_object_is_400(http: httpx.Client, data: bytes) -> None:
    reply = http.post(CHAT_PATH, content=data, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] in ("invalid_json", "invalid_type")
    served_after(http)


def test_unknown_models_paths_and_methods_are_404_or_405(http: httpx.Client) -> None:
    unknown = http.post(CHAT_PATH, json={**CHAT, "model": "gpt-4o"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert http.post("/v1/embeddings", json=CHAT).status_code == 404
    not_allowed = http.get(CHAT_PATH)
    assert not_allowed.status_code == 405 and not_allowed.json()["error"]["message"]
    served_after(http)


def test_a_body_over_the_limit_is_413_before_it_is_parsed(http: httpx.Client) -> None:
    oversize = b'{"model": "' + b"x" * (4 * 2**20) + b'"'  # not even JSON: the size is checked first
    reply = http.post(COMPLETIONS_PATH, content=oversize)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    served_after(http)


# ---- fuzz ---------------------------------------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=4), st.lists(st.integers(-1, 3), max_size=2), st.just({}))
UNIT = st.floats(0.05, 1)
# Each field: (valid values, values that are often wrong). Valid requests ask for at most 3 tokens a sample.
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "model": (st.just(DEFAULT_MODEL), st.sampled_from(["other", 5, None])),
    "max_tokens": (st.integers(1, 3), st.one_of(st.integers(-1, 0), st.just(2**64), st.text(max_size=2))),
    "n": (st.integers(1, 2), st.one_of(st.integers(-1, 0), st.just(65), JUNK)),
    "temperature": (st.floats(0, 2), st.one_of(st.floats(-1, -0.01), JUNK)),
    "top_p": (UNIT, st.one_of(st.floats(-0.5, 0), st.floats(1.01, 2), JUNK)),
    "top_k": (st.integers(-1, 50), st.one_of(st.integers(-9, -2), JUNK)),
    "min_p": (st.floats(0, 0.5), st.one_of(st.floats(1.01, 2), JUNK)),
    "repetition_penalty": (st.floats(0.5, 2), st.one_of(st.floats(-1, 0), JUNK)),
    "presence_penalty": (st.floats(-2, 2), st.one_of(st.floats(2.01, 5), JUNK)),
    "frequency_penalty": (st.floats(-2, 2), st.one_of(st.floats(-5, -2.01), JUNK)),
    "seed": (st.integers(0, 2**63 - 1), st.one_of(st.integers(-5, -1), st.just(2**64), JUNK)),
    "stop": (st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
             st.one_of(st.just([""]), JUNK)),
    "stop_token_ids": (st.lists(st.integers(0, 49151), max_size=3), st.one_of(st.just([60000]), JUNK)),
    "min_tokens": (st.integers(0, 1), st.one_of(st.integers(4, 9), JUNK)),
    "ignore_eos": (st.booleans(), JUNK),
    "stream": (st.booleans(), JUNK),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), JUNK),
    "user": (st.text(max_size=5), JUNK),
}
CHAT_FIELDS = {**FIELDS, "tools": (st.just([]), JUNK),
               "max_completion_tokens": (st.integers(1, 3), st.one_of(st.integers(-1, 0), st.just(2**63))),
               "logprobs": (st.booleans(), st.one_of(st.integers(0, 3), JUNK)),
               "top_logprobs": (st.integers(0, 20), st.one_of(st.integers(21, 99), JUNK))}
COMPLETION_FIELDS = {**FIELDS, "echo": (st.just(False), JUNK),
                     "logprobs": (st.integers(0, 20), st.one_of(st.integers(21, 99), st.booleans(), JUNK))}
CONTENT = st.one_of(st.text(min_size=1, max_size=20),
                    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
                             min_size=1, max_size=2))
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": CONTENT})
BAD_MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["", 3]), "content": CONTENT}),
                        st.fixed_dictionaries({"role": st.just("user"), "content": JUNK}), JUNK)
PROMPT = st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 49151), min_size=1, max_size=6))
BAD_PROMPT = st.one_of(st.just(""), st.lists(st.integers(-2, 60000), max_size=3),
                       st.lists(st.text(max_size=5), min_size=2, max_size=3), JUNK)


def maybe_bad(draw: st.DrawFn, valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    return draw(bad) if draw(st.integers(0, 7)) == 0 else draw(valid)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A request over the schema's fields, each wrong now and then, sometimes with an unknown field; every valid
    one asks for at most 3 tokens a sample."""
    path = draw(st.sampled_from([CHAT_PATH, COMPLETIONS_PATH]))
    body: dict[str, Any] = {"model": DEFAULT_MODEL, "max_tokens": 2}
    if path == CHAT_PATH:
        fields = CHAT_FIELDS
        body["messages"] = maybe_bad(draw, st.lists(MESSAGE, min_size=1, max_size=3),
                                     st.one_of(st.lists(BAD_MESSAGE, min_size=1, max_size=2), JUNK))
    else:
        fields = COMPLETION_FIELDS
        body["prompt"] = maybe_bad(draw, PROMPT, BAD_PROMPT)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[name] = maybe_bad(draw, *fields[name])
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(["fooo", "max_new_tokens", "prompt", "messages"]))] = 1
    return path, body


def check_answer(reply: httpx.Response, streamed: bool) -> None:
    """No 5xx; an accepted request ends with every choice finished (or an error event); a refusal is OpenAI's
    error object, naming the field unless the body was no JSON object."""
    assert reply.status_code < 500, reply.text
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert error["message"] and error["type"]
        assert error["param"] or error["code"] in ("invalid_json", "invalid_type", "model_not_found"), error
        return
    if not streamed:
        answer = reply.json()
        assert answer["usage"]["completion_tokens"] >= 0
        assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"]) and answer["choices"]
        return
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    if "error" in chunks[-1]:
        return
    finished = {c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]}
    assert finished and finished == {c["index"] for chunk in chunks for c in chunk["choices"]}


@pytest.fixture(params=["router", "worker"])
def target(request: pytest.FixtureRequest, router_url: str, worker_urls: list[str]) -> str:
    return router_url if request.param == "router" else worker_urls[-1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(request_=bodies())
def test_fuzzed_requests_never_fail_the_server_and_each_ends_with_tokens_or_an_error(
        target: str, request_: tuple[str, dict[str, Any]]) -> None:
    path, body = request_
    streamed = body.get("stream") is True
    with httpx.Client(base_url=target, timeout=300) as client:
        reply = client.post(path, content=json.dumps(body))
    event(f"HTTP {reply.status_code}{' streamed' if streamed and reply.status_code == 200 else ''}")
    check_answer(reply, streamed)
