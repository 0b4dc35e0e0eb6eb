"""The router over real worker servers (tiny engines, no Ray): full queues, drain, health and reflection."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conditions import until
from gated_engine import GatedEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_cluster import Cluster, cluster
from undecodable import call_raw, refused, request_class, undecodable

from radixserve.cluster.base.bus import Lost, Subscription
from radixserve.cluster.base.config import EngineConfig
from radixserve.cluster.base.hashing import namespace_seed, page_hashes
from radixserve.cluster.base.loop_thread import LoopThread
from radixserve.cluster.base.metrics import scrape, total
from radixserve.cluster.base.tokenizer import Tokenizer
from radixserve.v1 import api_pb2, api_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from radixserve.worker.models.checkpoint import Checkpoint
from radixserve.worker.models.loading import open_checkpoint

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def checkpoint(tiny_hf_dir: Path) -> Checkpoint:
    return open_checkpoint(tiny_hf_dir)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


def request(max_tokens: int = 4, first_token: int = 5) -> api_pb2.GenerateRequest:
    """A greedy request for a 20-token prompt (5 pages) starting at ``first_token``."""
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=list(range(first_token, first_token + 20))),
                                   sampling=types_pb2.SamplingOptions(max_tokens=max_tokens, temperature=0))


def prompt_hashes(req: api_pb2.GenerateRequest) -> list[int]:
    return page_hashes(list(req.token_ids.ids), 4, namespace_seed("tiny"))


def test_when_every_queue_is_full_the_router_answers_resource_exhausted(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, max_waiting=1) as c:
            for engine in c.engines:
                engine.gate.clear()
            held = [asyncio.ensure_future(c.stub.Complete(request(), timeout=TIMEOUT_S)) for _ in c.engines]
            await until(lambda: all(e.load().num_waiting + e.load().num_running == 1 for e in c.engines),
                             "both workers to hold one request")
            retried = total(scrape(c.router.metrics_address), "radixserve_router_retries_total")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Complete(request(), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in caught.value.details()
            metrics = scrape(c.router.metrics_address)
            assert total(metrics, "radixserve_router_requests_total", code="RESOURCE_EXHAUSTED") == 1
            assert total(metrics, "radixserve_router_retries_total", code="RESOURCE_EXHAUSTED") - retried == 2  # both
            assert total(metrics, "radixserve_router_in_flight_requests") == 2
            for engine in c.engines:
                engine.gate.set()
            replies = await asyncio.gather(*held)
            assert sorted(r.worker_id for r in replies) == ["w0", "w1"]
            assert (await c.stub.Complete(request(), timeout=TIMEOUT_S)).choices[0].token_ids
    run(main)


def test_a_worker_that_refuses_a_request_is_not_credited_with_its_pages(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, max_waiting=1) as c:
            for engine in c.engines:
                engine.gate.clear()
            held = [asyncio.ensure_future(c.stub.Complete(request(first_token=t), timeout=TIMEOUT_S))
                    for t in (5, 105)]
            await until(lambda: all(e.load().num_waiting + e.load().num_running == 1 for e in c.engines),
                             "both workers to hold one request")
            refused = request(first_token=205)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Complete(refused, timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.router.index.match(prompt_hashes(refused), ["w0", "w1"]) == {"w0": 0, "w1": 0}
            listed = await c.stub.ListWorkers(api_pb2.ListWorkersRequest(), timeout=TIMEOUT_S)
            assert [w.num_indexed_pages for w in listed.workers] == [4, 4]  # each the prompt it accepted
            for engine in c.engines:
                engine.gate.set()
            await asyncio.gather(*held)
    run(main)


def test_the_router_credits_and_matches_only_the_pages_a_worker_can_match(checkpoint: Checkpoint):
    """A worker never matches a page ending at the prompt's last token (it computes that token for its logits), so
    a 20-token prompt in pages of 4 is credited with the 4 pages of its first 19 tokens, and a prompt sharing all 5
    pages matches those 4."""
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            engine = c.engines[0]
            engine.gate.clear()
            held = asyncio.ensure_future(c.stub.Complete(request(), timeout=TIMEOUT_S))
            await until(lambda: engine.load().num_waiting + engine.load().num_running == 1, "the request")
            full_pages = prompt_hashes(request())
            assert len(full_pages) == 5
            assert c.router.index.num_pages("w0") == 4
            assert c.router.index.match(full_pages, ["w0"]) == {"w0": 4}
            engine.gate.set()
            assert (await held).usage.prompt_tokens == 20
    run(main)


async def next_reset(feed: Subscription) -> worker_pb2.KvEventBatch:
    async for item in feed:
        if not isinstance(item, Lost) and (batch := worker_pb2.KvEventBatch.FromString(item)).reset:
            return batch
    raise AssertionError("the bus closed")


def test_late_duplicates_and_old_snapshots_on_the_bus_resurrect_no_page_and_a_gap_resyncs(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            index = c.router.index
            cached, marker, gap = request(), request(first_token=105), request(first_token=205)
            async with grpc.aio.insecure_channel(c.servers[0].address) as channel:
                worker = worker_pb2_grpc.WorkerStub(channel)
                await c.stub.Complete(cached, timeout=TIMEOUT_S)
                await until(lambda: index.match(prompt_hashes(cached), ["w0"])["w0"] == 5
                                 and index.num_pages("w0") == 5, "the prompt's stored events")
                snapshots = worker.StreamKvEvents(worker_pb2.StreamKvEventsRequest(), timeout=TIMEOUT_S)
                old_snapshot = await snapshots.read()  # holds the prompt's pages
                snapshots.cancel()
                stored = worker_pb2.KvEventBatch(worker_id="w0", incarnation=c.servers[0].incarnation,
                                                 sequence=old_snapshot.sequence, events=old_snapshot.events)
                await worker.FlushCache(worker_pb2.FlushCacheRequest(), timeout=TIMEOUT_S)
                await until(lambda: index.num_pages("w0") == 0, "the removed events")
                for late in (old_snapshot, stored):  # appended to the worker's log as the relay would
                    await c.bus.append_kv("w0", late.SerializeToString())
                await c.stub.Complete(marker, timeout=TIMEOUT_S)  # its events follow the late ones on the bus
                await until(lambda: index.match(prompt_hashes(marker), ["w0"])["w0"] == 5,
                                 "the marker's stored events")
                assert index.match(prompt_hashes(cached), ["w0"]) == {"w0": 0}
                feed = c.bus.follow_kv("w0")
                await asyncio.wait_for(next_reset(feed), TIMEOUT_S)  # the log's first entry
                ahead = worker_pb2.KvEventBatch(
                    worker_id="w0", incarnation=c.servers[0].incarnation, sequence=old_snapshot.sequence + 1000,
                    events=[worker_pb2.KvEvent(kind=worker_pb2.KvEvent.STORED, page_hashes=prompt_hashes(gap))])
                await c.bus.append_kv("w0", ahead.SerializeToString())
                await asyncio.wait_for(next_reset(feed), TIMEOUT_S)  # the router asked the worker for a snapshot
                await until(lambda: c.router.workers.clients["w0"].events_live, "the fresh snapshot")
                assert index.match(prompt_hashes(gap), ["w0"]) == {"w0": 0}
                assert index.match(prompt_hashes(marker), ["w0"]) == {"w0": 5}
    run(main)


def test_cancelled_streams_end_their_worker_requests_and_free_every_page(checkpoint: Checkpoint):
    """With the cyclic garbage collector off, only explicit closing can end the worker calls. The engine is held
    before any request could finish: only the router's aborts can end them."""
    num_calls, n, max_tokens = 12, 4, 200  # every sample in one running batch: they advance in step
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1, num_pages=4096) as c:
            engine = c.engines[0]
            long = [api_pb2.GenerateRequest(  # big responses, so that the router's writes wait on flow control
                token_ids=api_pb2.TokenIds(ids=[(7 * i + j) % 300 + 5 for j in range(20)]),
                sampling=types_pb2.SamplingOptions(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, n=n,
                                                   logprobs=20)) for i in range(num_calls)]
            gc.disable()
            try:
                calls = [c.stub.Generate(r, timeout=TIMEOUT_S) for r in long]
                for call in calls:
                    assert (await call.read()).choices  # mid-flight: streaming
                # The clients read no more: half of every answer is far more than the flow-control windows
                # hold, so the router's writes wait.
                await until(lambda: engine.load().num_generated_tokens >= num_calls * n * max_tokens // 2,
                            "half of every answer")
                engine.gate.clear()
                assert engine.load().num_requests_finished == 0 and engine.load().num_running == num_calls
                for call in calls:
                    call.cancel()
                await until(lambda: len(set(engine.abort_requests)) == num_calls, "the worker calls to be ended")
                engine.gate.set()
                await until(lambda: not engine.has_unfinished(), "the worker to apply the aborts")
                assert engine.load().num_generated_tokens < num_calls * n * max_tokens
            finally:
                engine.gate.set()
                gc.enable()
            async with grpc.aio.insecure_channel(c.servers[0].address) as channel:
                await worker_pb2_grpc.WorkerStub(channel).FlushCache(worker_pb2.FlushCacheRequest(),
                                                                     timeout=TIMEOUT_S)
            assert engine.allocator.num_free == engine.allocator.num_pages
            await until(lambda: c.router.core.num_in_flight == 0, "the router to count them ended")
    run(main)


class CountingEngine(GatedEngine):
    """Counts the requests the worker accepted."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint) -> None:
        super().__init__(config, checkpoint)
        self.num_added = 0

    def add_request(self, *args: Any, **kwargs: Any) -> str:
        request_id = super().add_request(*args, **kwargs)
        self.num_added += 1
        return request_id


class _UndecodingTokenizer:
    """A tokenizer whose ``decode`` fails; everything else is the wrapped one's."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError("the detokenizer broke")


class FailingEngine(CountingEngine):
    """Every request fails in its own work (detokenizing its first token): the worker answers INTERNAL."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint) -> None:
        super().__init__(config, checkpoint)
        self.tokenizer = _UndecodingTokenizer(self.tokenizer)  # type: ignore[assignment]


def test_a_request_is_attempted_on_two_workers_at_most(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, num_workers=3, engine_class=FailingEngine) as c:
            retried = total(scrape(c.router.metrics_address), "radixserve_router_retries_total")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Complete(request(), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert caught.value.details().count("the detokenizer broke") == 2, caught.value.details()
            assert sorted(e.num_added for e in c.engines) == [0, 1, 1]
            metrics = scrape(c.router.metrics_address)
            assert total(metrics, "radixserve_router_retries_total", code="INTERNAL") - retried == 2
    run(main)


def test_a_request_is_not_retried_once_a_token_reached_the_client(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, num_workers=3, engine_class=CountingEngine) as c:
            call = c.stub.Generate(request(max_tokens=60), timeout=TIMEOUT_S)
            first = await call.read()
            assert first.choices[0].token_ids
            serving = next(i for i, e in enumerate(c.engines) if e.num_added)
            c.engines[serving].gate.clear()  # the request stays in flight
            await c.servers[serving].stop(grace_s=0.1)  # and its worker goes away
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert [e.num_added for e in c.engines].count(0) == 2  # never retried elsewhere
    run(main)


def prompt_of(num_tokens: int, variant: int = 0) -> api_pb2.GenerateRequest:
    """A greedy request for ``num_tokens`` prompt tokens; variants differ from their first page on."""
    ids = [(3 * j + 11 * variant) % 300 + 5 for j in range(num_tokens)]
    return api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=ids),
                                   sampling=types_pb2.SamplingOptions(max_tokens=4, temperature=0))


def test_a_prompt_goes_only_to_workers_whose_context_fits_it(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, worker_settings=[{"max_model_len": 64}]) as c:  # w1: 256 tokens
            for _ in range(4):
                assert (await c.stub.Complete(prompt_of(100), timeout=TIMEOUT_S)).worker_id == "w1"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Complete(prompt_of(300), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("token_ids: the prompt is 300 tokens"), caught.value.details()
            assert "context of 256 tokens" in caught.value.details()
            for variant in range(1, 41):  # cold short prompts tie, broken at random: some go to the short worker
                if (await c.stub.Complete(prompt_of(20, variant), timeout=TIMEOUT_S)).worker_id == "w0":
                    break
            else:
                raise AssertionError("no short prompt went to the worker with the short context")
    run(main)


def test_the_router_follows_the_pool_to_another_model_once_no_worker_serves_its_own(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, worker_settings=[{}, {"namespace": "other"}]) as c:
            for variant in range(8):  # w1's pages hash differently: not routed to while w0 serves the router's view
                assert (await c.stub.Complete(prompt_of(20, variant), timeout=TIMEOUT_S)).worker_id == "w0"
            await c.servers[0].stop(grace_s=1)
            await c.bus.withdraw("w0")
            await until(lambda: "w0" not in c.router.workers.clients, "the router to drop w0")
            assert (await c.stub.Complete(prompt_of(20), timeout=TIMEOUT_S)).worker_id == "w1"
    run(main)


def test_max_tokens_beyond_the_context_is_capped_to_it(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            c.engines[0].gate.clear()
            unbounded = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=list(range(5, 25))),
                                                sampling=types_pb2.SamplingOptions(
                                                    max_tokens=2**63 - 1, n=2, temperature=0, ignore_eos=True))
            reply = asyncio.ensure_future(c.stub.Complete(unbounded, timeout=TIMEOUT_S))
            await until(lambda: c.router.core.num_in_flight == 1, "the request to reach the worker")
            outstanding = c.router.workers.clients["w0"].outstanding
            assert 0 < outstanding.pending_tokens <= 20 + 2 * (256 - 20)  # its prompt, and two samples' room
            c.engines[0].gate.set()
            done = await reply
            assert [len(choice.token_ids) for choice in done.choices] == [256 - 20] * 2
            assert [choice.finish_reason for choice in done.choices] == ["length"] * 2
    run(main)


def test_drain_finishes_requests_in_flight_and_refuses_new_ones(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            c.engines[0].gate.clear()
            in_flight = asyncio.ensure_future(c.stub.Complete(request(max_tokens=6), timeout=TIMEOUT_S))
            await until(lambda: c.router.core.num_in_flight == 1, "the request to reach the router")
            stopping = asyncio.ensure_future(c.router.stop())
            await until(lambda: c.router.core.draining, "the drain to begin")
            health = health_pb2_grpc.HealthStub(c.channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await c.stub.Complete(request(), timeout=TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in caught.value.details()
            c.engines[0].gate.set()
            assert len((await in_flight).choices[0].token_ids) == 6
            await stopping
    run(main)


def test_the_router_serves_health_and_reflection(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint, num_workers=1) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            for service in ("", "radixserve.v1.Generation"):
                status = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            call = reflection.ServerReflectionInfo(timeout=TIMEOUT_S)
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            reply = await call.read()
            await call.done_writing()
            names = {s.name for s in reply.list_services_response.service}
            assert {"radixserve.v1.Generation", "grpc.health.v1.Health"} <= names
    run(main)


def test_the_router_metrics_count_requests_by_code_decisions_tokens_and_kv_events(checkpoint: Checkpoint):
    async def main() -> None:
        async with cluster(checkpoint) as c:
            first = await c.stub.Complete(request(), timeout=TIMEOUT_S)
            async for _ in c.stub.Generate(request(), timeout=TIMEOUT_S):
                pass
            bad = api_pb2.GenerateRequest(token_ids=api_pb2.TokenIds(ids=[5, 6]),
                                          sampling=types_pb2.SamplingOptions(temperature=-1.0))
            with pytest.raises(grpc.aio.AioRpcError):
                await c.stub.Complete(bad, timeout=TIMEOUT_S)
            for engine in c.engines:
                engine.gate.clear()
            call = c.stub.Generate(request(), timeout=TIMEOUT_S)
            await until(lambda: c.router.core.num_in_flight == 1, "the request to reach the router")
            call.cancel()
            for engine in c.engines:
                engine.gate.set()
            await until(lambda: c.router.core.num_in_flight == 0, "the cancelled request to end")
            m = scrape(c.router.metrics_address)
            assert {(s.labels["method"], s.labels["code"]): s.value for s in m
                    if s.name == "radixserve_router_requests_total"} == {
                ("Complete", "OK"): 1, ("Generate", "OK"): 1, ("Complete", "INVALID_ARGUMENT"): 1,
                ("Generate", "CANCELLED"): 1, ("ModelInfer", "OK"): 0, ("ModelStreamInfer", "OK"): 0,
                ("chat.completions", "OK"): 0, ("completions", "OK"): 0}
            assert total(m, "radixserve_router_routing_decisions_total", policy="prefix") == 3
            assert total(m, "radixserve_router_time_to_first_token_seconds_count") == 2
            assert total(m, "radixserve_router_e2e_request_latency_seconds_count") == 2
            holder = first.worker_id
            assert total(m, "radixserve_router_prompt_tokens_total", worker=holder) == 2 * 20
            assert total(m, "radixserve_router_cached_tokens_total", worker=holder) == 16  # the second hit 4 pages
            assert total(m, "radixserve_router_completion_tokens_total") == 2 * 4
            assert total(m, "radixserve_router_workers", state="up") == 2
            assert total(m, "radixserve_router_kv_events_total", worker=holder) > 0
            assert total(m, "radixserve_router_prefix_index_pages", worker=holder) == 5
            assert total(m, "radixserve_router_kv_event_lag_seconds_count") > 0
    run(main)


# ---- undecodable requests -----------------------------------------------------------------------------

GENERATION = api_pb2.DESCRIPTOR.services_by_name["Generation"]


@pytest.fixture(scope="module")
def background_cluster(checkpoint: Checkpoint) -> Iterator[Cluster]:
    """One worker and the router, served from a loop in another thread, for synchronous raw calls."""
    thread = LoopThread("test").start()
    serving = cluster(checkpoint, num_workers=1)
    try:
        yield thread.call(serving.__aenter__(), 60)
        thread.call(serving.__aexit__(None, None, None), 60)
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def raw_channel(background_cluster: Cluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(background_cluster.router.address) as channel:
        yield channel


def counted(c: Cluster, **labels: str) -> float:
    return total(scrape(c.router.metrics_address), "radixserve_router_requests_total", **labels)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_undecodable_bytes_are_invalid_argument_naming_the_message_and_counted(
        background_cluster: Cluster, raw_channel: grpc.Channel, data: st.DataObject):
    method = data.draw(st.sampled_from(list(GENERATION.methods)), label="method")
    garbage = data.draw(undecodable(request_class(method)), label="bytes")
    before, invalid = counted(background_cluster), counted(background_cluster, method=method.name,
                                                          code="INVALID_ARGUMENT")
    with refused(method):
        call_raw(raw_channel, method, garbage, TIMEOUT_S)
    counts = method.name != "ListWorkers"  # the requests counter counts Generate and Complete
    assert counted(background_cluster) == before + counts
    assert counted(background_cluster, method=method.name, code="INVALID_ARGUMENT") == invalid + counts


def test_the_router_serves_after_undecodable_bytes(background_cluster: Cluster, raw_channel: grpc.Channel):
    complete = GENERATION.methods_by_name["Complete"]
    with refused(complete):
        call_raw(raw_channel, complete, b"\xff\xff\xff", TIMEOUT_S)
    stub = api_pb2_grpc.GenerationStub(raw_channel)
    assert len(stub.Complete(request(), timeout=TIMEOUT_S).choices[0].token_ids) == 4
