"""The cluster's routing, caching and cancellation, through the public gRPC API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from cluster_calls import chat_request, system_prompt, wait_for, workers_by_id

from radixserve.v1 import api_pb2, api_pb2_grpc


def _complete(stub: api_pb2_grpc.GenerationStub, request: api_pb2.GenerateRequest) -> api_pb2.CompleteResponse:
    return stub.Complete(request, timeout=300)


def test_requests_sharing_a_prefix_land_on_one_worker_and_reuse_its_cache(stub: api_pb2_grpc.GenerationStub):
    system = system_prompt("geology")
    first = _complete(stub, chat_request(system, "What is basalt?"))
    assert first.usage.prompt_tokens > 500
    followers = [_complete(stub, chat_request(system, question))
                 for question in ("What is granite?", "What is quartz?", "Name a metamorphic rock.")]
    assert {r.worker_id for r in followers} == {first.worker_id}
    for reply in followers:
        # Everything up to the user message is shared; only the tail page(s) are recomputed.
        assert reply.usage.cached_tokens >= first.usage.prompt_tokens - 32
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.choices[0].text


def test_generate_streams_the_same_tokens_as_complete(stub: api_pb2_grpc.GenerationStub):
    request = chat_request("You are terse.", "Count from one to five.", max_tokens=12)
    parts = list(stub.Generate(request, timeout=300))
    streamed = [t for part in parts for choice in part.choices for t in choice.token_ids]
    assert streamed == list(_complete(stub, request).choices[0].token_ids)
    assert sum(part.HasField("usage") for part in parts) == 1 and parts[-1].HasField("usage")
    assert parts[-1].usage.completion_tokens == len(streamed)


def test_a_hot_prefix_spreads_to_the_second_worker_once_the_first_is_loaded(stub: api_pb2_grpc.GenerationStub):
    system = system_prompt("astronomy")
    holder = _complete(stub, chat_request(system, "Say hi.")).worker_id
    requests = [chat_request(system, f"Tell me fact number {i} about stars.", max_tokens=128, ignore_eos=True)
                for i in range(24)]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        replies = list(pool.map(lambda r: _complete(stub, r), requests))
    served = [r.worker_id for r in replies]
    assert len(set(served)) == 2, f"the hot prefix never spread: {served}"
    # Each request the holder takes adds about 144 tokens of owed work (its question and its 128 output tokens);
    # it keeps the prefix while its owed work exceeds the other worker's by at most the ~700-token prefill it
    # saves / load_weight 0.35, about 2,000 tokens: over a dozen requests, and the two then share the rest.
    assert served.count(holder) >= 12, served
    assert all(len(r.choices[0].token_ids) == 128 for r in replies)
    assert all(r.usage.cached_tokens > 0 for r in replies if r.worker_id == holder)


def test_cancelling_a_stream_frees_its_pages_on_the_worker(stub: api_pb2_grpc.GenerationStub):
    request = chat_request(system_prompt("oceans", 20), "Write a long story.", max_tokens=2000, ignore_eos=True)
    stream = stub.Generate(request, timeout=300)
    first = next(stream)
    worker_id = first.worker_id
    wait_for(lambda: workers_by_id(stub)[worker_id].load.num_running == 1, 10, "the load report to show it")
    stream.cancel()

    def idle() -> bool:
        load = workers_by_id(stub)[worker_id].load
        # Nothing runs, and every used page is evictable: the request holds no page any more.
        return load.num_running == 0 and load.num_waiting == 0 and load.num_pages_used == load.num_pages_evictable

    wait_for(idle, 20, f"worker {worker_id} to release the cancelled request")


def test_the_deadline_reaches_the_worker(stub: api_pb2_grpc.GenerationStub):
    request = chat_request("You are verbose.", "Write a long story.", max_tokens=2000, ignore_eos=True)
    request.timeout_seconds = 1.5
    try:
        _complete(stub, request)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        raise AssertionError("a 2,000-token generation finished within 1.5 s")
    wait_for(lambda: all(w.load.num_running == 0 for w in workers_by_id(stub).values()), 20,
             "workers to abort the expired request")


def test_list_workers_reports_both_workers_with_live_events(stub: api_pb2_grpc.GenerationStub):
    workers = workers_by_id(stub)
    assert len(workers) == 2
    for status in workers.values():
        assert status.state == "up" and status.events_live and status.address.startswith("127.0.0.1:")
        assert status.load.num_pages_free + status.load.num_pages_used > 0
    assert sum(w.num_indexed_pages for w in workers.values()) > 0


def test_n_samples_come_back_as_separate_choices(stub: api_pb2_grpc.GenerationStub):
    request = chat_request("You are creative.", "Name a colour.", max_tokens=6, n=3)
    request.sampling.temperature, request.sampling.seed = 1.0, 7
    reply = _complete(stub, request)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.token_ids for c in reply.choices)
    assert reply.usage.completion_tokens == sum(len(c.token_ids) for c in reply.choices)
